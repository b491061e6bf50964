"""`overlayctl trace` and `overlayctl doctor`'s peer probe over IPv6, against real labs: vxlan
and host-gw, dual stack (`--ipv6`) and IPv6-only (`--ipv6-only`), two hosts each, real daemons,
containers and traffic.

trace: a UDP probe over IPv6 from h1's container to h2's, decoded at the three points (VXLAN
over the IPv6 underlay: outer IPv6/UDP 8472, VNI, inner IPv6; host-gw: plain IPv6), and
"never delivered" when h2 drops udp 8472 over IPv6 (ip6tables). doctor: every peer answers an
ICMPv6 echo (PASS), and a peer dropping udp 8472 over IPv6 fails that peer's line with the fix.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv6Address, IPv6Network
from typing import Any

import pytest

from integration.lab import Lab
from integration.netns import in_ns
from tests.test_doctor_lab import doctor, failed
from tests.test_trace_lab import ctl, forward

pytestmark = [pytest.mark.root, pytest.mark.slow]

LABS = [("vxlan", "only"), ("host-gw", "only"), ("vxlan", "dual"), ("host-gw", "dual")]


@pytest.fixture(scope="module", params=LABS, ids=[f"{b}-{m}" for b, m in LABS])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    backend, mode = request.param
    lab = Lab(f"w{uuid.uuid4().hex[:6]}", state_root=tmp_path_factory.mktemp("labs"))
    try:
        if mode == "only":
            asyncio.run(lab.up(nodes=2, backend=backend, ipv6_only=True))
        else:
            asyncio.run(lab.up(nodes=2, backend=backend, ipv6=True))
        yield lab
    finally:
        asyncio.run(lab.down())


# The tests that need one lab only run in the IPv6-only vxlan one (the module's first: the same
# lab instance, not another one).
in_the_vxlan_only_lab = pytest.mark.parametrize("lab", [LABS[0]], ids=["vxlan-only"], indirect=True)


class Drop6On:
    """An ip6tables rule in a host's namespace dropping UDP to `port`, removed at the end."""

    def __init__(self, ns: str, port: int) -> None:
        self.rule = ["INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"]
        self.ns = ns

    def __enter__(self) -> None:
        subprocess.run(in_ns(self.ns, ["ip6tables", "-I", *self.rule]), check=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(in_ns(self.ns, ["ip6tables", "-D", *self.rule]), check=True, timeout=30)


def peer_failures(checks: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The failing peer lines (the other checks are not this file's subject)."""
    return {n: cs for n, cs in failed(checks).items() if n.startswith("peer")}


def trace6(lab: Lab, *extra: str) -> tuple[int, dict[str, Any]]:
    import json

    (_, src), (_, dst) = lab.containers()[:2]
    assert src.ip6 and dst.ip6
    out = ctl(lab, "trace", src.ip6, dst.ip6, "--src-netns", lab.host_ns(1), "--dst-netns",
              lab.host_ns(2), "--json", "--probe", "--probe-netns", src.ns, *extra)  # fmt: skip
    assert out.returncode in (0, 3), out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return out.returncode, doc


def test_trace_probe_over_ipv6_decoded_and_delivered(lab: Lab) -> None:
    code, doc = trace6(lab)
    h1, h2 = lab.node(1), lab.node(2)
    (_, src), (_, dst) = lab.containers()[:2]
    assert code == 0 and doc["last_seen"] == "delivered" and doc["reached_last_point"], doc
    assert (doc["src"], doc["dst"]) == (str(IPv6Address(src.ip6 or "")),
                                        str(IPv6Address(dst.ip6 or "")))  # fmt: skip
    assert (doc["src_host"], doc["dst_host"]) == (h1.ip6, h2.ip6)
    vxlan = lab.state.backend == "vxlan"
    assert (doc["encap"], doc["port"], doc["vni"]) == (
        ("vxlan", 8472, 1) if vxlan else ("none", 0, None))  # fmt: skip
    assert [p["iface"] for p in doc["points"]] == ["eth0", "eth0", "cni0"]
    assert all("ip6" in p["filter"] or "udp port 8472" in p["filter"] for p in doc["points"])
    for stage in ("source", "destination"):
        sent = forward(doc, stage)
        assert len(sent) == 3  # --probe-count 3
        for pkt in sent:
            inner = pkt["inner"]
            assert pkt["error"] is None and inner["version"] == 6
            # The container sent hop limit 64; its host routed it: 63 on the underlay.
            assert inner["ttl"] == 63 and inner["proto"] == 17 and inner["dport"] == 33434
            if vxlan:
                outer = pkt["outer"]
                assert pkt["encap"] == "vxlan" and pkt["vni"] == 1 and outer["version"] == 6
                assert (outer["src"], outer["dst"], outer["dport"]) == (h1.ip6, h2.ip6, 8472)
                assert outer["length"] == inner["length"] + 70  # IPv6 + UDP + VXLAN + Ethernet
            else:
                assert pkt["outer"] is None and pkt["encap"] == "none"
    # Each probe is one packet at every point (IPv6 has no identification: the payload's).
    assert {p["inner"]["ident"] for p in forward(doc, "source")} == {
        p["inner"]["ident"] for p in forward(doc, "delivered")
    }
    delivered = forward(doc, "delivered")
    assert len(delivered) == 3 and all(p["outer"] is None for p in delivered)
    assert all(p["inner"]["ttl"] == 62 for p in delivered)  # routed once more on h2


@in_the_vxlan_only_lab
def test_trace_human_output_over_ipv6(lab: Lab) -> None:
    (_, src), (_, dst) = lab.containers()[:2]
    assert src.ip6 and dst.ip6
    out = ctl(lab, "trace", src.ip6, dst.ip6, "--src-netns", lab.host_ns(1), "--dst-netns",
              lab.host_ns(2), "--probe", "--probe-netns", src.ns, "--probe-count", "1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "over vxlan (VNI 1, udp/8472)" in lines[0]
    assert any(f"vxlan vni 1: [{src.ip6}]:" in line and f"> [{dst.ip6}]:33434 udp hlim 63" in line
               for line in lines), out.stdout  # fmt: skip
    assert lines[-1].startswith(f"{src.ip6} -> {dst.ip6}: last seen: delivered towards DST")


@in_the_vxlan_only_lab
def test_trace_never_delivered_when_the_destination_drops_8472_over_ipv6(lab: Lab) -> None:
    with Drop6On(lab.host_ns(2), 8472):
        code, doc = trace6(lab, "--probe-count", "1")
    assert code == 3 and doc["last_seen"] == "destination" and not doc["reached_last_point"]
    assert len(forward(doc, "source")) == 1 and len(forward(doc, "destination")) == 1
    assert forward(doc, "delivered") == []
    assert "never delivered towards DST" in doc["verdict"]


def test_doctor_every_peer_answers_an_icmpv6_echo(lab: Lab) -> None:
    _, checks = doctor(lab)
    assert peer_failures(checks) == {}
    h2 = lab.node(2)
    assert h2.subnet6 and h2.ip6
    (line,) = checks[f"peer {h2.subnet6}"]
    target = IPv6Network(h2.subnet6).network_address if lab.state.backend == "vxlan" else h2.ip6
    how = ("through flannel-v6.1 (udp 8472)" if lab.state.backend == "vxlan"
           else "on the underlay")  # fmt: skip
    assert line["result"] == "PASS"
    assert line["message"].startswith(f"{h2.ip6}: {target} answered an ICMPv6 echo {how}")
    if lab.state.ipv6_only:
        assert "peers" not in checks  # no more "not checked"
    else:  # dual stack: the IPv4 side has its own line
        (line4,) = checks[f"peer {h2.subnet}"]
        assert line4["result"] == "PASS" and "answered an ICMP echo" in line4["message"]


@in_the_vxlan_only_lab
def test_doctor_fails_a_peer_that_drops_8472_over_ipv6(lab: Lab) -> None:
    h2 = lab.node(2)
    with Drop6On(h2.ns, 8472):
        rc, checks = doctor(lab)
    assert rc == 1
    (line,) = failed(checks)[f"peer {h2.subnet6}"]
    assert line["message"].startswith(
        f"{h2.ip6}: no answer from {IPv6Network(h2.subnet6 or '').network_address} through "
        "flannel-v6.1 (udp 8472)"
    )
    assert f"in on {h2.ip6}" in line["fix"]
    assert "ip6tables -I INPUT -p udp --dport 8472 -j ACCEPT" in line["fix"]
    _, checks = doctor(lab)  # the rule gone, the peer answers again
    assert peer_failures(checks) == {}


def test_doctor_finds_nothing_wrong_with_a_healthy_ipv6_lab(lab: Lab) -> None:
    """Every check, not only the peers: ip_forward reads net.ipv6.conf.all.forwarding (and,
    in dual stack, net.ipv4.ip_forward too), the forward check reads ip6tables for the IPv6
    network, the MTU check knows VXLAN over IPv6 costs 70 bytes (dual stack: FLANNEL_MTU is
    flannel-v6's), and cni_state counts host-local's IPv6 reservations."""
    rc, checks = doctor(lab)
    assert failed(checks) == {}, failed(checks)
    assert rc == 0
    forwards = [c["message"] for c in checks["ip_forward"]]
    assert any(m.startswith("net.ipv6.conf.all.forwarding = 1") for m in forwards)
    assert any(m.startswith("net.ipv4.ip_forward = 1") for m in forwards) == (
        not lab.state.ipv6_only
    )
    assert checks["cni_state"][0]["result"] == "PASS"

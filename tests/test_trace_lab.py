"""`overlayctl trace` and `overlayctl leases revoke` against real labs (vxlan and udp, two hosts
each, real daemons, containers and traffic): the decoded fields of the probe's packets, "never
delivered" when the destination host drops the encapsulation port (iptables), garbage on the
port shown as undecodable, and a stopped host's lease revoked so the other host drops its
routes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest

from integration.lab import Lab
from integration.netns import in_ns, ip_json, run
from tests.labtools import eventually

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _lab(tmp_path_factory: pytest.TempPathFactory, letter: str, backend: str) -> Iterator[Lab]:
    lab = Lab(f"{letter}{uuid.uuid4().hex[:6]}", state_root=tmp_path_factory.mktemp("labs"))
    try:
        asyncio.run(lab.up(nodes=2, backend=backend))
        yield lab
    finally:
        asyncio.run(lab.down())


@pytest.fixture(scope="module")
def vxlan_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _lab(tmp_path_factory, "t", "vxlan")


@pytest.fixture(scope="module")
def udp_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _lab(tmp_path_factory, "s", "udp")


def ctl(lab: Lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "overlay.ctl", "--etcd-endpoints", lab.state.etcd_endpoint,
            "--etcd-prefix", lab.state.prefix, *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def trace_args(lab: Lab, *extra: str) -> list[str]:
    (_, src), (_, dst) = lab.containers()[:2]
    assert src.ip and dst.ip
    return ["trace", src.ip, dst.ip, "--src-netns", lab.host_ns(1), "--dst-netns",
            lab.host_ns(2), *extra]  # fmt: skip


def probe_trace(lab: Lab, *extra: str) -> tuple[int, dict[str, Any]]:
    (_, src), _ = lab.containers()[:2]
    out = ctl(lab, *trace_args(lab, "--json", "--probe", "--probe-netns", src.ns, *extra))
    assert out.returncode in (0, 3), out.stderr
    return out.returncode, json.loads(out.stdout)


def forward(doc: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    return [p for p in doc["packets"] if p["point"] == stage and p["inner"]
            and (p["inner"]["src"], p["inner"]["dst"]) == (doc["src"], doc["dst"])]  # fmt: skip


class DropOn:
    """An iptables rule in a host's namespace dropping UDP to `port`, removed at the end."""

    def __init__(self, ns: str, port: int) -> None:
        self.rule = ["INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"]
        self.ns = ns

    def __enter__(self) -> None:
        subprocess.run(in_ns(self.ns, ["iptables", "-I", *self.rule]), check=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(in_ns(self.ns, ["iptables", "-D", *self.rule]), check=True, timeout=30)


def test_vxlan_probe_decoded_and_delivered(vxlan_lab: Lab) -> None:
    code, doc = probe_trace(vxlan_lab)
    h1, h2 = vxlan_lab.node(1), vxlan_lab.node(2)
    assert code == 0 and doc["last_seen"] == "delivered" and doc["reached_last_point"]
    assert (doc["encap"], doc["port"], doc["vni"]) == ("vxlan", 8472, 1)
    assert (doc["src_host"], doc["dst_host"]) == (h1.ip, h2.ip)
    assert [p["iface"] for p in doc["points"]] == ["eth0", "eth0", "cni0"]
    for stage in ("source", "destination"):
        sent = forward(doc, stage)
        assert len(sent) == 3  # --probe-count 3
        for pkt in sent:
            assert pkt["encap"] == "vxlan" and pkt["vni"] == 1 and pkt["error"] is None
            outer = pkt["outer"]
            assert (outer["src"], outer["dst"], outer["dport"], outer["ttl"]) == (
                h1.ip, h2.ip, 8472, 64)  # fmt: skip
            inner = pkt["inner"]
            # The container sent TTL 64; its host routed it into flannel.1: 63 on the wire.
            assert inner["ttl"] == 63 and inner["proto"] == 17 and inner["dport"] == 33434
            assert outer["length"] == inner["length"] + 50  # IP + UDP + VXLAN + Ethernet
    delivered = forward(doc, "delivered")
    assert len(delivered) == 3 and all(p["outer"] is None for p in delivered)
    assert all(p["inner"]["ttl"] == 62 for p in delivered)  # routed once more on h2


def test_vxlan_never_delivered_when_the_destination_drops_8472(vxlan_lab: Lab) -> None:
    with DropOn(vxlan_lab.host_ns(2), 8472):
        code, doc = probe_trace(vxlan_lab, "--probe-count", "1")
    assert code == 3 and doc["last_seen"] == "destination" and not doc["reached_last_point"]
    assert len(forward(doc, "source")) == 1 and len(forward(doc, "destination")) == 1
    assert forward(doc, "delivered") == []
    assert "never delivered towards DST" in doc["verdict"]


def test_vxlan_human_output(vxlan_lab: Lab) -> None:
    (_, src), (_, dst) = vxlan_lab.containers()[:2]
    out = ctl(vxlan_lab, *trace_args(vxlan_lab, "--probe", "--probe-netns", src.ns,
                                     "--probe-count", "1"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "over vxlan (VNI 1, udp/8472)" in lines[0]
    assert any(f"vxlan vni 1: {src.ip}:" in line and f"> {dst.ip}:33434 udp ttl 63" in line
               for line in lines)  # fmt: skip
    assert lines[-1].startswith(f"{src.ip} -> {dst.ip}: last seen: delivered towards DST")


GARBAGE = [
    (b"", "truncated VXLAN header: 0 of 8 bytes"),
    (b"\x08\x00", "truncated VXLAN header: 2 of 8 bytes"),
    (b"\x00" * 8 + b"x" * 20, "the I flag is clear"),
    (b"\x08\x00\x00\x00\x00\x00\x01\x00" + b"\xff" * 10, "truncated Ethernet frame"),
    (b"\x08\x00\x00\x00\x00\x00\x01\x00" + b"\x02" * 12 + b"\x08\x00\x45" + b"\x00" * 5,
     "truncated IPv4 header"),
    (b"\x08\x00\x00\x00\x00\x00\x01\x00" + b"\x02" * 12 + b"\x08\x00\x43" + b"\x00" * 30,
     "bad IPv4 header length"),
]  # fmt: skip

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for hexed in sys.argv[3:]:
    s.sendto(bytes.fromhex(hexed), (sys.argv[1], int(sys.argv[2])))
"""


async def _trace_while_sending(lab: Lab, port: int, payloads: list[bytes]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "overlay.ctl", "--etcd-endpoints", lab.state.etcd_endpoint,
            "--etcd-prefix", lab.state.prefix,
            *trace_args(lab, "--json", "--timeout", "3")]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"capturing at 3 points" in line, line
        await run(sys.executable, "-c", SEND, lab.node(2).ip, str(port),
                  *(p.hex() for p in payloads), ns=lab.host_ns(1))  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 3, err  # nothing from SRC to DST: only garbage
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_garbage_on_8472_is_shown_undecodable(vxlan_lab: Lab) -> None:
    doc = asyncio.run(_trace_while_sending(vxlan_lab, 8472, [p for p, _ in GARBAGE]))
    for stage in ("source", "destination"):
        errors = [p["error"] for p in doc["packets"] if p["point"] == stage]
        assert len(errors) == len(GARBAGE)
        for error, (_, needle) in zip(errors, GARBAGE, strict=True):
            assert error is not None and needle in error
    assert doc["last_seen"] == "never"


def test_udp_probe_decoded_and_delivered(udp_lab: Lab) -> None:
    code, doc = probe_trace(udp_lab)
    h1, h2 = udp_lab.node(1), udp_lab.node(2)
    assert code == 0 and doc["last_seen"] == "delivered"
    assert (doc["encap"], doc["port"], doc["vni"]) == ("udp", 8285, None)
    for pkt in forward(doc, "source"):
        assert pkt["encap"] == "udp" and pkt["error"] is None and pkt["vni"] is None
        outer, inner = pkt["outer"], pkt["inner"]
        assert (outer["src"], outer["dst"], outer["sport"], outer["dport"]) == (
            h1.ip, h2.ip, 8285, 8285)  # fmt: skip
        assert outer["length"] == inner["length"] + 28  # the whole payload is the packet
        # Routed into flannel0 by the kernel (64 -> 63), then by the packet loop (-> 62).
        assert inner["ttl"] == 62 and inner["dport"] == 33434
    assert len(forward(doc, "source")) == 3 and len(forward(doc, "delivered")) == 3


def test_udp_never_delivered_when_the_destination_drops_8285(udp_lab: Lab) -> None:
    with DropOn(udp_lab.host_ns(2), 8285):
        code, doc = probe_trace(udp_lab, "--probe-count", "1")
    assert code == 3 and doc["last_seen"] == "destination"
    assert forward(doc, "delivered") == []


def test_garbage_on_8285_is_shown_undecodable(udp_lab: Lab) -> None:
    doc = asyncio.run(
        _trace_while_sending(udp_lab, 8285, [b"", b"\x45\x00", b"\x60" + b"\x00" * 40])
    )
    errors = [p["error"] for p in doc["packets"] if p["point"] == "source"]
    assert len(errors) == 3
    assert "truncated IPv4 header: 0 of 20" in errors[0]
    assert "truncated IPv4 header: 2 of 20" in errors[1]
    assert "not IPv4: version 6" in errors[2]


def test_trace_refuses_what_it_cannot_trace(vxlan_lab: Lab) -> None:
    (_, src), _ = vxlan_lab.containers()[:2]
    assert src.ip
    out = ctl(vxlan_lab, "trace", "10.250.0.1", src.ip, "--src-netns", vxlan_lab.host_ns(1))
    assert out.returncode == 1 and "SRC 10.250.0.1 is in no usable lease's subnet" in out.stderr
    subnet = IPv4Network(vxlan_lab.node(1).subnet or "")
    out = ctl(vxlan_lab, "trace", src.ip, str(subnet.network_address + 77))
    assert out.returncode == 1 and "never crosses the underlay" in out.stderr
    for bad in (["trace", "x", src.ip], ["trace", src.ip, src.ip, "--timeout", "0"],
                ["trace", src.ip, src.ip, "--src-netns", "../etc"]):  # fmt: skip
        assert ctl(vxlan_lab, *bad).returncode == 2
    # Not a host of the lab (this namespace holds neither public IP) and no --*-netns.
    _, (_, dst) = vxlan_lab.containers()[:2]
    assert dst.ip
    out = ctl(vxlan_lab, "trace", src.ip, dst.ip)
    assert out.returncode == 1 and "this host is neither SRC's host" in out.stderr


async def _remote_routes(lab: Lab, index: int) -> set[str]:
    routes = await ip_json("-4", "route", "show", ns=lab.host_ns(index))
    return {r["dst"] for r in routes if r.get("dst", "").startswith("10.")}


def test_revoke_a_stopped_hosts_lease_and_the_other_drops_its_routes(vxlan_lab: Lab) -> None:
    """Last in the module: h2 stops, its lease is revoked, h1 drops its route; h2 restarts."""
    h2 = vxlan_lab.node(2)
    subnet = h2.subnet
    assert subnet is not None
    assert subnet in asyncio.run(_remote_routes(vxlan_lab, 1))
    data = asyncio.run(vxlan_lab.leases())[IPv4Network(subnet)].attrs.backend_data or {}
    mac = data["VtepMAC"]
    asyncio.run(vxlan_lab.stop_daemon(2))
    try:
        # Stopped a moment ago, its lease still has nearly 24 h: it looks alive.
        out = ctl(vxlan_lab, "leases", "revoke", subnet)
        assert out.returncode == 1 and "looks alive" in out.stderr
        assert f"{h2.ip} (backend vxlan, VtepMAC {mac})" in out.stderr
        out = ctl(vxlan_lab, "leases", "revoke", subnet, "--force")
        assert out.returncode == 0, out.stderr
        assert f"revoked {subnet} (--force): it was the lease of {h2.ip}" in out.stdout

        async def dropped() -> bool:
            return subnet not in await _remote_routes(vxlan_lab, 1)

        asyncio.run(eventually(dropped, f"h1 removed its route to {subnet}"))
        assert IPv4Network(subnet) not in asyncio.run(vxlan_lab.leases())
    finally:
        asyncio.run(vxlan_lab.start_daemon(2))

"""overlay/doctor.py without a lab: the parsers and codecs (properties), the pure checks, the
CNI state check on files made here, and the ICMP probe against this namespace's loopback."""

from __future__ import annotations

import json
import struct
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.doctor import (
    FAIL,
    PASS,
    Check,
    SavedConf,
    arp_request,
    check_duplicates,
    check_ip_forward,
    check_renewals,
    echo_request,
    forward_drop_chains,
    icmp_checksum,
    overdue,
    parse_arp_reply,
    parse_echo_reply,
    parse_forward,
    parse_ip_file,
    parse_saved_conf,
    ping,
    renewal_point,
)
from overlay.status import EtcdView
from subnetmgr.model import NO_IPV4, Lease, LeaseAttrs
from tests.netns import NetnsLab, netns_lab

lab = pytest.fixture(netns_lab, name="lab")
NET = IPv4Network("10.1.0.0/16")
addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
networks = st.builds(
    lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)


# --------------------------------------------------------------------------- forward rules


@given(
    st.sampled_from(["ACCEPT", "DROP", "REJECT"]),
    st.booleans(),
    st.lists(st.tuples(st.sampled_from(["-s", "-d"]), networks | st.just(NET)), max_size=4),
    st.lists(st.from_regex(r"-A FORWARD -[a-z] [ -~]{0,20}", fullmatch=True), max_size=3),
)
def test_parse_forward(
    policy: str, jump: bool, rules: list[tuple[str, IPv4Network]], noise: list[str]
) -> None:
    forward = [f"-P FORWARD {policy}", *noise]
    if jump:
        forward.append('-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD')
    chain = ["-N FLANNEL-FWD"] + [
        f'-A FLANNEL-FWD {flag} {net} -m comment --comment "flanneld forward" -j ACCEPT'
        for flag, net in rules
    ]
    got = parse_forward("\n".join(forward), "\n".join(chain), NET)
    assert got.policy == policy
    assert got.jump == jump
    assert got.accepts == ({f for f, n in rules if n == NET} == {"-s", "-d"})


def test_parse_forward_of_ip6tables_for_an_ipv6_network() -> None:
    net6 = IPv6Network("fd10:1::/48")
    chain = "\n".join(
        f'-A FLANNEL-FWD {flag} {net6} -m comment --comment "flanneld forward" -j ACCEPT'
        for flag in ("-s", "-d")
    )
    forward = "-P FORWARD DROP\n-A FORWARD -j FLANNEL-FWD"
    assert parse_forward(forward, chain, net6).accepts
    assert not parse_forward(forward, chain, NET).accepts  # the IPv4 network is not accepted


def test_check_ip_forward_ipv6(tmp_path: Path) -> None:
    f = tmp_path / "forwarding"
    f.write_text("0\n")
    c = check_ip_forward(f, ipv6=True)
    assert c.result == FAIL and c.message.startswith("net.ipv6.conf.all.forwarding = 0:")
    assert c.fix.startswith("sysctl -w net.ipv6.conf.all.forwarding=1")
    f.write_text("1\n")
    assert check_ip_forward(f, ipv6=True).message == "net.ipv6.conf.all.forwarding = 1"


@given(st.text(max_size=300), st.text(max_size=300))
def test_parse_forward_any_text(forward: str, chain: str) -> None:
    got = parse_forward(forward, chain, NET)
    assert got.policy is None or isinstance(got.policy, str)
    assert isinstance(got.jump, bool) and isinstance(got.accepts, bool)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)


@given(json_values)
def test_forward_drop_chains_any_json(doc: object) -> None:
    assert all(isinstance(x, str) for x in forward_drop_chains(doc))


def test_forward_drop_chains_names_drops_but_not_iptables_own() -> None:
    doc = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "chain": {
                    "family": "ip",
                    "table": "filter",
                    "name": "FORWARD",
                    "hook": "forward",
                    "policy": "drop",
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "fw",
                    "name": "fwd",
                    "hook": "forward",
                    "policy": "drop",
                }
            },
            {
                "chain": {
                    "family": "ip",
                    "table": "flannel-ipv4",
                    "name": "forward",
                    "hook": "forward",
                    "policy": "accept",
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "fw",
                    "name": "in",
                    "hook": "input",
                    "policy": "drop",
                }
            },
        ]
    }
    assert forward_drop_chains(doc) == ["inet fw fwd"]


# --------------------------------------------------------------------------- ICMP and ARP


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_echo_request_checksum(ident: int, seq: int, payload: bytes) -> None:
    packet = echo_request(ident, seq, payload)
    assert icmp_checksum(packet) == 0  # a packet with its checksum sums to 0
    assert struct.unpack_from("!BBxxHH", packet) == (8, 0, ident, seq)


def ip_packet(
    src: IPv4Address, dst: IPv4Address, payload: bytes, proto: int = 1, options: bytes = b""
) -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(options) + len(payload),
        0,
        0,
        64,
        proto,
        0,
        src.packed,
        dst.packed,
    )
    return head + options + payload


@given(
    addresses, addresses, st.integers(0, 0xFFFF), st.sampled_from([b"", b"\x01" * 4, b"\x01" * 8])
)
def test_echo_reply_round_trip(
    src: IPv4Address, dst: IPv4Address, ident: int, options: bytes
) -> None:
    reply = b"\x00" + echo_request(ident, 1)[1:]  # type 0: echo reply
    assert parse_echo_reply(ip_packet(src, dst, reply, options=options)) == (src, ident)
    assert parse_echo_reply(ip_packet(src, dst, echo_request(ident, 1), options=options)) is None
    assert parse_echo_reply(ip_packet(src, dst, reply, proto=17)) is None


@given(st.binary(max_size=80))
def test_echo_reply_any_bytes(data: bytes) -> None:
    got = parse_echo_reply(data)
    assert got is None or (isinstance(got[0], IPv4Address) and 0 <= got[1] <= 0xFFFF)


@given(st.binary(min_size=6, max_size=6), addresses, addresses, st.binary(min_size=6, max_size=6))
def test_arp_request_answered(
    mac: bytes, own: IPv4Address, target: IPv4Address, their_mac: bytes
) -> None:
    request = arp_request(mac, own, target)
    assert len(request) == 42 and request[:6] == b"\xff" * 6
    assert parse_arp_reply(request) is None  # a request is not an answer
    # The answer the target's kernel sends: op 2, its MAC and address as the sender.
    reply = (
        mac
        + their_mac
        + b"\x08\x06"
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
        + their_mac
        + target.packed
        + mac
        + own.packed
    )
    assert parse_arp_reply(reply) == target


@given(st.binary(max_size=80))
def test_arp_reply_any_bytes(data: bytes) -> None:
    got = parse_arp_reply(data)
    assert got is None or isinstance(got, IPv4Address)


@pytest.mark.root
async def test_ping_loopback_answers() -> None:
    """The probe's ICMP codec against a real kernel: this namespace answers on all of 127/8,
    and each reply is matched to its target on the one socket."""
    targets = [IPv4Address(f"127.0.0.{i}") for i in range(1, 40)]
    rtts = await ping(None, targets, 2.0)
    assert sorted(rtts) == targets
    assert all(r is not None and r >= 0 for r in rtts.values())


PING_IN_NS = """
import asyncio, json, sys
from ipaddress import IPv4Address
from overlay.doctor import ping
rtts = asyncio.run(ping(None, [IPv4Address(a) for a in sys.argv[1:]], 1.0))
print(json.dumps({str(k): v for k, v in rtts.items()}))
"""


@pytest.mark.root
def test_ping_some_answer_some_do_not(lab: NetnsLab) -> None:
    """In a throwaway namespace with loopback only: 127.0.0.1 answers; 10.77.0.2, routed onto
    lo but nobody's address, never does; 10.78.0.1 has no route at all. Bounded by the limit."""
    ns = lab.netns("ping")
    ns.ip("route", "add", "10.77.0.0/24", "dev", "lo")
    out = ns.run(sys.executable, "-c", PING_IN_NS, "127.0.0.1", "10.77.0.2", "10.78.0.1")
    got = json.loads(out)
    assert got["127.0.0.1"] is not None
    assert got["10.77.0.2"] is None and got["10.78.0.1"] is None


@pytest.mark.root
async def test_ping_from_an_address_we_do_not_have() -> None:
    with pytest.raises(OSError):
        await ping(IPv4Address("192.0.2.1"), [IPv4Address("127.0.0.1")], 0.5)


# --------------------------------------------------------------------------- pure checks


def test_check_ip_forward(tmp_path: Path) -> None:
    f = tmp_path / "ip_forward"
    f.write_text("1\n")
    assert check_ip_forward(f).result == PASS
    f.write_text("0\n")
    c = check_ip_forward(f)
    assert c.result == FAIL and c.fix.startswith("sysctl -w net.ipv4.ip_forward=1")
    assert c.line().startswith("FAIL ip_forward: net.ipv4.ip_forward = 0:")
    assert " -- fix: sysctl -w" in c.line()
    c = check_ip_forward(tmp_path / "missing")
    assert c.result == FAIL and "cannot read" in c.message


def test_a_passing_line_shows_no_fix() -> None:
    assert Check("x", PASS, "fine", "do nothing").line() == "PASS x: fine"


@given(st.integers(1, 10**7), st.integers(0, 24 * 60))
def test_renewal_point_is_inside_the_ttl(granted: int, margin: int) -> None:
    point = renewal_point(granted, margin)
    assert 0 <= point < granted  # margin 0: renewed as it expires
    assert point == (margin * 60 if margin * 60 < granted else granted / 2)


@given(st.integers(1, 10**7), st.integers(0, 24 * 60), st.floats(0, 1))
def test_a_live_host_is_never_overdue(granted: int, margin: int, fraction: float) -> None:
    """A host renews when its time left reaches the renewal point: any time left from there up
    to the full TTL is a live host's; below, minus the slack, a dead one's."""
    point = renewal_point(granted, margin)
    left = int(point + (granted - point) * fraction + 0.999)
    assert not overdue(min(left, granted), granted, margin)
    assert overdue(-1, granted, margin)
    if point > 70:  # the slack is at most 60 s
        assert overdue(int(point - 61), granted, margin)


def lease(subnet: str, ip: str, revision: int) -> Lease:
    return Lease(
        IPv4Network(subnet),
        LeaseAttrs(IPv4Address(ip), backend_type="vxlan"),
        expiration=None,
        create_revision=revision,
    )


def test_check_duplicates() -> None:
    a, b, c = (
        lease("10.1.1.0/24", "192.0.2.1", 5),
        lease("10.1.2.0/24", "192.0.2.2", 6),
        lease("10.1.3.0/24", "192.0.2.1", 9),
    )
    assert check_duplicates([a, b], "/p").result == PASS
    got = check_duplicates([a, b, c], "/p")
    assert got.result == FAIL
    assert got.message == "192.0.2.1 holds 10.1.1.0/24, 10.1.3.0/24"
    assert got.fix.endswith("etcdctl del /p/subnets/10.1.3.0-24")


def v6_lease(subnet: str, ip6: str, revision: int, ip4: str | None = None) -> Lease:
    """An IPv6-only lease (key 0.0.0.0-0&...), or a dual-stack one with `ip4`."""
    sub4 = NO_IPV4 if ip4 is None else IPv4Network(f"10.1.{revision}.0/24")
    attrs = LeaseAttrs(IPv4Address(ip4 or "0.0.0.0"), IPv6Address(ip6), "vxlan")
    return Lease(sub4, attrs, IPv6Network(subnet), None, revision)


def test_check_duplicates_with_ipv6_only_leases() -> None:
    """IPv6-only leases all say PublicIP 0.0.0.0: their host is their PublicIPv6."""
    a, b, c = (
        v6_lease("fd00:1:0:5::/64", "fd00::5", 5),
        v6_lease("fd00:1:0:6::/64", "fd00::6", 6),
        v6_lease("fd00:1:0:7::/64", "fd00::5", 7),
    )
    dual = v6_lease("fd00:1:0:8::/64", "fd00::5", 8, "192.0.2.1")  # its host is 192.0.2.1
    assert check_duplicates([a, b, dual, lease("10.1.3.0/24", "192.0.2.3", 9)], "/p").result == PASS
    got = check_duplicates([c, dual, a, b, lease("10.1.3.0/24", "192.0.2.1", 9)], "/p")
    assert got.result == FAIL
    assert got.message == (
        "192.0.2.1 holds 10.1.3.0/24, 10.1.8.0/24; fd00::5 holds fd00:1:0:5::/64, fd00:1:0:7::/64"
    )
    assert "0.0.0.0" not in got.message


def test_check_renewals() -> None:
    live, dead, reserved = (
        lease("10.1.1.0/24", "192.0.2.1", 1),
        lease("10.1.2.0/24", "192.0.2.2", 2),
        lease("10.1.3.0/24", "192.0.2.3", 3),
    )
    view = EtcdView("http://e:2379", reachable=True, leases=[live, dead, reserved])
    view.lease_ids = {live.key: 7, dead.key: 8, reserved.key: 0}
    view.ttls = {7: (86000, 86400), 8: (3000, 86400)}
    got = check_renewals(view, 60, "/p")
    assert got.result == FAIL
    assert got.message == (
        "never renewed, host dead or cut off from etcd: 10.1.2.0/24 of "
        "192.0.2.2: 3000 s left of 86400 s, renewal was due at 3600 s left"
    )
    view.ttls[8] = (3580, 86400)  # within the slack of the renewal point: may be renewing now
    assert check_renewals(view, 60, "/p").result == PASS
    v6 = v6_lease("fd00:1:0:5::/64", "fd00::5", 4)
    view.leases.append(v6)
    view.lease_ids[v6.key] = 9
    view.ttls[9] = (100, 86400)
    got = check_renewals(view, 60, "/p")
    assert got.message.endswith(": fd00:1:0:5::/64 of fd00::5: 100 s left of 86400 s, renewal "
                                "was due at 3600 s left")  # fmt: skip
    assert got.fix == (
        "check overlayd on fd00::5; if that host is gone, free its subnet: "
        "etcdctl del '/p/subnets/0.0.0.0-0&fd00:1:0:5::-64'"  # quoted: & is the shell's
    )


# --------------------------------------------------------------------------- CNI state


def saved(cid: str, ifname: str, ipam_dir: Path, **extra: object) -> bytes:
    doc = {
        "cniVersion": "1.0.0",
        "name": "net1",
        "type": "bridge",
        "ipam": {
            "type": "host-local",
            "dataDir": str(ipam_dir),
            "ranges": [[{"subnet": "10.1.5.0/24"}]],
        },
        "overlay.attachment": {"containerID": cid, "ifname": ifname},
        **extra,
    }
    return json.dumps(doc).encode()


def test_parse_saved_conf_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "abc-eth0"
    got = parse_saved_conf(path, saved("abc", "eth0", tmp_path / "ipam", bridge="br7"))
    assert got == SavedConf(path, "abc", "eth0", "net1", "br7", tmp_path / "ipam" / "net1")
    # flannel's own layout: named by container ID, no attachment key, default host-local dir.
    doc = {"name": "cbr0", "type": "bridge", "ipam": {"type": "host-local"}}
    got = parse_saved_conf(tmp_path / "c0ffee", json.dumps(doc).encode())
    assert got == SavedConf(
        tmp_path / "c0ffee", "c0ffee", None, "cbr0", "cni0", Path("/var/lib/cni/networks/cbr0")
    )


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[" * 100_000, "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"name": "../../etc", "type": "bridge"}).encode(), "no valid network name"),
        (json.dumps({"name": "n", "bridge": "a" * 16}).encode(), "no valid bridge name"),
        (
            json.dumps({"name": "n", "overlay.attachment": {"containerID": "../x"}}).encode(),
            "its attachment names no valid container ID",
        ),
        (
            json.dumps({"name": "n", "ipam": {"type": "host-local", "dataDir": "rel"}}).encode(),
            "ipam.dataDir is not an absolute path",
        ),
        (b" " * (3 << 20), "larger than"),
    ],
)
def test_parse_saved_conf_hostile(tmp_path: Path, data: bytes, why: str) -> None:
    got = parse_saved_conf(tmp_path / "x", data)
    assert isinstance(got, str) and got.startswith(why)


@given(st.binary(max_size=200))
def test_parse_saved_conf_any_bytes(data: bytes) -> None:
    got = parse_saved_conf(Path("/d/x"), data)
    if isinstance(got, SavedConf):
        for part in (got.container_id, got.network, got.bridge):
            assert part and "/" not in part and part not in (".", "..")


@given(
    st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True).filter(lambda s: s not in (".", "..")),
    st.sampled_from(["eth0", "net1", None]),
    st.sampled_from(["\r\n", "\n"]),
)
def test_parse_ip_file_round_trip(cid: str, ifname: str | None, sep: str) -> None:
    data = (cid + (f"{sep}{ifname}" if ifname else "")).encode()
    assert parse_ip_file(data) == (cid, ifname)


@given(st.binary(max_size=100))
def test_parse_ip_file_any_bytes(data: bytes) -> None:
    got = parse_ip_file(data)
    assert got is None or ("/" not in got[0] and got[0])


async def test_check_cni_without_probing(tmp_path: Path) -> None:
    """The CNI check's file logic: a conf without an address, an address outside our subnet,
    an address without a conf; unreadable files are reported, not fatal. (ARP on a live bridge:
    tests/test_doctor_lab.py.)"""
    from overlay.doctor import Host, check_cni
    from overlay.subnetenv import SubnetEnv

    data, ipam = tmp_path / "flannel", tmp_path / "ipam"
    (ipam / "net1").mkdir(parents=True)
    data.mkdir()
    (data / ".lock").write_text("")
    (data / "gone-eth0").write_bytes(saved("gone", "eth0", ipam))
    (data / "moved-eth0").write_bytes(saved("moved", "eth0", ipam))
    (data / "junk").write_bytes(b"\x00" * 10)
    (ipam / "net1" / "10.9.0.2").write_text("moved\r\neth0")
    (ipam / "net1" / "10.1.5.9").write_text("leaked\r\neth0")
    (ipam / "net1" / "last_reserved_ip.0").write_text("10.1.5.9")
    env = SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.5.0/24"), 1450, True)
    host = Host({}, EtcdView("e"), None, None, {}, None, env)
    got = await check_cni(host, data)
    assert got.result == FAIL
    assert got.message.startswith("4 stale: ")
    for part in (
        "gone-eth0: host-local holds no address for container gone",
        "junk: unreadable saved conf: not JSON",
        "moved-eth0: its address 10.9.0.2 is outside our subnet 10.1.5.0/24",
        "10.1.5.9: host-local address 10.1.5.9 of container leaked, which has no saved conf",
    ):
        assert part in got.message
    assert got.fix.startswith("the runtime never ran CNI DEL for these")
    for path in (data / "junk", data / "gone-eth0", data / "moved-eth0", ipam / "net1/10.1.5.9"):
        assert f" {path}" in got.fix.split(": rm -f", 1)[1]
    missing = await check_cni(host, tmp_path / "nothing")
    assert missing.result == PASS and "does not exist" in missing.message


@given(json_values)
def test_conf_data_dir_any_json(doc: object) -> None:
    from overlay.doctor import conf_data_dir

    got = conf_data_dir(json.dumps(doc).encode())
    assert got is None or got.is_absolute()


def test_flannel_data_dir(tmp_path: Path) -> None:
    from overlay.doctor import DEFAULT_CNI_DATA_DIR, conf_data_dir, flannel_data_dir

    assert flannel_data_dir(tmp_path / "missing") == DEFAULT_CNI_DATA_DIR
    (tmp_path / "05-other.conflist").write_text(json.dumps({"plugins": [{"type": "bridge"}]}))
    assert flannel_data_dir(tmp_path) == DEFAULT_CNI_DATA_DIR
    (tmp_path / "10-flannel.conf").write_text(
        json.dumps({"type": "flannel", "dataDir": "/srv/cni"})
    )
    (tmp_path / "20-flannel.conflist").write_text(json.dumps({"plugins": [{"type": "flannel"}]}))
    assert flannel_data_dir(tmp_path) == Path("/srv/cni")  # the first in file name order
    assert (
        conf_data_dir(json.dumps({"plugins": [{"type": "flannel"}]}).encode())
        == DEFAULT_CNI_DATA_DIR
    )
    assert (
        conf_data_dir(json.dumps({"type": "flannel", "dataDir": "rel"}).encode())
        == DEFAULT_CNI_DATA_DIR
    )
    assert conf_data_dir(b"[" * 100_000) is None


def test_daemon_argv_and_flags() -> None:
    from overlay.status import daemon_argv, parse_daemon_flags

    assert daemon_argv(["/usr/bin/python3", "-m", "overlay.daemon", "--iface", "eth0"]) == [
        "--iface",
        "eth0",
    ]
    assert daemon_argv(["/opt/overlay/bin/overlayd", "--healthz-port", "9"]) == [
        "--healthz-port",
        "9",
    ]
    assert daemon_argv(["python3", "/opt/overlay/bin/overlayd"]) == []
    assert daemon_argv(["bash", "-c", "overlayd"]) is None
    assert daemon_argv(["python3", "overlay.daemon"]) is None
    values = parse_daemon_flags(
        ["--healthz-port", "8286", "--etcd-prefix", "/x"], {"FLANNELD_SUBNET_FILE": "/run/f/s.env"}
    )
    assert values is not None
    assert values["healthz_port"] == 8286 and values["etcd_prefix"] == "/x"
    assert values["subnet_file"] == Path("/run/f/s.env")
    assert parse_daemon_flags(["--healthz-port", "99999"], {}) is None  # overlayd refuses it
    assert parse_daemon_flags([], {"FLANNELD_HEALTHZ_PORT": "x"}) is None


@given(
    st.lists(st.text(max_size=20) | st.sampled_from(["--healthz-port", "--iface", "-m",
                                                     "overlay.daemon", "--etcd-prefix"]),
             max_size=8),
    st.dictionaries(st.sampled_from(["FLANNELD_HEALTHZ_PORT", "FLANNELD_SUBNET_FILE",
                                     "FLANNELD_ETCD_ENDPOINTS"]), st.text(max_size=20),
                    max_size=3),
)  # fmt: skip
def test_daemon_flags_from_any_proc_contents(argv: list[str], environ: dict[str, str]) -> None:
    """Whatever another process's argv and environment hold: overlayd's flags as overlayd
    would read them (every flag present, each of its type), or None."""
    from overlay.options import DAEMON_FLAGS, ETCD_FLAGS
    from overlay.status import daemon_argv, parse_daemon_flags

    flags = daemon_argv(["python3", "-m", "overlay.daemon", *argv])
    assert flags == argv
    values = parse_daemon_flags(argv, environ)
    if values is not None:
        assert set(values) == {f.dest for f in ETCD_FLAGS + DAEMON_FLAGS}
        assert isinstance(values["healthz_port"], int) and 0 <= values["healthz_port"] <= 65535
        assert isinstance(values["subnet_file"], Path)


def test_subnet_env_of_an_ipv6_only_host() -> None:
    """An IPv6-only host's subnet.env has the IPv6 pair alone; it matches its lease
    `0.0.0.0-0&<v6>`, and a wrong IPv6 subnet or a stray IPv4 pair is named."""
    from overlay.doctor import Host, check_subnet_env
    from overlay.subnetenv import SubnetEnv
    from subnetmgr.model import NetworkConfig

    config = NetworkConfig.from_dict(
        {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:1::/48"}
    )
    net6, sub6 = IPv6Network("fd00:1::/48"), IPv6Network("fd00:1:0:5::/64")
    lease = Lease(NO_IPV4, LeaseAttrs(IPv4Address(0), IPv6Address("fd99::5")), sub6)
    local = {"subnet_file": "/run/flannel/subnet.env"}

    def check(env: SubnetEnv) -> tuple[str, str]:
        got = check_subnet_env(Host(local, EtcdView("e"), config, lease, {}, None, env))
        return got.result, got.message

    assert check(SubnetEnv(None, None, 1430, True, net6, sub6)) == (
        PASS,
        "/run/flannel/subnet.env matches our lease fd00:1:0:5::/64",
    )
    result, message = check(SubnetEnv(None, None, 1430, True, net6, IPv6Network("fd00:1:0:6::/64")))
    assert result == FAIL
    assert (
        "FLANNEL_IPV6_SUBNET is fd00:1:0:6::/64, our lease's IPv6 subnet is fd00:1:0:5::/64"
        in message
    )
    stray = SubnetEnv(
        IPv4Network("10.1.0.0/16"), IPv4Network("10.1.5.0/24"), 1430, True, net6, sub6
    )
    result, message = check(stray)
    assert result == FAIL and "FLANNEL_SUBNET is 10.1.5.1/24" in message

"""The raw netlink client's IPv6 dumps against iproute2, in a namespace made here.

A vxlan device over IPv6 (as flannel-v6.N) and one over IPv4 get a few hundred entries of each
kind (so dumps span several datagrams) plus entries the IPv6 readers must leave out (IPv4
neighbours and FDB destinations, other devices, other tables, routes that are not unicast);
what `neighbours6()`, `fdb6()` and `routes6()` read must be exactly what `ip -j -6 neigh`,
`bridge -j fdb` and `ip -j -6 route` print. Writes then go through `apply()` and are read back
with iproute2.
"""

from __future__ import annotations

import asyncio
import errno
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from backends import netlink as nl
from backends.ipv6 import V6Pass, V6Peer
from backends.links import LinkClient
from tests.netns import Netns, NetnsLab, netns_lab

pytestmark = pytest.mark.root

lab = pytest.fixture(netns_lab, name="lab")

N = 300


def batch(ns: Netns, tmp_path: Path, name: str, lines: list[str], tool: str = "ip") -> None:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    ns.run(tool, "-batch", str(path))


def mac(i: int, last: int) -> str:
    return f"02:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}:{last:02x}"


def populate(ns: Netns, tmp_path: Path) -> tuple[int, int, int]:
    ns.ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum1")  # no dummy module here
    ns.ip("link", "set", "dum1", "up")
    ns.ip("addr", "add", "fd99::1/64", "dev", "dum0", "nodad")
    ns.ip("addr", "add", "10.99.0.1/24", "dev", "dum0")
    ns.ip("link", "set", "dum0", "up")
    ns.ip("link", "add", "vx6", "type", "vxlan", "id", "42", "local", "fd99::1", "dstport",
          "4789", "nolearning")  # fmt: skip
    ns.ip("link", "add", "vx4", "type", "vxlan", "id", "43", "local", "10.99.0.1", "dstport",
          "4790", "nolearning")  # fmt: skip
    ns.ip("link", "set", "vx6", "up")
    ns.ip("link", "set", "vx4", "up")
    neigh = [f"neigh replace fd00:1:0:{i:x}:: lladdr {mac(i, 6)} dev vx6 nud permanent"
             for i in range(N)]  # fmt: skip
    neigh += [
        "neigh replace fd00:2::1 lladdr 02:00:00:00:00:aa dev vx6 nud stale",
        "neigh replace fd00:2::2 lladdr 02:00:00:00:00:bb dev vx6 nud reachable",
        "neigh replace 10.5.0.1 lladdr 02:00:00:00:00:cc dev vx6 nud permanent",
        "neigh replace fd99::7 lladdr 02:00:00:00:00:dd dev dum0 nud permanent",
        "neigh replace 10.5.1.0 lladdr 02:00:00:00:00:ee dev vx4 nud permanent",
    ]
    batch(ns, tmp_path, "neigh", neigh)
    fdb = [f"fdb append {mac(i, 6)} dst fd99::{i + 10:x} dev vx6 self permanent"
           for i in range(N)]  # fmt: skip
    fdb += [
        "fdb append 02:00:00:00:00:01 dst fd99::a1 dev vx6 self permanent",
        "fdb append 00:00:00:00:00:00 dst fd99::fe dev vx6 self permanent",  # two remotes
        "fdb append 00:00:00:00:00:00 dst fd99::ff dev vx6 self permanent",
        "fdb append 02:00:00:00:00:04 dst 10.99.0.4 dev vx4 self permanent",
    ]
    batch(ns, tmp_path, "fdb", fdb, tool="bridge")
    routes = [f"route replace fd00:1:0:{i:x}::/64 via fd00:1:0:{i:x}:: dev vx6 onlink"
              for i in range(N)]  # fmt: skip
    routes += [f"route replace fd00:a:{i:x}::/48 via fd99::2 dev dum0 proto 77 metric {i}"
               for i in range(N)]  # fmt: skip
    routes += [
        "route add fd00:a:0::/48 via fd99::3 dev dum0 metric 2000",  # a second route, one dst
        "route add fd00:b::5/128 dev dum0",
        "route add default via fd99::fe dev dum0 proto static",
        "route add unreachable fd00:dead::/32",
        "route add blackhole fd00:beef::/32",
        "route add fd00:c::/64 via fd99::2 dev dum0 table 100",
        "route add 10.6.0.0/16 via 10.99.0.2 dev dum0",
    ]
    batch(ns, tmp_path, "routes", routes)
    return ns.ifindex("vx6"), ns.ifindex("vx4"), ns.ifindex("dum0")


def ip_net(text: str) -> IPv6Network:
    return IPv6Network("::/0" if text == "default" else text)


def ip_routes(ns: Netns, indexes: dict[str, int], table: str) -> set[tuple[Any, ...]]:
    out = set()
    for r in ns.ip_json("-N", "-6", "route", "show", "table", table):
        if r.get("type", "unicast") != "unicast":
            continue
        gw = r.get("gateway")
        out.add((
            ip_net(r["dst"]),
            IPv6Address(gw) if gw else None,
            indexes[r["dev"]] if "dev" in r else None,
            int(r.get("protocol", nl.RTPROT_BOOT)),  # ip leaves out "boot"
            r.get("metric"),
            "onlink" in r.get("flags", []),
        ))  # fmt: skip
    return out


def our_routes(routes: list[nl.Route6]) -> set[tuple[Any, ...]]:
    return {
        (r.dst, r.gateway, r.oif, r.protocol, r.priority, r.onlink)
        for r in routes
        if r.type == nl.RTN_UNICAST
    }


async def test_ipv6_dumps_read_what_iproute2_shows(lab: NetnsLab, tmp_path: Path) -> None:
    ns = lab.netns("nl6")
    vx6, vx4, dum = populate(ns, tmp_path)
    indexes = {link["ifname"]: link["ifindex"] for link in ns.ip_json("link", "show")}
    async with nl.RtnlSocket(ns.name) as sock:
        # Neighbours: every IPv6 entry of the device, whatever its state (`nud all`: with the
        # kernel's own NOARP multicast entries), and only those. The neighbour table is shared
        # by all namespaces: the kernel may collect a stale entry between the two reads when
        # other work fills it, so they are compared until two reads agree (a misread never does).
        async def neigh_pair(dev: str, index: int) -> tuple[set[Any], set[Any]]:
            got: set[Any] = set()
            shown: set[Any] = set()
            for _ in range(5):
                got = {(n.dst, n.lladdr, n.permanent, n.ifindex)
                       for n in await sock.neighbours6(index)}  # fmt: skip
                shown = {
                    (IPv6Address(e["dst"]), e.get("lladdr"), "PERMANENT" in e["state"], index)
                    for e in ns.ip_json("-6", "neigh", "show", "dev", dev, "nud", "all")
                }
                if got == shown:
                    break
                await asyncio.sleep(0.2)
            return got, shown

        got_neigh, shown_neigh = await neigh_pair("vx6", vx6)
        assert got_neigh == shown_neigh
        permanent = {n for n in got_neigh if n[2]}
        assert len(permanent) == N and all(n[0] in IPv6Network("fd00:1::/32") for n in permanent)
        got_dum, shown_dum = await neigh_pair("dum0", dum)
        assert got_dum == shown_dum
        assert (IPv6Address("fd99::7"), "02:00:00:00:00:dd", True, dum) in got_dum
        got_vx4, shown_vx4 = await neigh_pair("vx4", vx4)  # its IPv4 entry is not read
        assert got_vx4 == shown_vx4

        # FDB: the entries with an IPv6 destination (each remote of a MAC) or none.
        got_fdb = await sock.fdb6(vx6)
        shown = ns.bridge_json("fdb", "show", "dev", "vx6")
        want = {
            (e["mac"], IPv6Address(e["dst"]) if "dst" in e else None, "permanent" in e["state"])
            for e in shown
            if "dst" not in e or ":" in e["dst"]
        }
        assert {(e.lladdr, e.dst, bool(e.state & nl.NUD_PERMANENT)) for e in got_fdb} == want
        assert len([e for e in got_fdb if e.dst is not None]) == N + 3
        assert {e.dst for e in got_fdb if e.lladdr == "00:00:00:00:00:00"} == {
            IPv6Address("fd99::fe"),
            IPv6Address("fd99::ff"),
        }
        shown4 = ns.bridge_json("fdb", "show", "dev", "vx4")
        assert {e.lladdr for e in await sock.fdb6(vx4)} == {
            e["mac"] for e in shown4 if "dst" not in e
        }
        assert "02:00:00:00:00:04" not in {e.lladdr for e in await sock.fdb6(vx4)}

        # Routes: the main table's unicast routes exactly as ip shows them; table 100 apart.
        main = await sock.routes6()
        assert our_routes(main) == ip_routes(ns, indexes, "main")
        assert len([r for r in main if r.oif == vx6 and r.onlink]) == N
        types = {r.dst: r.type for r in main}
        assert types[IPv6Network("fd00:dead::/32")] == 7  # RTN_UNREACHABLE
        assert types[IPv6Network("fd00:beef::/32")] == 6  # RTN_BLACKHOLE
        assert not any(r.dst == IPv6Network("fd00:c::/64") for r in main)
        assert our_routes(await sock.routes6(100)) == ip_routes(ns, indexes, "100")
        assert all(r.table == 254 for r in main)


async def test_ipv6_writes_read_back_through_iproute2(lab: NetnsLab, tmp_path: Path) -> None:
    ns = lab.netns("nl6w")
    vx6, _vx4, dum = populate(ns, tmp_path)
    peer = IPv6Network("fd00:7::/64")
    async with nl.RtnlSocket(ns.name) as sock:
        result = await sock.apply([
            nl.neigh_replace(vx6, peer.network_address, "02:00:00:00:07:06"),
            nl.fdb_replace(vx6, "02:00:00:00:07:06", IPv6Address("fd98::77")),
            nl.route_replace(peer, peer.network_address, vx6, onlink=True, protocol=3),
        ])  # fmt: skip
        assert result.failed == [] and result.sent == 3
        neigh = ns.ip_json("-6", "neigh", "show", "fd00:7::", "dev", "vx6")
        assert [(e["lladdr"], e["state"]) for e in neigh] == [("02:00:00:00:07:06", ["PERMANENT"])]
        fdb = [e for e in ns.bridge_json("fdb", "show", "dev", "vx6")
               if e["mac"] == "02:00:00:00:07:06"]  # fmt: skip
        assert [(e.get("dst"), e["state"]) for e in fdb] == [("fd98::77", "permanent")]
        shown = ns.ip_json("-N", "-6", "route", "show", "fd00:7::/64")
        assert [(r["gateway"], r["dev"], r.get("protocol", "3"), r["flags"]) for r in shown] == [
            ("fd00:7::", "vx6", "3", ["onlink"])
        ]
        assert (peer, peer.network_address, vx6, 3, 1024, True) in our_routes(await sock.routes6())

        # A route read from the dump is deleted exactly: of two routes to one destination
        # (metrics 1024, which "metric 0" means in IPv6, and 2000), only the one named goes.
        two = [r for r in await sock.routes6() if r.dst == IPv6Network("fd00:a::/48")]
        assert sorted(r.priority or 0 for r in two) == [1024, 2000]
        second = next(r for r in two if r.priority == 2000)
        assert (await sock.apply([nl.route_delete(second)])).failed == []
        left = ns.ip_json("-6", "route", "show", "fd00:a::/48")
        assert [(r["gateway"], r.get("metric")) for r in left] == [("fd99::2", 1024)]
        # Deletes: each applied once; one of an entry already gone is refused (ESRCH for a
        # route, ENOENT for a neighbour), which a pass does not count as a failure.
        gone_route = nl.route_delete(second)
        neigh_del = [nl.neigh_delete(vx6, IPv6Address("fd00:7::")) for _ in range(2)]
        fdb_del = nl.fdb_delete(vx6, "02:00:00:00:07:06", IPv6Address("fd98::77"))
        again = await sock.apply([gone_route, *neigh_del, fdb_del])
        assert again.failed == [(gone_route, errno.ESRCH), (neigh_del[1], errno.ENOENT)]
        assert ns.ip_json("-6", "neigh", "show", "fd00:7::", "dev", "vx6") == []
        assert IPv6Address("fd98::77") not in {e.dst for e in await sock.fdb6(vx6)}
        assert dum in {r.oif for r in await sock.routes6()}


async def test_v6pass_full_pass_fixes_every_kind_of_damage_in_one_batch(lab: NetnsLab) -> None:
    """V6Pass's full pass (now read and written through the raw client): wrong, stale and
    duplicate entries on the vxlan device and the external interface are fixed in one pass,
    including a route that differs only in `onlink` (its delete must go before the replace,
    or the delete would remove the new route), and a second pass changes nothing."""
    ns = lab.netns("v6p")
    ns.ip("link", "add", "ext0", "type", "veth", "peer", "name", "ext1")
    ns.ip("addr", "add", "fd93::1/64", "dev", "ext0", "nodad")
    ns.ip("link", "set", "ext1", "up")
    ns.ip("link", "set", "ext0", "up")
    ns.ip("link", "add", "vx6", "type", "vxlan", "id", "6", "local", "fd93::1", "dstport",
          "4789", "nolearning")  # fmt: skip
    ns.ip("addr", "add", "fd00:6:0:2::9/64", "dev", "vx6", "nodad")  # makes a plain gw possible
    ns.ip("link", "set", "vx6", "up")
    vx6, ext = ns.ifindex("vx6"), ns.ifindex("ext0")
    net = IPv6Network("fd00:6::/32")

    def peer(n: int, pub: str, direct: bool = False) -> V6Peer:
        mac_ = None if direct else f"02:00:00:00:0{n}:06"
        return V6Peer(IPv6Network(f"fd00:6:0:{n}::/64"), IPv6Address(pub), mac_, direct)

    desired = {p.subnet: p for p in (peer(2, "fd77::2"), peer(3, "fd77::3"),
                                     peer(4, "fd93::4", direct=True))}  # fmt: skip
    # Damage: peer 2's route without onlink, peer 3's neighbour with a wrong MAC and two right
    # routes at two metrics (one stays: the metric is not compared), stale entries of a gone
    # peer 5, a stale direct route, and entries that are not ours (a kernel route, a route
    # outside the network, another table).
    for cmd in (
        "route add fd00:6:0:2::/64 via fd00:6:0:2:: dev vx6",
        "neigh replace fd00:6:0:3:: lladdr 02:00:00:00:0e:06 dev vx6 nud permanent",
        "route add fd00:6:0:3::/64 via fd00:6:0:3:: dev vx6 onlink metric 7",
        "route add fd00:6:0:3::/64 via fd00:6:0:3:: dev vx6 onlink",
        "neigh replace fd00:6:0:5:: lladdr 02:00:00:00:05:06 dev vx6 nud permanent",
        "route add fd00:6:0:5::/64 via fd00:6:0:5:: dev vx6 onlink",
        "route add fd00:6:0:6::/64 via fd93::6 dev ext0",
        "route add fd55::/64 via fd93::7 dev ext0",
        "route add fd00:6:0:7::/64 via fd93::7 dev ext0 table 100",
    ):
        ns.ip("-6", *cmd.split())
    ns.run("bridge", "fdb", "append", "02:00:00:00:05:06", "dst", "fd77::5", "dev", "vx6",
           "self", "permanent")  # fmt: skip
    v6 = V6Pass(LinkClient(ns.name), "vx6", ns.name)
    try:
        stats = await v6.vxlan(vx6, desired, ext_index=ext, network=net)
        assert (stats.full, stats.failed) == (True, 0)
        routes = sorted(
            (r["dst"], r.get("gateway"), r["dev"], "onlink" in r["flags"])
            for r in ns.ip_json("-6", "route", "show", "table", "main")
            if r.get("protocol") != "kernel" and r["dst"].startswith(("fd00:6", "fd55"))
        )
        assert routes == [
            ("fd00:6:0:2::/64", "fd00:6:0:2::", "vx6", True),
            ("fd00:6:0:3::/64", "fd00:6:0:3::", "vx6", True),
            ("fd00:6:0:4::/64", "fd93::4", "ext0", False),
            ("fd55::/64", "fd93::7", "ext0", False),
        ]
        assert ns.ip_json("-6", "route", "show", "table", "100") != []
        neigh = {(n["dst"], n["lladdr"]) for n in ns.ip_json("-6", "neigh", "show", "dev", "vx6")
                 if "PERMANENT" in n["state"]}  # fmt: skip
        assert neigh == {
            ("fd00:6:0:2::", "02:00:00:00:02:06"),
            ("fd00:6:0:3::", "02:00:00:00:03:06"),
        }
        fdb = {(f["mac"], f["dst"]) for f in ns.bridge_json("fdb", "show", "dev", "vx6")
               if "dst" in f}  # fmt: skip
        assert fdb == {("02:00:00:00:02:06", "fd77::2"), ("02:00:00:00:03:06", "fd77::3")}
        again = await v6.vxlan(vx6, desired, ext_index=ext, network=net)
        assert (again.full, again.applied, again.failed) == (True, 0, 0)
    finally:
        v6.close()

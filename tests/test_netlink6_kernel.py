"""The raw netlink client's IPv6 dumps against iproute2, in a namespace made here.

A vxlan device over IPv6 (as flannel-v6.N) and one over IPv4 get a few hundred entries of each
kind (so dumps span several datagrams) plus entries the IPv6 readers must leave out (IPv4
neighbours and FDB destinations, other devices, other tables, routes that are not unicast);
what `neighbours6()`, `fdb6()` and `routes6()` read must be exactly what `ip -j -6 neigh`,
`bridge -j fdb` and `ip -j -6 route` print. Writes then go through `apply()` and are read back
with iproute2.
"""

from __future__ import annotations

import errno
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from backends import netlink as nl
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
        # kernel's own NOARP multicast entries), and only those.
        got_neigh = await sock.neighbours6(vx6)
        shown = ns.ip_json("-6", "neigh", "show", "dev", "vx6", "nud", "all")
        assert {(n.dst, n.lladdr, n.permanent) for n in got_neigh} == {
            (IPv6Address(e["dst"]), e.get("lladdr"), "PERMANENT" in e["state"]) for e in shown
        }
        assert all(n.ifindex == vx6 for n in got_neigh)
        assert len([n for n in got_neigh if n.dst in IPv6Network("fd00::/16")]) == N + 2
        assert sum(n.permanent for n in got_neigh) == N
        assert IPv6Address("fd99::7") in {n.dst for n in await sock.neighbours6(dum)}
        assert {n.dst for n in await sock.neighbours6(vx4)} == {
            IPv6Address(e["dst"])
            for e in ns.ip_json("-6", "neigh", "show", "dev", "vx4", "nud", "all")
        }

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
        assert {r.type for r in main} >= {nl.RTN_UNICAST}
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

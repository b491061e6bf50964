"""Choosing the external (underlay) interface, as flanneld does.

Order: `--iface` (name or IPv4 address; the first candidate that exists wins), then
`--iface-regex` (re.search against IPv4 addresses, then names, as Go's regexp.MatchString;
links without an IPv4 address are skipped), then `--iface-can-reach` (the interface of the route
to that address), else the interface of the default route (lowest metric). When
`--iface`/`--iface-regex` are given and nothing matches, or the chosen way finds nothing,
InterfaceError says what was tried.

The public IP is `--public-ip` or the interface's first IPv4 address; the MTU is the link's.
Neither may be loopback, link-local, unspecified, multicast or reserved (the checks of
subnetmgr.validate, which other hosts apply to our lease): `--iface lo` is refused, not
published as a peer at 127.0.0.1. When nothing matches, the message lists the interfaces that
exist with their IPv4 addresses.

An interface with global IPv6 addresses and no IPv4 address is chosen too (an IPv6-only
underlay): its `public_ip` and `iface_addr` are then 0.0.0.0 (NO_ADDRESS), and the daemon
accepts it only for an IPv6-only network (`EnableIPv4: false`). The default route looked for is
the IPv4 one, else the IPv6 one.

The public IPv6 address (dual stack) is `--public-ipv6` or the interface's first global IPv6
address (scope global: a ULA counts, link-local does not; tentative or DAD-failed ones are
skipped), as flanneld picks it; None when it has none (the daemon refuses EnableIPv6 then).
`--iface` also takes an IPv6 address of the interface, `--iface-regex` is also matched against
global IPv6 addresses (after the IPv4 ones, before names), and `--iface-can-reach` also takes
an IPv6 address (the interface of the IPv6 route to it).

Netlink through backends/links.py (pyroute2's AsyncIPRoute, opened one way for everyone).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from socket import AF_INET, AF_INET6
from typing import Any

from backends.base import NO_ADDRESS, ExternalInterface
from backends.links import collect, open_iproute
from subnetmgr.model import printable
from subnetmgr.validate import unusable_public_ip

NETLINK_TIMEOUT = 5.0
MAX_LISTED = 16
"""The most interfaces an error message lists."""


class InterfaceError(RuntimeError):
    """No usable external interface; the message lists what was tried and what to do."""


@dataclass
class _Link:
    index: int
    name: str
    mtu: int
    addrs: list[IPv4Address] = field(default_factory=list)
    addrs6: list[IPv6Address] = field(default_factory=list)
    """Global-scope IPv6 addresses, in the kernel's order."""


IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0


async def _read_links(ipr: Any) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for msg in await collect(await ipr.link("dump")):
        links[msg["index"]] = _Link(msg["index"], msg.get("ifname"), int(msg.get("mtu") or 0))
    for msg in await collect(await ipr.addr("dump", family=AF_INET)):
        link = links.get(msg["index"])
        address = msg.get("address") or msg.get("local")
        if link is not None and address:
            link.addrs.append(IPv4Address(address))
    for msg in await collect(await ipr.addr("dump", family=AF_INET6)):
        link = links.get(msg["index"])
        address = msg.get("address")
        flags = int(msg.get("IFA_FLAGS") or msg.get("flags") or 0)
        if (
            link is None
            or not address
            or msg.get("scope") != RT_SCOPE_UNIVERSE
            or flags & (IFA_F_DADFAILED | IFA_F_TENTATIVE)
        ):
            continue
        addr6 = IPv6Address(address)
        if not addr6.is_link_local and addr6.ipv4_mapped is None:
            link.addrs6.append(addr6)
    return links


def _find_by_name_or_ip(links: dict[int, _Link], wanted: str) -> _Link | None:
    try:
        ip: IPv4Address | IPv6Address | None = ip_address(wanted)
    except ValueError:
        ip = None
    for link in links.values():
        if ip is not None and (ip in link.addrs or ip in link.addrs6):
            return link
        if ip is None and link.name == wanted:
            return link
    return None


def _find_by_regex(links: dict[int, _Link], pattern: str) -> _Link | None:
    rx = re.compile(pattern)
    # Only links with an IPv4 or a global IPv6 address can carry the overlay; addresses first
    # (IPv4, then global IPv6 ones), then names.
    ordered = sorted((x for x in links.values() if x.addrs or x.addrs6), key=lambda x: x.index)
    for link in ordered:
        if any(rx.search(str(a)) for a in link.addrs):
            return link
    for link in ordered:
        if any(rx.search(str(a)) for a in link.addrs6):
            return link
    for link in ordered:
        if rx.search(link.name):
            return link
    return None


async def _route_oif(
    ipr: Any, dst: IPv4Address | IPv6Address
) -> tuple[int | None, IPv4Address | None]:
    """The interface of the route to `dst` and, for an IPv4 `dst`, the source it would use."""
    family = AF_INET if dst.version == 4 else AF_INET6
    try:
        routes = await collect(await ipr.route("get", dst=str(dst), family=family))
    except Exception:  # netlink error: unreachable network and the like
        return None, None
    for r in routes:
        oif = r.get("oif")
        if oif:
            src = r.get("prefsrc")
            return int(oif), IPv4Address(src) if src and dst.version == 4 else None
    return None, None


async def _default_oif(ipr: Any) -> int | None:
    """The interface of the IPv4 default route (lowest metric), else of the IPv6 one (a host
    with an IPv6-only underlay)."""
    for family in (AF_INET, AF_INET6):
        oif = await _default_oif_of(ipr, family)
        if oif is not None:
            return oif
    return None


async def _default_oif_of(ipr: Any, family: int) -> int | None:
    best: tuple[int, int] | None = None
    for r in await collect(await ipr.get_default_routes(family=family)):
        oif = r.get("oif")
        if not oif:
            multipath = r.get("multipath") or []
            oif = multipath[0]["oif"] if multipath else None
        if not oif:
            continue
        metric = int(r.get("priority") or 0)
        if best is None or metric < best[0]:
            best = (metric, int(oif))
    return None if best is None else best[1]


async def choose_interface(
    ifaces: Sequence[str] = (),
    regexes: Sequence[str] = (),
    can_reach: IPv4Address | IPv6Address | None = None,
    public_ip: IPv4Address | None = None,
    public_ipv6: IPv6Address | None = None,
    *,
    netns: str | None = None,
    netlink_timeout: float = NETLINK_TIMEOUT,
) -> ExternalInterface:
    """Pick the external interface by flannel's rules; raise InterfaceError when none fits."""
    async with asyncio.timeout(netlink_timeout):
        ipr = await open_iproute(netns, netlink_timeout)
        try:
            links = await _read_links(ipr)
            link, src, tried = await _choose(ipr, links, ifaces, regexes, can_reach)
        finally:
            ipr.close()
    if link is None:
        raise InterfaceError(
            f"no external interface found: tried {'; '.join(tried)}. "
            f"Interfaces here: {existing(links)}. "
            "Check the interface exists and has an IPv4 address, or pass --iface NAME|IP"
        )
    public_ipv6 = public_ipv6 or (link.addrs6[0] if link.addrs6 else None)
    if src is not None and src in link.addrs:
        iface_addr = src
    elif link.addrs:  # the first address other hosts could reach, else the first one
        usable = [a for a in link.addrs if unusable_public_ip(a) is None]
        iface_addr = (usable or link.addrs)[0]
    elif public_ipv6 is not None and public_ip is None:
        # An IPv6-only underlay: good for an IPv6-only network alone (the daemon refuses an
        # IPv4 network on it once it has read the config). 0.0.0.0 stands for "no IPv4
        # address", as in the PublicIP of flannel's IPv6-only leases.
        iface_addr = NO_ADDRESS
    else:
        raise InterfaceError(
            f"interface {link.name!r} (chosen by {tried[-1]}) has no IPv4 address; "
            "give it one or pick another with --iface"
        )
    chosen = public_ip or iface_addr
    if iface_addr != NO_ADDRESS:
        why = unusable_public_ip(iface_addr)
        if why is not None:
            raise InterfaceError(
                f"interface {link.name!r} (chosen by {tried[-1]}) has address {iface_addr}, "
                f"which is {why}: other hosts cannot reach this host there. Pick the interface "
                f"that carries traffic between hosts with --iface NAME|IP; interfaces here: "
                f"{existing(links)}"
            )
        why = unusable_public_ip(chosen)
        if why is not None:
            raise InterfaceError(
                f"--public-ip {chosen} is {why}: other hosts would ignore the lease (or send to "
                "themselves); give the address other hosts reach this one at"
            )
    return ExternalInterface(
        name=link.name,
        index=link.index,
        iface_addr=iface_addr,
        public_ip=chosen,
        mtu=link.mtu,
        iface_addr6=link.addrs6[0] if link.addrs6 else None,
        public_ipv6=public_ipv6,
    )


def existing(links: dict[int, _Link]) -> str:
    """The links as `name (addresses)`, by index, at most MAX_LISTED of them."""
    ordered = sorted(links.values(), key=lambda x: x.index)
    shown = [
        f"{printable(str(x.name), 20)} ({', '.join(map(str, x.addrs[:4])) or 'no IPv4 address'})"
        for x in ordered[:MAX_LISTED]
    ]
    more = len(ordered) - MAX_LISTED
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "none"


async def _choose(
    ipr: Any,
    links: dict[int, _Link],
    ifaces: Sequence[str],
    regexes: Sequence[str],
    can_reach: IPv4Address | IPv6Address | None,
) -> tuple[_Link | None, IPv4Address | None, list[str]]:
    tried: list[str] = []
    if ifaces or regexes:
        for wanted in ifaces:
            tried.append(f"--iface {wanted}")
            link = _find_by_name_or_ip(links, wanted)
            if link is not None:
                return link, None, tried
        for pattern in regexes:
            tried.append(f"--iface-regex {pattern}")
            link = _find_by_regex(links, pattern)
            if link is not None:
                return link, None, tried
        return None, None, tried
    if can_reach is not None:
        tried.append(f"--iface-can-reach {can_reach} (route lookup)")
        oif, src = await _route_oif(ipr, can_reach)
        if oif is not None and oif in links:
            return links[oif], src, tried
        return None, None, tried
    tried.append("the default route's interface (no --iface, --iface-regex or --iface-can-reach)")
    oif = await _default_oif(ipr)
    if oif is not None and oif in links:
        return links[oif], None, tried
    return None, None, tried

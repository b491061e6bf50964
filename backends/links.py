"""Link, address and route helpers that every data path and the interface choice share.

pyroute2's AsyncIPRoute serves the few link and address operations (bulk neighbour, FDB and
route work goes through backends/netlink.py). `open_iproute()` is the one way to open it: inside
a named network namespace that must already exist (flags=0: pyroute2 would otherwise create a
missing one), with a timeout. `LinkClient` keeps one such client open for a backend and wraps
each call in the same timeout. Only asyncio-friendly pyroute2 is used (the sync IPRoute breaks
inside a running loop); pyroute2 is imported lazily (~0.45 s), only where a client is opened.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from socket import AF_INET, AF_INET6
from typing import Any

from backends.base import BackendError

log = logging.getLogger(__name__)

NETLINK_TIMEOUT = 10.0
"""Seconds allowed for opening a client or for one pyroute2 request."""


async def collect(result: Any) -> list[Any]:
    """pyroute2 answers either with a list or with an async generator; make it a list."""
    if hasattr(result, "__aiter__"):
        return [msg async for msg in result]
    return list(result)


def check_netns(netns: str | None) -> None:
    """BackendError when the named network namespace does not exist (None: the current one)."""
    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        raise BackendError(
            f"network namespace {netns!r} does not exist; create it or pass no netns"
        )


async def open_iproute(netns: str | None = None, limit: float = NETLINK_TIMEOUT) -> Any:
    """An AsyncIPRoute client, in `netns` when given (never creating it); the caller closes it."""
    from pyroute2 import AsyncIPRoute

    check_netns(netns)
    ipr = AsyncIPRoute(netns=netns, flags=0) if netns else AsyncIPRoute()
    try:
        async with asyncio.timeout(limit):
            await ipr.setup_endpoint()
    except BaseException:
        ipr.close()
        raise
    return ipr


def networks_of(addresses: Iterable[Any]) -> list[IPv4Network]:
    """The IPv4 networks of pyroute2 address messages (`ip -4 addr` entries): what is on-link."""
    out: list[IPv4Network] = []
    for a in addresses:
        raw = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
        if raw:
            out.append(IPv4Network(f"{raw}/{a['prefixlen']}", strict=False))
    return out


def networks6_of(addresses: Iterable[Any]) -> list[IPv6Network]:
    """The global IPv6 networks of pyroute2 address messages (`ip -6 addr` entries, link-local
    ones left out): what is on-link over IPv6."""
    out: list[IPv6Network] = []
    for a in addresses:
        raw = a.get_attr("IFA_ADDRESS")
        if raw and a["scope"] == 0:
            out.append(IPv6Network(f"{raw}/{a['prefixlen']}", strict=False))
    return out


class LinkClient:
    """One lazily opened pyroute2 client for a backend, every request bounded in time."""

    def __init__(self, netns: str | None = None, timeout: float = NETLINK_TIMEOUT) -> None:
        self.netns = netns
        self.timeout = timeout
        self._ipr: Any = None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`ipr.<method>(*args, **kwargs)`, its answer collected into a list when it streams."""
        if self._ipr is None:
            self._ipr = await open_iproute(self.netns, self.timeout)
        async with asyncio.timeout(self.timeout):
            result = await getattr(self._ipr, method)(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                return [item async for item in result]
            return result

    async def get_link(self, name: str) -> Any | None:
        """The link message of the device called `name`, or None when there is none."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            links = await self.call("link", "get", ifname=name)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise
        return links[0] if links else None

    async def ensure_host_address(self, index: int, address: IPv4Address, device: str) -> None:
        """Exactly `address`/32 as the device's IPv4 addresses (others are removed): flannel's
        way of giving an overlay device a source address without broadcast routes."""
        addrs = await self.call("get_addr", family=AF_INET, index=index)
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in addrs}
        want = (str(address), 32)
        if want not in have:
            await self.call("addr", "add", index=index, address=str(address), prefixlen=32)
            log.info("address %s/32 on %s", address, device)
        for addr, plen in have:
            if (addr, plen) != want:
                log.info("removing stale address %s/%d from %s", addr, plen, device)
                await self.call("addr", "del", index=index, address=addr, prefixlen=plen)

    async def onlink_networks(self, index: int) -> list[IPv4Network]:
        """The IPv4 networks directly attached to a link (its addresses' networks)."""
        return networks_of(await self.call("get_addr", family=AF_INET, index=index))

    async def onlink_networks6(self, index: int) -> list[IPv6Network]:
        """The global IPv6 networks directly attached to a link (its addresses' prefixes)."""
        return networks6_of(await self.call("get_addr", family=AF_INET6, index=index))

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

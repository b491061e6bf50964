"""--ip-blackhole-route: a blackhole route for our own subnet (flannel's flag of that name).

With a CNI setup that routes each pod by itself (a /32 per veth, no bridge covering the
subnet), traffic to an unassigned address of our subnet would follow the default route out of
the host; a blackhole route for the subnet drops it here. Longer routes (the pods') still win.
As flannel: in the main table, the own lease's subnet (and IPv6 subnet when there is one),
re-added every --iptables-resync seconds. Unlike flannel, when another route for exactly the
subnet exists (a bridge's `10.x.y.0/24 dev cni0`, which already keeps that traffic here) we
leave it alone and say so once at INFO, where flannel logs "file exists" errors every period;
when such a route appears after ours (the bridge came up later), the kernel would keep using
the blackhole and drop the bridge's traffic, so ours is taken out (WARNING); and a lease change
takes our old subnet's blackhole route out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from overlay.masq import run_command

log = logging.getLogger(__name__)

Network = IPv4Network | IPv6Network


def routes_for(listing: str) -> list[dict[str, Any]]:
    """The route objects of `ip -j route show` output; anything else gives [] (logged)."""
    try:
        doc = json.loads(listing) if listing.strip() else []
    except (ValueError, RecursionError):
        log.warning("unreadable `ip -j route` output: %.200r", listing)
        return []
    if not isinstance(doc, list):
        log.warning("unexpected `ip -j route` output: %.200r", listing)
        return []
    return [r for r in doc if isinstance(r, dict)]


class BlackholeRoute:
    """Keeps `blackhole <subnet>` in the main table; runs `ip` behind `prefix`."""

    def __init__(self, subnets: Sequence[Network], *, prefix: Sequence[str] = ()) -> None:
        self.prefix = tuple(prefix)
        self.subnets: tuple[Network, ...] = tuple(subnets)
        self._stale: set[Network] = set()
        self._covered: set[Network] = set()

    def set_subnets(self, subnets: Sequence[Network]) -> None:
        """A new lease: the next ensure() adds these and takes the old ones out."""
        self._stale |= set(self.subnets) - set(subnets)
        self.subnets = tuple(subnets)

    def _ip(self, subnet: Network, *args: str) -> list[str]:
        return [*self.prefix, "ip", f"-{subnet.version}", *args]

    async def _routes(self, subnet: Network) -> list[dict[str, Any]]:
        _, out, _ = await run_command(
            self._ip(subnet, "-j", "route", "show", "table", "main", "exact", str(subnet))
        )
        return routes_for(out)

    async def ensure(self) -> bool:
        """Add what is missing; True when a route was added."""
        for old in sorted(self._stale, key=str):
            if any(r.get("type") == "blackhole" for r in await self._routes(old)):
                await run_command(self._ip(old, "route", "del", "blackhole", str(old),
                                           "table", "main"), check=False)  # fmt: skip
                log.info("removed blackhole route %s (no longer our subnet)", old)
        self._stale.clear()
        added = False
        for subnet in self.subnets:
            routes = await self._routes(subnet)
            ours = [r for r in routes if r.get("type") == "blackhole"]
            others = [r for r in routes if r.get("type") != "blackhole"]
            if ours and others:
                # A route added after ours (a bridge came up) sits behind it: the kernel would
                # pick the blackhole and drop traffic to the bridge's pods. Ours goes.
                await run_command(self._ip(subnet, "route", "del", "blackhole", str(subnet),
                                           "table", "main"), check=False)  # fmt: skip
                log.warning("removed blackhole route %s: %s has a route for it now", subnet,
                            others[0].get("dev", "?"))  # fmt: skip
            if ours and not others:
                continue
            if others:
                if subnet not in self._covered:
                    self._covered.add(subnet)
                    log.info("a route for %s exists already (%s): no blackhole route needed "
                             "while it does", subnet, routes[0].get("dev", "?"))  # fmt: skip
                continue
            self._covered.discard(subnet)
            rc, _, err = await run_command(
                self._ip(subnet, "route", "add", "blackhole", str(subnet), "table", "main"),
                check=False,
            )
            if rc == 0:
                log.info("added blackhole route %s", subnet)
                added = True
            else:  # a route appeared in between: the next pass looks again
                log.warning("could not add blackhole route %s: %s", subnet, err)
        return added

    async def remove(self) -> None:
        """Take our blackhole routes out (missing ones are fine)."""
        for subnet in {*self.subnets, *self._stale}:
            await run_command(self._ip(subnet, "route", "del", "blackhole", str(subnet),
                                       "table", "main"), check=False)  # fmt: skip

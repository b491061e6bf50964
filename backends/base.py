"""The seam between the daemon and a data path.

A backend knows the kernel (devices, routes, sockets) and nothing of etcd. The daemon drives it
in two phases so that the backend never needs the subnet manager:

1. `prepare()` creates or reuses devices and returns what the lease must publish
   (BackendType and BackendData, e.g. the VTEP MAC);
2. the daemon acquires the lease with those attributes, then calls `start(own)`, which addresses
   the device for our subnet and returns the MTU for subnet.env;
3. `reconcile(peers, changed)` is called with the whole desired set of remote leases (other
   hosts only) after every change and periodically; it makes the kernel match, idempotently.
   `changed=None` asks for a full pass: read everything the backend owns in the kernel and fix
   any difference (the daemon does this on start, periodically and after an error). A
   collection of subnets says that only the entries of those subnets may differ from the
   previous call (the lease events since then): the backend reads and fixes only those, so an
   event costs the same with 10,000 leases as with one, and the result for those subnets is
   the one a full pass would give. Entries of other subnets are left for the next full pass,
   even when they are wrong. A backend whose work is cheap anyway may treat it as a full pass.

`close()` stops any loops the backend runs but leaves kernel state in place, so a restarted
daemon does not cut traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any, Protocol

from subnetmgr.model import Lease, NetworkConfig, Subnet

NO_ADDRESS = IPv4Address(0)
"""ExternalInterface.public_ip of an interface with no IPv4 address (IPv6-only networks only)."""


@dataclass(frozen=True)
class ExternalInterface:
    """The host's underlay interface, chosen by the daemon (--iface and friends)."""

    name: str
    index: int
    iface_addr: IPv4Address
    """The address on the interface: VXLAN/UDP packets leave from it."""
    public_ip: IPv4Address
    """The address other hosts send to (--public-ip, else iface_addr); NO_ADDRESS (0.0.0.0) on
    an interface without IPv4, which only an IPv6-only network accepts."""
    mtu: int
    iface_addr6: IPv6Address | None = None
    """The interface's first global IPv6 address (dual stack: VXLAN over IPv6 leaves from it)."""
    public_ipv6: IPv6Address | None = None
    """The IPv6 address other hosts send to (--public-ipv6, else iface_addr6)."""


@dataclass(frozen=True)
class BackendAttrs:
    """What a lease publishes about this host's data path."""

    backend_type: str
    backend_data: Mapping[str, Any] | None = field(default=None, hash=False)
    backend_v6_data: Mapping[str, Any] | None = field(default=None, hash=False)
    """Dual stack: what the lease publishes as BackendV6Data (vxlan: the v6 device's VTEP MAC)."""


class BackendError(RuntimeError):
    """A backend could not be set up; the message says what failed and what to do."""


def ipv4_keys(changed: Collection[Subnet] | None) -> set[IPv4Network] | None:
    """The IPv4 subnets of a reconcile's `changed` (None stays None: a full pass): what the
    IPv4 passes key peers by (an IPv6-only lease's key is its IPv6 subnet)."""
    return None if changed is None else {s for s in changed if isinstance(s, IPv4Network)}


class Backend(Protocol):
    type: str
    """The BackendType this backend publishes and accepts ("vxlan", "udp", "alloc")."""

    async def prepare(self) -> BackendAttrs: ...

    async def start(self, own: Lease) -> int: ...

    async def reconcile(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None = None
    ) -> None: ...

    async def close(self) -> None: ...


BackendFactory = Callable[[NetworkConfig, ExternalInterface], Backend]

"""The `alloc` backend: a lease and nothing else (no data path), as flannel's alloc backend."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from backends.base import BackendAttrs, ExternalInterface
from subnetmgr.model import Lease, NetworkConfig, Subnet


class AllocBackend:
    type = "alloc"

    def __init__(self, config: NetworkConfig, ext: ExternalInterface) -> None:
        self.config = config
        self.ext = ext

    async def prepare(self) -> BackendAttrs:
        return BackendAttrs(self.type)

    async def start(self, own: Lease) -> int:
        return self.ext.mtu

    async def reconcile(
        self, peers: Mapping[Subnet, Lease], changed: Collection[Subnet] | None = None
    ) -> None:
        return None  # no data path: nothing to program, full pass or not

    async def close(self) -> None:
        return None

"""Data paths that turn leases into kernel state. Nothing here knows etcd.

`create(config, ext)` builds the backend named by the config's Backend.Type. Constructors are
imported lazily so that a daemon running `alloc` never loads pyroute2.
"""

from __future__ import annotations

import importlib

from backends.base import Backend, BackendError, ExternalInterface
from subnetmgr.model import NetworkConfig

# Backend.Type -> "module:Class"
REGISTRY: dict[str, str] = {
    "alloc": "backends.alloc:AllocBackend",
    "vxlan": "backends.vxlan:VxlanBackend",
    "udp": "backends.udp:UdpBackend",
    "host-gw": "backends.hostgw:HostGwBackend",
}


def create(config: NetworkConfig, ext: ExternalInterface) -> Backend:
    target = REGISTRY.get(config.backend_type.lower())
    if target is None:
        raise BackendError(
            f"unknown Backend.Type {config.backend_type!r} in the network config; "
            f"supported: {', '.join(sorted(REGISTRY))}"
        )
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise BackendError(
            f"Backend.Type {config.backend_type!r} is not available in this build ({e})"
        ) from None
    factory = getattr(module, cls_name)
    backend: Backend = factory(config, ext)
    return backend

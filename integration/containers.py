"""Containers of the lab: a network namespace attached to its host's subnet.

`attach_container` is the one seam between the lab and the container network. Today it wires
the container as the reference `bridge` plugin with `host-local` IPAM would, from the host's
subnet.env (bridge cni0 with the subnet's first address as gateway, a veth into the container,
the next free address, a default route via the gateway, the MTU from subnet.env). When the
`flannel` CNI plugin lands, this function runs it instead and nothing else in the lab changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from integration.netns import run

BRIDGE = "cni0"


class SubnetEnvError(ValueError):
    pass


@dataclass(frozen=True)
class SubnetEnv:
    """What a daemon wrote into its subnet.env (flannel's format)."""

    network: IPv4Network
    subnet: IPv4Interface
    """FLANNEL_SUBNET: the subnet's first address with the subnet's prefix, e.g. 10.1.5.1/24."""
    mtu: int
    ipmasq: bool

    @classmethod
    def parse(cls, text: str, origin: str = "subnet.env") -> SubnetEnv:
        values: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
        missing = [
            k
            for k in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ")
            if k not in values
        ]
        if missing:
            raise SubnetEnvError(f"{origin}: missing {', '.join(missing)}")
        try:
            return cls(
                network=IPv4Network(values["FLANNEL_NETWORK"]),
                subnet=IPv4Interface(values["FLANNEL_SUBNET"]),
                mtu=int(values["FLANNEL_MTU"]),
                ipmasq=values["FLANNEL_IPMASQ"].lower() == "true",
            )
        except ValueError as e:
            raise SubnetEnvError(f"{origin}: {e}") from None

    @classmethod
    def read(cls, path: Path) -> SubnetEnv:
        return cls.parse(path.read_text(), str(path))


@dataclass(frozen=True)
class Container:
    ns: str
    host_ns: str
    ip: IPv4Address
    host_veth: str


def container_address(env: SubnetEnv, index: int) -> IPv4Interface:
    """The address host-local would hand out to the `index`-th container (0-based): .2, .3, ..."""
    subnet = env.subnet.network
    addr = subnet.network_address + 2 + index
    if addr >= subnet.broadcast_address:
        raise ValueError(f"container index {index} does not fit in subnet {subnet}")
    return IPv4Interface(f"{addr}/{subnet.prefixlen}")


async def attach_container(
    host_ns: str, container_ns: str, env: SubnetEnv, index: int, ifname: str = "eth0"
) -> Container:
    """Connect the (existing) namespace `container_ns` to the host's subnet; return its address."""
    gateway = env.subnet
    address = container_address(env, index)
    mtu = str(env.mtu)
    links = await run("ip", "-o", "link", "show", BRIDGE, ns=host_ns, check=False)
    if not links.strip():
        await run("ip", "link", "add", BRIDGE, "type", "bridge", ns=host_ns)
    await run("ip", "link", "set", BRIDGE, "mtu", mtu, "up", ns=host_ns)
    await run("ip", "addr", "replace", str(gateway), "dev", BRIDGE, ns=host_ns)
    await run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=host_ns)
    host_veth = f"veth{index}"
    # Created from the root namespace straight into both namespaces: no name clash in root.
    await run(
        "ip", "link", "add", host_veth, "netns", host_ns, "mtu", mtu, "type", "veth",
        "peer", "name", ifname, "netns", container_ns, "mtu", mtu,
    )  # fmt: skip
    await run("ip", "link", "set", host_veth, "master", BRIDGE, "up", ns=host_ns)
    await run("ip", "addr", "add", str(address), "dev", ifname, ns=container_ns)
    await run("ip", "link", "set", ifname, "up", ns=container_ns)
    await run(
        "ip", "route", "replace", "default", "via", str(gateway.ip), "dev", ifname,
        ns=container_ns,
    )  # fmt: skip
    return Container(container_ns, host_ns, address.ip, host_veth)

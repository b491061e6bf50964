"""Containers of the lab: a network namespace attached to its host's subnet.

`attach_container` is the one seam between the lab and the container network. Two ways:

- "cni" (the default): run our `flannel` CNI plugin (cni/flannel.py, installed into the lab's
  CNI bin dir with a real interpreter line) in the host namespace, as a runtime would: it reads
  the host's subnet.env and delegates to the reference `bridge` and `host-local` plugins from
  /usr/lib/cni. The address comes from the CNI result.
- "bridge": the same layout made directly with iproute2 (bridge cni0 with the subnet's first
  address as gateway, a veth into the container, the next address, a default route via the
  gateway, the MTU from subnet.env), for when the plugin is not wanted.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

from integration.netns import CommandError, run
from overlay.subnetenv import SubnetEnv
from overlay.subnetenv import SubnetEnvError as SubnetEnvError  # re-exported for the lab's users

BRIDGE = "cni0"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
ATTACH_MODES = ("cni", "bridge")
NETWORK_NAME = "overlay-lab"


class AttachError(RuntimeError):
    pass


@dataclass(frozen=True)
class Container:
    ns: str
    host_ns: str
    ip: IPv4Address | None
    """The IPv4 address; None in an IPv6-only network (the CNI result gave only `ip6`)."""
    host_veth: str | None
    """The host end of the veth when we named it ("bridge" mode); None when a plugin named it."""
    ip6: IPv6Address | None = None
    """The IPv6 address the CNI result gave (dual stack), else None."""


def container_address(env: SubnetEnv, index: int) -> IPv4Interface:
    """The address host-local would hand out to the `index`-th container (0-based): .2, .3, ..."""
    subnet = env.subnet
    if subnet is None:
        raise ValueError("the bridge mode is IPv4 only, and subnet.env has no FLANNEL_SUBNET")
    addr = subnet.network_address + 2 + index
    if addr >= subnet.broadcast_address:
        raise ValueError(f"container index {index} does not fit in subnet {subnet}")
    return IPv4Interface(f"{addr}/{subnet.prefixlen}")


@dataclass(frozen=True)
class CniSetup:
    """Where the lab keeps the flannel plugin and each host's CNI state."""

    bin_dir: Path
    """Holds `flannel`; the reference plugins are found in /usr/lib/cni after it."""

    @classmethod
    def install(cls, bin_dir: Path) -> CniSetup:
        """Write the flannel plugin into `bin_dir` with a real interpreter line."""
        from cni.install import find_interpreter, install_plugin

        if not (REFERENCE_PLUGINS / "bridge").exists():
            raise AttachError(
                f"the reference CNI plugins are missing from {REFERENCE_PLUGINS}: "
                "apt-get install containernetworking-plugins (or run scripts/bootstrap.sh)"
            )
        bin_dir.mkdir(parents=True, exist_ok=True)
        # The same launcher + bytecode layout `overlayctl install-cni` installs.
        install_plugin(bin_dir, find_interpreter([os.path.realpath(sys.executable)]))
        return cls(bin_dir)

    @property
    def cni_path(self) -> str:
        return f"{self.bin_dir}:{REFERENCE_PLUGINS}"


def flannel_conf(subnet_file: Path, state_dir: Path) -> dict[str, object]:
    """The network config a runtime would hand our flannel plugin for one lab host."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "type": "flannel",
        "subnetFile": str(subnet_file),
        "dataDir": str(state_dir / "flannel"),
        "delegate": {"isDefaultGateway": True, "hairpinMode": True},
        "ipam": {"dataDir": str(state_dir / "ipam")},
    }


async def attach_container(
    host_ns: str,
    container_ns: str,
    env: SubnetEnv,
    index: int,
    ifname: str = "eth0",
    *,
    cni: CniSetup | None = None,
    subnet_file: Path | None = None,
    state_dir: Path | None = None,
) -> Container:
    """Connect the (existing) namespace `container_ns` to the host's subnet; return its address.

    With `cni` (and the host's `subnet_file` and a CNI `state_dir`) the flannel CNI plugin does
    it; without, iproute2 commands make the same layout the bridge plugin would.
    """
    if cni is not None:
        if subnet_file is None or state_dir is None:
            raise ValueError("attach_container with cni needs subnet_file and state_dir")
        return await _attach_with_cni(host_ns, container_ns, ifname, cni, subnet_file, state_dir)
    address = container_address(env, index)
    gateway = env.gateway
    assert gateway is not None  # container_address refused a file without FLANNEL_SUBNET
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


async def _attach_with_cni(
    host_ns: str, container_ns: str, ifname: str, cni: CniSetup, subnet_file: Path,
    state_dir: Path,
) -> Container:  # fmt: skip
    conf = flannel_conf(subnet_file, state_dir)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": container_ns,
        "CNI_NETNS": f"/run/netns/{container_ns}",
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni.cni_path,
    }
    try:
        out = await run(
            str(cni.bin_dir / "flannel"), ns=host_ns, input=json.dumps(conf).encode(), env=env,
            limit=60,
        )  # fmt: skip
    except CommandError as e:
        raise AttachError(f"flannel CNI ADD for {container_ns} failed: {e}") from None
    try:
        result = json.loads(out)
        texts = [str(entry["address"]) for entry in result["ips"]]
        address = next((IPv4Interface(t) for t in texts if ":" not in t), None)
        address6 = next((IPv6Interface(t) for t in texts if ":" in t), None)
        if address is None and address6 is None:
            raise ValueError("no address")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise AttachError(
            f"flannel CNI ADD for {container_ns} gave no IP address ({e!r}): {out!r}"
        ) from None
    ip4 = address.ip if address is not None else None
    ip6 = address6.ip if address6 is not None else None
    return Container(container_ns, host_ns, ip4, None, ip6)

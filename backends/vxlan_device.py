"""The vxlan backend's device: its options and `flannel.<VNI>` itself.

`VxlanOptions` validates the Backend object (flannel's keys and defaults, plus ours);
`device_mtu()` is flannel's MTU rule. `VxlanDevice` creates the device, or adopts an existing
compatible one (same VNI, port, local address, link, GBP) with its MAC, fixing its MTU, state and
learning in place; an incompatible one is replaced, a device deleted by hand is recreated with
the same MAC. Link and address work goes through backends/links.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from backends import netlink as nl
from backends.base import BackendError, ExternalInterface
from backends.links import LinkClient
from subnetmgr.model import ConfigError

log = logging.getLogger("backends.vxlan")
"""The backend's logger: device lines read as the vxlan backend's, as before the split."""

DEFAULT_VNI = 1
DEFAULT_PORT = 8472
"""The Linux kernel's VXLAN port (IANA's is 4789); flannel's `Port: 0` means this."""
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70
"""Outer IPv6 header: flannel subtracts 50 whatever the underlay; 50 would be too little."""
MIN_DEVICE_MTU = 68
"""IPv4's minimum MTU (RFC 791)."""
MIN_UNDERLAY_MTU = MIN_DEVICE_MTU + VXLAN_OVERHEAD_V4
TX_CHECKSUM_KEY = "DisableTxChecksumOffload"
"""Our Backend key (not flannel's): turn tx-checksum-ip-generic off on the device."""
FILTER_PEERS_KEY = "FilterPeers"
"""Our Backend key (not flannel's): admit the VXLAN port only from lease PublicIPs (nftables)."""
COMMAND_TIMEOUT = 10.0
"""Seconds allowed for a helper command (ethtool)."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VxlanOptions:
    """The vxlan keys of the config's Backend object, validated, flannel's defaults applied."""

    vni: int = DEFAULT_VNI
    port: int = DEFAULT_PORT
    gbp: bool = False
    learning: bool = False
    mtu: int = 0
    """The underlay MTU, as flannel's `MTU` key means it; 0: the external interface's. The
    device (and subnet.env's FLANNEL_MTU) get this minus the encapsulation overhead."""
    direct_routing: bool = False
    disable_tx_checksum: bool = False
    filter_peers: bool = False

    @property
    def device(self) -> str:
        return f"flannel.{self.vni}"

    @classmethod
    def from_backend(cls, backend: Mapping[str, Any]) -> VxlanOptions:
        """Parse the Backend object (keys already lower-cased); ConfigError on bad values."""
        doc = {k.lower(): v for k, v in backend.items()}
        vni = _int_opt(doc, "vni", "Backend.VNI", DEFAULT_VNI, 0, (1 << 24) - 1)
        if len(f"flannel.{vni}") > 15:
            raise ConfigError(
                "Backend.VNI",
                vni,
                "the device name flannel.<VNI> would exceed 15 characters; "
                "use a VNI below 10000000",
            )
        port = _int_opt(doc, "port", "Backend.Port", 0, 0, 65535) or DEFAULT_PORT
        mtu = _int_opt(doc, "mtu", "Backend.MTU", 0, 0, 65535)
        if 0 < mtu < MIN_UNDERLAY_MTU:
            raise ConfigError(
                "Backend.MTU",
                mtu,
                f"is the underlay MTU (the device gets {VXLAN_OVERHEAD_V4} less); must be 0 "
                f"(the external interface's) or at least {MIN_UNDERLAY_MTU}",
            )
        return cls(
            vni=vni,
            port=port,
            gbp=_bool_opt(doc, "gbp", "Backend.GBP"),
            learning=_bool_opt(doc, "learning", "Backend.Learning"),
            mtu=mtu,
            direct_routing=_bool_opt(doc, "directrouting", "Backend.DirectRouting"),
            disable_tx_checksum=_bool_opt(
                doc, TX_CHECKSUM_KEY.lower(), f"Backend.{TX_CHECKSUM_KEY}"
            ),
            filter_peers=_bool_opt(doc, FILTER_PEERS_KEY.lower(), f"Backend.{FILTER_PEERS_KEY}"),
        )


def _int_opt(doc: Mapping[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, f"must be an integer between {lo} and {hi}")
    if not lo <= value <= hi:
        raise ConfigError(name, value, f"must be between {lo} and {hi}")
    return value


def _bool_opt(doc: Mapping[str, Any], key: str, name: str) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


def device_mtu(options: VxlanOptions, ext: ExternalInterface) -> int:
    """The device's MTU (and subnet.env's FLANNEL_MTU): the underlay MTU (Backend.MTU, else the
    external interface's) minus the encapsulation overhead, as flannel computes it."""
    overhead = VXLAN_OVERHEAD_V6 if isinstance(ext.iface_addr, IPv6Address) else VXLAN_OVERHEAD_V4
    return (options.mtu or ext.mtu) - overhead


def random_mac() -> str:
    """A random, locally administered, unicast MAC (flannel's rule)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return nl.mac_str(bytes(raw))


class VxlanDevice:
    """`flannel.<VNI>`: made to match the options, its MAC kept across repairs and restarts."""

    def __init__(
        self,
        options: VxlanOptions,
        ext: ExternalInterface,
        links: LinkClient,
        netns: str | None = None,
        *,
        ipv6: bool = False,
    ) -> None:
        self.options = options
        self.ext = ext
        self.links = links
        self.netns = netns
        self.ipv6 = ipv6
        """True: dual stack's second device flannel-v6.<VNI>, VXLAN over the IPv6 underlay."""
        self.name = f"flannel-v6.{options.vni}" if ipv6 else options.device
        local: IPv4Address | IPv6Address | None = ext.iface_addr6 if ipv6 else ext.iface_addr
        if local is None:
            raise BackendError(
                f"vxlan: EnableIPv6 needs a global IPv6 address on {ext.name} for "
                f"{self.name}'s underlay; give it one"
            )
        self.local = local
        self.mtu = (
            (options.mtu or ext.mtu) - VXLAN_OVERHEAD_V6 if ipv6 else device_mtu(options, ext)
        )
        if self.mtu < MIN_DEVICE_MTU:
            raise BackendError(
                f"vxlan MTU {self.mtu} (external interface {ext.name} MTU {ext.mtu}) is below "
                f"{MIN_DEVICE_MTU}; use an external interface with a larger MTU or set "
                "Backend.MTU (the underlay MTU)"
            )
        if options.mtu > ext.mtu:
            log.warning(
                "Backend.MTU %d is larger than the MTU %d of %s: full-size packets will not "
                "fit the underlay unless its path MTU really is %d",
                options.mtu,
                ext.mtu,
                ext.name,
                options.mtu,
            )
        self.mac: str | None = None
        self.ifindex: int | None = None

    async def ensure_address(self, index: int, address: IPv4Address) -> None:
        """Exactly our subnet's network address /32 on the device (IPv4)."""
        await self.links.ensure_host_address(index, address, self.name)

    def incompatibility(self, link: Any) -> str | None:
        """Why an existing device cannot be reused, or None when it can."""
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "vxlan":
            return f"kind {kind!r}, not vxlan"
        data = info.get_attr("IFLA_INFO_DATA")
        have = {
            "VNI": data.get_attr("IFLA_VXLAN_ID"),
            "port": data.get_attr("IFLA_VXLAN_PORT"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL6" if self.ipv6 else "IFLA_VXLAN_LOCAL"),
            "link": data.get_attr("IFLA_VXLAN_LINK"),
            "GBP": bool(data.get_attr("IFLA_VXLAN_GBP")),
        }
        want = {
            "VNI": self.options.vni,
            "port": self.options.port,
            "local": str(self.local),
            "link": self.ext.index,
            "GBP": self.options.gbp,
        }
        diffs = [f"{k} {have[k]!r} (want {want[k]!r})" for k in want if have[k] != want[k]]
        return ", ".join(diffs) or None

    async def ensure(self) -> int:
        """The device's index; creates, adopts, repairs or replaces flannel.<VNI> as needed."""
        try:
            link = await self.links.get_link(self.name)
            if link is not None:
                why = self.incompatibility(link)
                if why is not None:
                    log.warning("replacing incompatible device %s: %s", self.name, why)
                    await self.links.call("link", "del", index=link["index"])
                    link = None
            if link is None:
                return await self._create_device()
            return await self._adopt_device(link)
        except (OSError, TimeoutError) as e:
            raise BackendError(
                f"cannot set up vxlan device {self.name} on {self.ext.name} "
                f"(local {self.local}): {e}"
            ) from e

    async def _create_device(self) -> int:
        if self.mac is None:
            self.mac = random_mac()
        await self.links.call(
            "link",
            "add",
            ifname=self.name,
            kind="vxlan",
            vxlan_id=self.options.vni,
            **{("vxlan_local6" if self.ipv6 else "vxlan_local"): str(self.local)},
            vxlan_link=self.ext.index,
            vxlan_port=self.options.port,
            vxlan_learning=int(self.options.learning),
            **({"vxlan_gbp": True} if self.options.gbp else {}),
            address=self.mac,
            mtu=self.mtu,
        )
        link = await self.links.get_link(self.name)
        if link is None:
            raise BackendError(f"vxlan device {self.name} vanished right after creation")
        index = int(link["index"])
        log.info(
            "created %s (VNI %d, port %d, local %s, dev %s, MAC %s, MTU %d)",
            self.name,
            self.options.vni,
            self.options.port,
            self.local,
            self.ext.name,
            self.mac,
            self.mtu,
        )
        await self._tune(index)
        await self.links.call("link", "set", index=index, state="up")
        self.ifindex = index
        return index

    async def _adopt_device(self, link: Any) -> int:
        index = int(link["index"])
        mac = link.get_attr("IFLA_ADDRESS")
        if self.mac is None:
            self.mac = mac
            log.info("reusing existing %s with MAC %s", self.name, mac)
        changes: dict[str, Any] = {}
        if mac != self.mac:
            changes["address"] = self.mac
        if link.get_attr("IFLA_MTU") != self.mtu:
            changes["mtu"] = self.mtu
        if not link["flags"] & 1:  # IFF_UP
            changes["state"] = "up"
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        if bool(data.get_attr("IFLA_VXLAN_LEARNING")) != self.options.learning:
            await self.links.call(
                "link",
                "set",
                index=index,
                kind="vxlan",
                vxlan_learning=int(self.options.learning),
            )
        if changes:
            log.info("updating %s: %s", self.name, changes)
            await self.links.call("link", "set", index=index, **changes)
        if index != self.ifindex:
            await self._tune(index)
        self.ifindex = index
        return index

    async def _tune(self, index: int) -> None:
        """ethtool settings: tx-checksum-ip-generic off when DisableTxChecksumOffload is set."""
        if not self.options.disable_tx_checksum:
            return
        ethtool = shutil.which("ethtool")
        if ethtool is None:
            raise BackendError(
                f"Backend.{TX_CHECKSUM_KEY} is set but ethtool is not installed; "
                "install it (apt-get install ethtool) or drop the key"
            )
        cmd = [ethtool, "-K", self.name, "tx-checksum-ip-generic", "off"]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                _out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise BackendError(f"{' '.join(cmd)} did not finish in {COMMAND_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise BackendError(
                f"{' '.join(cmd)} failed ({err.decode(errors='replace').strip()}); "
                f"Backend.{TX_CHECKSUM_KEY} needs it"
            )
        log.info("%s: tx-checksum-ip-generic off", self.name)

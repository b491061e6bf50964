"""Open a Linux TUN device (ioctl on /dev/net/tun), optionally with virtio-net offloads."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from backends.base import BackendError

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02

IFNAMSIZ = 16


class TunBusy(BackendError):
    """The device exists and another descriptor holds it (a single-queue TUN takes one)."""


def open_tun(
    name: str,
    *,
    vnet_hdr: bool = False,
    tso: bool = True,
    multi_queue: bool = False,
    persist: bool = False,
) -> int:
    """Create (or attach to) the TUN device `name` and return its file descriptor.

    Always IFF_TUN | IFF_NO_PI (raw IP packets, as flannel). With `vnet_hdr` every read and write
    starts with a 10-byte virtio_net_hdr and the kernel may hand over TCP/IPv4 TSO super-packets
    with partial checksums (TUN_F_CSUM | TUN_F_TSO4); with `tso` False the header is there but
    the kernel segments and checksums everything itself before handing it over.

    Without `persist` the device goes away when the last descriptor on it is closed. With it
    (TUNSETPERSIST) the device, its addresses and its routes outlive this process, so a daemon
    that is stopped or killed leaves the data path's kernel half in place and its successor
    attaches to the same device. Attaching sets the device's IFF_NO_PI/IFF_VNET_HDR flags to
    ours. A device still held by another descriptor raises TunBusy (the caller may retry).
    """
    if not name or len(name) >= IFNAMSIZ:
        raise BackendError(f"TUN device name {name!r} must be 1..15 characters")
    flags = IFF_TUN | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise BackendError(
            f"cannot open /dev/net/tun for {name!r}: {e}; load the tun module and run as root"
        ) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 10))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 if tso else 0)
        if persist:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            raise TunBusy(
                f"TUN device {name!r} is in use by another process (another flannel or "
                f"overlayd?): {e}; stop it, or delete the device with `ip link del {name}`"
            ) from None
        raise BackendError(
            f"cannot create TUN device {name!r} (flags {flags:#x}): {e}; if a device of that name "
            "exists with other flags (e.g. left by another flannel), delete it with "
            f"`ip link del {name}`"
        ) from None
    return fd

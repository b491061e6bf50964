"""What decoding a captured frame costs in `overlayctl trace`, against scapy's own dissection of
the same frames, side by side in one run.

    .venv/bin/python bench/bench_trace_decode.py

overlay.trace decodes each frame with its own checked parsers (struct over the bytes) and uses
scapy to read the pcap stream; the baseline dissects each frame with scapy's layers
(`Ether(frame)`, VXLAN bound to 8472) and reads the same fields. Frames: a VXLAN frame carrying
a 64-byte UDP datagram, and one carrying a 1400-byte TCP segment; the 64-byte one again over
IPv6 (VXLAN over an IPv6 underlay carrying IPv6, as flannel-v6.<VNI>). No root needed. Best CPU time
per frame of 15 interleaved repeats (a load spike on the shared machine hits both alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw, bind_layers

from overlay.trace import LINKTYPE_ETHERNET, decode_frame

bind_layers(UDP, VXLAN, dport=8472)


def frame(inner_l4: object, size: int) -> bytes:
    inner = Ether() / IP(src="10.1.1.2", dst="10.1.2.2", ttl=63) / inner_l4 / Raw(b"x" * size)
    outer = (Ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=40000, dport=8472)
             / VXLAN(vni=1, flags=0x08) / inner)  # fmt: skip
    return bytes(outer)


def frame6(size: int) -> bytes:
    """The 64-byte UDP case over IPv6 (MACs given: scapy would look an IPv6 neighbour up)."""
    mac = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
    inner = (Ether(**mac) / IPv6(src="fd10:1:0:1::2", dst="fd10:1:0:2::2", hlim=63)
             / UDP(sport=1, dport=9) / Raw(b"x" * size))  # fmt: skip
    outer = (Ether(**mac) / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=40000, dport=8472)
             / VXLAN(vni=1, flags=0x08) / inner)  # fmt: skip
    return bytes(outer)


def ours(data: bytes) -> tuple[object, ...]:
    got = decode_frame("source", 0.0, LINKTYPE_ETHERNET, data, "vxlan", 8472)
    assert got.outer is not None and got.inner is not None
    return (got.outer.src, got.outer.ttl, got.vni, got.inner.src, got.inner.dst, got.inner.ttl)


def scapy_dissect(data: bytes) -> tuple[object, ...]:
    pkt = Ether(data)
    if IPv6 in pkt:
        outer6, vx = pkt[IPv6], pkt[VXLAN]
        inner6 = vx[IPv6]
        return (outer6.src, outer6.hlim, vx.vni, inner6.src, inner6.dst, inner6.hlim)
    outer, vx = pkt[IP], pkt[VXLAN]
    inner = vx[IP]
    return (outer.src, outer.ttl, vx.vni, inner.src, inner.dst, inner.ttl)


def best_side_by_side(
    fns: list[Callable[[], object]], number: int, repeat: int = 15
) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.process_time()
            for _ in range(number):
                fn()
            best[i] = min(best[i], (time.process_time() - start) / number)
    return best


def main() -> None:
    cases = {"udp 64 B": frame(UDP(sport=1, dport=9), 64),
             "tcp 1400 B": frame(TCP(sport=1, dport=80), 1400),
             "udp6 64 B": frame6(64)}  # fmt: skip
    print(f"{'frame':12} {'overlay.trace':>14} {'scapy layers':>14} {'ratio':>7}")
    for name, data in cases.items():
        assert ours(data) == scapy_dissect(data), (ours(data), scapy_dissect(data))
        a, b = best_side_by_side([lambda d=data: ours(d), lambda d=data: scapy_dissect(d)], 300)
        print(f"{name:12} {a * 1e6:11.1f} us {b * 1e6:11.1f} us {b / a:6.1f}x")


if __name__ == "__main__":
    main()

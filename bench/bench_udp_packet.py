"""Cost of the udp backend's per-packet Python work, against simple baselines, in one run.

    .venv/bin/python bench/bench_udp_packet.py

- ones_sum of a 1420-byte chunk vs the plain `int.from_bytes(...) % 0xFFFF`;
- cutting a 46-segment TSO super-packet (segment_tcp4), per segment;
- the receive side per packet: check + TTL per packet (baseline, one TUN write each) vs
  check + coalesce with the TTL decremented once per write.
No root needed; best of 5 repeats.
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable

from scapy.layers.inet import IP, TCP
from scapy.packet import raw

from backends import udp_packet as P

MSS = 1420
COUNT = 46


def best(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def naive_sum(data: bytes) -> int:
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF
    return 0xFFFF if total == 0 and value else total


def main() -> None:
    chunk = os.urandom(MSS)
    t_naive = best(lambda: naive_sum(chunk), 50_000)
    t_sum = best(lambda: P.ones_sum(chunk), 50_000)
    print(f"ones_sum {MSS} B: plain % 0xFFFF {t_naive * 1e6:.2f} us, with halvings "
          f"{t_sum * 1e6:.2f} us ({t_naive / t_sum:.2f}x)")  # fmt: skip

    tcp = TCP(sport=40000, dport=5201, seq=1000, flags="A",
              options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])  # fmt: skip
    sup = memoryview(bytearray(raw(IP(src="10.0.0.1", dst="10.0.0.2") / tcp / os.urandom(
        COUNT * MSS))))  # fmt: skip
    t_seg = best(lambda: P.segment_tcp4(sup, MSS), 300)
    print(f"segment_tcp4: {t_seg / COUNT * 1e6:.2f} us per segment ({COUNT} segments)")

    out, seg, count = P.segment_tcp4(sup, MSS)
    view = memoryview(out)
    n = len(out)

    def receive(merge: bool) -> Callable[[], object]:
        """The rx worker's batch path: with merge, TTL is checked per packet and decremented
        once per write by coalesce(); without, decremented per packet (one write each)."""

        def run() -> object:
            batch = []
            for start in range(0, n, seg):
                end = min(start + seg, n)
                pkt = view[start:end]
                if P.check_ipv4(pkt, end - start, 1472):
                    continue
                pkt[8] = 64  # undo the previous round's decrement
                if merge:
                    if pkt[8] <= 1:
                        continue
                elif not P.decrement_ttl(pkt):
                    continue
                batch.append(pkt[: (pkt[2] << 8) | pkt[3]])
            return P.coalesce(batch, True) if merge else batch

        return run

    t_base = best(receive(False), 300)
    t_merge = best(receive(True), 300)
    print(f"receive per packet: check+TTL each, one write each {t_base / count * 1e6:.2f} us; "
          f"check+coalesce, TTL once per write {t_merge / count * 1e6:.2f} us "
          f"({t_base / t_merge:.2f}x, and {count - 1} fewer TUN writes per batch)")  # fmt: skip


if __name__ == "__main__":
    main()

"""Cost of the udp backend's per-packet Python work, against simple baselines, in one run.

    .venv/bin/python bench/bench_udp_packet.py

- ones_sum of a 1420-byte chunk vs the plain `int.from_bytes(...) % 0xFFFF`;
- cutting a 46-segment TSO super-packet (segment_tcp4), per segment;
- the receive side per packet: check + TTL per packet (baseline, one TUN write each) vs
  check + coalesce with the TTL decremented once per write;
- the same with the inner source/destination checks (udp_worker.screen) against without, for
  a TCP batch and for a batch of 64-byte UDP datagrams.
No root needed; best of 5 repeats (where paths are compared: best CPU time of 15 interleaved
repeats each).
"""

from __future__ import annotations

import os
import time
import timeit
from collections.abc import Callable

from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import raw

from backends import udp_packet as P
from backends import udp_worker as W

MSS = 1420
COUNT = 46


def best(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def best_side_by_side(
    fns: list[Callable[[], object]], number: int, repeat: int = 15
) -> list[float]:
    """Best CPU time per call of each function, their repeats interleaved: on a shared machine
    a load spike then hits all of them alike, and time spent descheduled is not counted."""
    timers = [timeit.Timer(fn, timer=time.process_time) for fn in fns]
    times = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, timer in enumerate(timers):
            times[i] = min(times[i], timer.timeit(number) / number)
    return times


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
    t_base, t_old, t_new = best_side_by_side(
        [receive(memoryview(out), seg, merge=False), receive(memoryview(out), seg, merge=True),
         screened(memoryview(out), seg)], 300
    )  # fmt: skip
    print(f"receive per packet (a {count}-segment TCP batch): check+TTL each, one write each "
          f"{t_base / count * 1e6:.2f} us; check+coalesce, TTL once per write "
          f"{t_old / count * 1e6:.2f} us ({t_base / t_old:.2f}x, and {count - 1} fewer TUN "
          f"writes per batch)")  # fmt: skip
    print(
        f"  with the inner source/destination checks (udp_worker.screen + coalesce): "
        f"{t_new / count * 1e6:.2f} us ({t_old / t_new:.2f}x of the same without them)"
    )

    small = UDP(sport=7000, dport=7001) / bytes(64)
    one = raw(IP(src="10.0.0.1", dst="10.0.0.2") / small)
    udp_batch = bytearray(one * COUNT)
    t_old, t_new = best_side_by_side(
        [receive(memoryview(udp_batch), len(one), merge=True),
         screened(memoryview(udp_batch), len(one))], 300
    )  # fmt: skip
    print(
        f"receive per packet (a {COUNT}-datagram batch of 64-byte UDP): check+coalesce "
        f"{t_old / COUNT * 1e6:.2f} us; with the inner checks {t_new / COUNT * 1e6:.2f} us "
        f"({t_old / t_new:.2f}x)"
    )


def receive(view: memoryview, seg: int, merge: bool) -> Callable[[], object]:
    """The rx worker's batch path before the inner checks: with merge, TTL is checked per packet
    and decremented once per write by coalesce(); without, decremented per packet (one write
    each)."""
    n = len(view)

    def run() -> object:
        batch = []
        for start in range(0, n, seg):
            end = min(start + seg, n)
            pkt = view[start:end]
            if P.check_ipv4(pkt, end - start, 1472):
                continue
            if not merge:
                pkt[8] = 64  # undo the previous round's decrement (coalesce copies headers)
            if merge:
                if pkt[8] <= 1:
                    continue
            elif not P.decrement_ttl(pkt):
                continue
            batch.append(pkt[: (pkt[2] << 8) | pkt[3]])
        return P.coalesce(batch, True) if merge else batch

    return run


PEER = ((0xFFFFFFFE, 0x0A000000),)  # 10.0.0.0/31 holds the sender 10.0.0.1
OWN = (0xFFFFFFFE, 0x0A000002)  # 10.0.0.2/31 holds the receiver 10.0.0.2


def screened(view: memoryview, seg: int) -> Callable[[], object]:
    """The rx worker's batch path now: udp_worker.screen (shape, inner source in the peer's
    subnet, inner destination in ours, TTL) then coalesce() with the TTL once per write."""
    n = len(view)
    counters = [0] * (len(W.COUNTERS) + 1)

    def run() -> object:
        batch = W.screen(view, n, seg, 1472, PEER, *OWN, counters)
        if len(batch) != -(-n // seg):
            raise AssertionError("the bench's packets must all pass the checks")
        return P.coalesce(batch, True)

    return run


if __name__ == "__main__":
    main()

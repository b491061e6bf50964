"""Benchmark: the health server and the /metrics exposition against the libraries that could
replace them, side by side in one run.

1. Import time and RSS added to the daemon: a fresh interpreter imports overlay.daemon alone,
   then with aiohttp.web, then with prometheus_client (median of --imports runs each).
2. Requests per second for /healthz and /metrics: the server runs in a child process (its own
   CPU), a small asyncio client here keeps --concurrency connections busy, one request per
   connection ("Connection: close", as a Prometheus scrape every few seconds sees it), for
   --requests requests, --rounds times, the two servers taking turns. Servers: ours
   (overlay.health.HealthServer) and aiohttp's low-level server (aiohttp.web.Server) serving
   the same Metrics.render(). The ratio ours/aiohttp is printed per round and as a median.
3. Hostile requests (not a speed figure): what each server answers to an oversized request
   line, an oversized header, too many headers and binary garbage, and how many ERROR log
   records (tracebacks) that costs; and whether 300 idle connections are all held.
4. Rendering the same metrics: Metrics.render() against prometheus_client's generate_latest()
   over a custom Collector yielding the same families, and the cost of prometheus_client's
   ProcessCollector (RSS, fds, CPU).

Run:  .venv/bin/python bench/bench_health.py [--requests 4000] [--concurrency 8] [--rounds 3]
                                             [--imports 7]
Prints one table; quote the ratios, single figures are noisy on a shared 2-core machine.
Needs aiohttp and prometheus_client in the venv (pip install aiohttp prometheus_client).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from overlay.health import HealthServer, Metrics

IMPORT_PROBE = """
import importlib, time
t = time.perf_counter()
for m in {mods!r}:
    importlib.import_module(m)
dt = time.perf_counter() - t
rss = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])
print(dt, rss * 1024)
"""


def sample_metrics() -> Metrics:
    """A daemon's metrics as a udp host with a lease, some events and 14 backend counters."""
    m = Metrics(ready=True, lease_subnet="10.1.17.0/24", lease_public_ip="192.0.2.7",
                lease_backend="udp", lease_expiration=1.8e9, peers=250)  # fmt: skip
    for i in range(40):
        m.observe_reconcile("change" if i % 4 else "full", 0.003 * i, ok=i != 7)
    m.events.update({"peer_added": 250, "lease_acquired": 1, "ready": 1})
    m.leases_ignored.update({"not_json": 2, "outside_network": 1})
    counters = {f"counter_{i}": i * 1000 for i in range(14)}
    m.publish_backend_counters("udp", lambda: counters)
    return m


def imports(runs: int) -> list[tuple[str, float, float]]:
    """Median import time and RSS per variant; the variants take turns, so load shared by the
    machine hits them alike."""
    variants = (
        ("overlay.daemon", ["overlay.daemon"]),
        ("+ aiohttp.web", ["overlay.daemon", "aiohttp.web"]),
        ("+ prometheus_client", ["overlay.daemon", "prometheus_client"]),
    )
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    rss: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _ in range(runs):
        for label, mods in variants:
            out = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(mods=mods)],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            t, r = out.split()
            times[label].append(float(t))
            rss[label].append(float(r))
    return [(k, statistics.median(times[k]), statistics.median(rss[k])) for k, _ in variants]


async def serve(kind: str) -> None:
    """Child process: serve sample_metrics() on 127.0.0.1, print the port, run until stdin ends."""
    metrics = sample_metrics()
    if kind == "ours":
        server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True, max_connections=64)
        port = await server.start()
    else:
        from aiohttp import web

        pages = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)  # never started

        async def handler(request: web.BaseRequest) -> web.Response:
            status, ctype, body = pages.respond(request.method, request.path)  # the same page
            return web.Response(status=status, text=body, content_type=ctype.split(";")[0])

        lowlevel = web.Server(handler, max_line_size=8192, max_field_size=8192)
        srv = await asyncio.get_running_loop().create_server(lowlevel, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def load(port: int, path: str, requests: int, concurrency: int) -> float:
    """Requests per second, one request per connection, `concurrency` at a time."""
    left = requests
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            data = await reader.read()
            writer.close()
            if not data.startswith(b"HTTP/1.") or b" 200 " not in data[:16]:
                raise RuntimeError(f"bad answer from {path}: {data[:80]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - t0)


def server_process(kind: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def throughput(requests: int, concurrency: int, rounds: int) -> dict[str, list[float]]:
    """Per path, the ratio ours/aiohttp of requests per second in each round (the two servers
    measured back to back in every round)."""
    ratios: dict[str, list[float]] = {"/healthz": [], "/metrics": []}
    servers = {kind: server_process(kind) for kind in ("ours", "aiohttp")}
    ports = {kind: port for kind, (_, port) in servers.items()}
    try:
        for _ in range(rounds):
            for path in ratios:
                rate = {}
                for kind, port in ports.items():
                    asyncio.run(load(port, path, requests // 10, concurrency))  # warm up
                    rate[kind] = asyncio.run(load(port, path, requests, concurrency))
                ratios[path].append(rate["ours"] / rate["aiohttp"])
                print(f"    {path:<9} ours {rate['ours']:7.0f}/s   aiohttp.web.Server "
                      f"{rate['aiohttp']:7.0f}/s", flush=True)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
    return ratios


HOSTILE = {
    "100 KiB request line": b"GET /" + b"a" * 100 * 1024 + b" HTTP/1.1\r\n\r\n",
    "20 KB header": b"GET /healthz HTTP/1.1\r\nX: " + b"b" * 20000 + b"\r\n\r\n",
    "200 headers": b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"X-%d: v\r\n" % i for i in range(200))
    + b"\r\n",
    "binary garbage": b"\xff\xfe\x00garbage\r\n\r\n",
}


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def hostile(kind: str) -> tuple[dict[str, str], int, int]:
    """Answers (status line or "nothing") per HOSTILE input, ERROR records, idle conns held."""
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    metrics = sample_metrics()
    idle: list[asyncio.StreamWriter] = []
    if kind == "ours":
        server = HealthServer(metrics, "127.0.0.1", 0, serve_metrics=True)
        port = await server.start()
        held = lambda: server.connections  # noqa: E731
    else:
        from aiohttp import web

        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text="ok\n")

        lowlevel = web.Server(handler, max_line_size=8192, max_field_size=8192)
        srv = await asyncio.get_running_loop().create_server(lowlevel, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        held = lambda: len(lowlevel.connections)  # noqa: E731
    answers = {}
    try:
        for label, data in HOSTILE.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            try:
                answer = await asyncio.wait_for(reader.read(), 10)
            except (ConnectionError, TimeoutError) as e:
                answer = repr(e).encode()
            writer.close()
            answers[label] = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "nothing"
        for _ in range(300):
            idle.append((await asyncio.open_connection("127.0.0.1", port))[1])
        await asyncio.sleep(0.5)
        return answers, errors.count, held()
    finally:
        for writer in idle:
            writer.close()
        if kind == "ours":
            await server.close()
        else:
            srv.close()
        logging.getLogger().removeHandler(errors)


def render_costs(rounds: int) -> list[tuple[str, float]]:
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )
    from prometheus_client.registry import Collector

    metrics = sample_metrics()

    class Equivalent(Collector):
        """The same families as Metrics.render(), through prometheus_client's types."""

        def collect(self) -> Iterator[CounterMetricFamily]:  # type: ignore[override]
            m = metrics
            yield GaugeMetricFamily("overlay_up", "1 while overlayd runs.", value=1)
            yield GaugeMetricFamily("overlay_ready", "Ready.", value=1 if m.ready else 0)
            yield GaugeMetricFamily("overlay_start_time_seconds", "Start.", value=m.started)
            info = GaugeMetricFamily("overlay_lease_info", "Lease.",
                                     labels=["subnet", "public_ip", "backend"])  # fmt: skip
            info.add_metric([m.lease_subnet or "", m.lease_public_ip or "", m.lease_backend or ""],
                            1)  # fmt: skip
            yield info
            yield GaugeMetricFamily("overlay_lease_expiration_seconds", "Expiry.",
                                    value=m.lease_expiration or 0)  # fmt: skip
            yield CounterMetricFamily("overlay_lease_acquisitions_total", "Acq.",
                                      value=m.lease_acquisitions)  # fmt: skip
            yield GaugeMetricFamily("overlay_peers", "Peers.", value=m.peers)
            rec = CounterMetricFamily("overlay_reconciles_total", "Rec.", labels=["trigger"])
            for k, v in sorted(m.reconciles.items()):
                rec.add_metric([k], v)
            yield rec
            yield CounterMetricFamily("overlay_reconcile_errors_total", "Err.",
                                      value=m.reconcile_errors)  # fmt: skip
            yield SummaryMetricFamily("overlay_reconcile_duration_seconds", "Dur.",
                                      count_value=sum(m.reconciles.values()),
                                      sum_value=m.reconcile_seconds)  # fmt: skip
            for name, value in (
                ("overlay_etcd_errors_total", m.etcd_errors),
                ("overlay_events_dropped_total", m.events_dropped),
                ("overlay_masq_resyncs_total", m.masq_resyncs),
                ("overlay_masq_repairs_total", m.masq_repairs),
            ):
                yield CounterMetricFamily(name, name, value=value)
            for name, counter, label in (
                ("overlay_events_total", m.events, "type"),
                ("overlay_leases_ignored_total", m.leases_ignored, "reason"),
            ):
                fam = CounterMetricFamily(name, name, labels=[label])
                for k, v in sorted(counter.items()):
                    fam.add_metric([k], v)
                yield fam
            assert m.backend_counters is not None
            for k, v in m.backend_counters().items():  # becomes overlay_udp_<k>_total
                yield CounterMetricFamily(f"overlay_udp_{k}", k, value=v)

    equivalent = CollectorRegistry(auto_describe=False)
    equivalent.register(Equivalent())
    process = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=process)
    rows = []
    for label, fn in (
        ("Metrics.render()", metrics.render),
        ("prometheus_client generate_latest(same families)", lambda: generate_latest(equivalent)),
        ("prometheus_client ProcessCollector alone", lambda: generate_latest(process)),
    ):
        fn()
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        rows.append((label, (time.perf_counter() - t0) / rounds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--imports", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--render-rounds", type=int, default=2000)
    parser.add_argument("--serve", choices=["ours", "aiohttp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return

    rows = imports(args.imports)
    base_t, base_rss = rows[0][1], rows[0][2]
    print(f"import (median of {args.imports} fresh interpreters)")
    for label, t, rss in rows:
        print(f"  {label:<22} {t * 1000:7.1f} ms  x{t / base_t:4.2f}   RSS {rss / 2**20:5.1f} MiB"
              f"  (+{(rss - base_rss) / 2**20:4.1f} MiB, x{rss / base_rss:4.2f})")  # fmt: skip

    print(f"requests/s, {args.requests} requests, {args.concurrency} at a time, one per connection,"
          f" {args.rounds} rounds")  # fmt: skip
    ratios = throughput(args.requests, args.concurrency, args.rounds)
    for path, values in ratios.items():
        print(f"  {path:<9} ours/aiohttp median x{statistics.median(values):4.2f}"
              f" (x{min(values):4.2f}-x{max(values):4.2f})")  # fmt: skip

    print(
        "hostile requests (answer's status line; ERROR log records; of 300 idle connections, held)"
    )
    for kind in ("ours", "aiohttp"):
        answers, errors, held = asyncio.run(hostile(kind))
        print(f"  {kind}: ERROR records {errors}, idle connections held {held}")
        for label, answer in answers.items():
            print(f"    {label:<22} {answer}")

    costs = render_costs(args.render_rounds)
    base = costs[0][1]
    print(f"render (mean of {args.render_rounds})")
    for label, seconds in costs:
        print(f"  {label:<50} {seconds * 1e6:7.1f} us  x{seconds / base:4.2f}")


if __name__ == "__main__":
    main()

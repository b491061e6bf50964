"""CNI ADD/DEL latency: the installed flannel plugin against its bare delegate, side by side.

Variants, interleaved in one run (every round runs each variant once, in a rotating order):
  bare      /usr/lib/cni/bridge (+ host-local) called directly with the delegate conf that the
            flannel plugin would build: the floor.
  flannel   the plugin as `overlayctl install-cni` installs it: a launcher
            (#!/usr/bin/python3 -IS) importing cni/flannel.py from its bytecode, compiled at
            install time in <bin>/.flannel/<id>/.
  single    the previous install: cni/flannel.py itself as the plugin, with the same
            interpreter line (a script run directly is compiled on every exec).
  baseline  with --baseline REV: cni/flannel.py as it was at git revision REV, installed
            like `flannel` (launcher + bytecode): the same install before a change.

Every call is a real ADD into its own network namespace (a fresh veth on a real bridge, an
address from host-local) followed by its DEL. The run happens inside a throwaway host namespace,
so the bridge and any rule die with it. Also printed: interpreter start-up, VERSION (start-up
+ loading the plugin, no delegate) for both installs, and the plugin's import profile
(`python -X importtime`), i.e. where the plugin's own time goes.

    .venv/bin/python bench/bench_cni.py              # N=50 rounds
    .venv/bin/python bench/bench_cni.py --rounds 100 --json
    .venv/bin/python bench/bench_cni.py --realtime   # SCHED_FIFO: less noise on a busy box
    .venv/bin/python bench/bench_cni.py --baseline main   # this plugin vs main's, side by side

Root only. Not a test: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni.flannel import build_delegate, json_dumps, parse_conf, parse_subnet_env
from cni.install import install_cni, install_plugin, plugin_text

REFERENCE = Path("/usr/lib/cni")
SUBNET_ENV = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
    "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n"
)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def timed_exec(argv: list[str], env: dict[str, str], stdin: bytes) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stdout!r} {proc.stderr!r}")
    return elapsed


# ------------------------------------------------------------------------------ inner run


def inner(args: argparse.Namespace) -> None:
    """Runs inside the host namespace: time every variant, print a JSON report on stdout."""
    work = Path(args.work)
    plugin = work / "bin" / "flannel"
    single = work / "bin-single" / "flannel"
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "benchnet",
        "type": "flannel",
        "subnetFile": str(work / "subnet.env"),
        "dataDir": str(work / "flannel"),
        "ipam": {"dataDir": str(work / "ipam")},
        "delegate": {"bridge": "cnibench0"},
    }
    delegate = build_delegate(parse_conf(json.dumps(conf)), parse_subnet_env(SUBNET_ENV))
    delegate["ipam"]["dataDir"] = str(work / "ipam-bare")
    variants = {
        "bare": ([str(REFERENCE / "bridge")], json_dumps(delegate).encode()),
        "flannel": ([str(plugin)], json.dumps(conf).encode()),
        "single": ([str(single)], json.dumps(conf).encode()),
    }
    baseline = work / "bin-baseline" / "flannel"
    if baseline.exists():
        variants["baseline"] = ([str(baseline)], json.dumps(conf).encode())
    names = list(variants)
    times: dict[str, dict[str, list[float]]] = {n: {"ADD": [], "DEL": []} for n in names}
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_PATH": f"{plugin.parent}:{REFERENCE}",
        "CNI_IFNAME": "eth0",
    }
    # One warm-up round (page cache, bridge creation), not counted.
    for round_no in range(-1, args.rounds):
        ns = args.namespaces[max(round_no, 0) % len(args.namespaces)]
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            argv, stdin = variants[name]
            cid = f"bench-{name}-{round_no + 1}"
            env = dict(base_env, CNI_CONTAINERID=cid, CNI_NETNS=f"/run/netns/{ns}")
            add = timed_exec(argv, dict(env, CNI_COMMAND="ADD"), stdin)
            delete = timed_exec(argv, dict(env, CNI_COMMAND="DEL"), stdin)
            if round_no >= 0:
                times[name]["ADD"].append(add)
                times[name]["DEL"].append(delete)

    # Where the plugin's own time goes.
    interp = plugin.read_text().splitlines()[0][2:].split()
    startup = [timed_exec([*interp, "-c", "pass"], base_env, b"") for _ in range(args.rounds)]
    installs = [("flannel", plugin), ("single", single)]
    if baseline.exists():
        installs.append(("baseline", baseline))
    version: dict[str, list[float]] = {name: [] for name, _ in installs}
    for _ in range(args.rounds):
        for name, exe in installs:
            env = dict(base_env, CNI_COMMAND="VERSION")
            version[name].append(timed_exec([str(exe)], env, b"{}"))
    profile = subprocess.run(
        [*interp, "-X", "importtime", str(plugin)],
        input=b"{}",
        env=dict(base_env, CNI_COMMAND="VERSION"),
        capture_output=True,
        timeout=60,
        check=True,
    ).stderr.decode()
    imports = []
    for line in profile.splitlines():
        if line.startswith("import time:") and "|" in line and "self" not in line:
            _, cumulative, module = (p.strip() for p in line[len("import time:") :].split("|"))
            if not module.startswith(" "):
                imports.append((module.strip(), int(cumulative)))
    source = single.read_text()
    compile_ms = []
    for _ in range(20):
        start = time.perf_counter()
        compile(source, str(single), "exec")
        compile_ms.append((time.perf_counter() - start) * 1000)
    report = {
        "compile_ms": min(compile_ms),
        "rounds": args.rounds,
        "times_ms": times,
        "startup_ms": startup,
        "version_ms": version,
        "top_level_imports_us": sorted(imports, key=lambda x: -x[1])[:8],
        "interpreter": " ".join(interp),
    }
    print(json.dumps(report))


# ------------------------------------------------------------------------------ outer run


def summarize(report: dict[str, Any]) -> str:
    times = report["times_ms"]
    lines = [
        f"CNI latency, {report['rounds']} rounds, ADD then DEL into a fresh namespace "
        f"(plugin interpreter: {report['interpreter']})",
        f"(load average before/after: {report['load_before']} / {report['load_after']})",
        f"{'variant':10} {'ADD p50':>9} {'ADD p90':>9} {'ADD min':>9} {'DEL p50':>9} "
        f"{'DEL p90':>9} {'DEL min':>9} {'ADD p50 vs bare':>16} {'added ADD/DEL p50':>18}",
    ]
    bare_add = statistics.median(times["bare"]["ADD"])
    bare_del = statistics.median(times["bare"]["DEL"])
    for name, per in times.items():
        add, dele = per["ADD"], per["DEL"]
        add50, del50 = statistics.median(add), statistics.median(dele)
        lines.append(
            f"{name:10} {add50:7.1f}ms {percentile(add, 0.9):7.1f}ms "
            f"{min(add):7.1f}ms {del50:7.1f}ms "
            f"{percentile(dele, 0.9):7.1f}ms {min(dele):7.1f}ms "
            f"{add50 / bare_add:15.2f}x "
            f"{add50 - bare_add:+8.1f} /{del50 - bare_del:+6.1f} ms"
        )
    for name in [n for n in ("flannel", "single", "baseline") if n in times]:
        add = statistics.median(times[name]["ADD"])
        dele = statistics.median(times[name]["DEL"])
        lines.append(
            f"{name} adds {add - bare_add:.1f} ms to the ADD median and "
            f"{dele - bare_del:.1f} ms to the DEL median"
        )
    version = report["version_ms"]
    if "baseline" in times:
        ratios = []
        for command in ("ADD", "DEL"):
            now = statistics.median(times["flannel"][command])
            before = statistics.median(times["baseline"][command])
            ratios.append(f"{command} p50 {now:.1f} / {before:.1f} ms = {now / before:.3f}x")
        now_v = statistics.median(version["flannel"])
        before_v = statistics.median(version["baseline"])
        ratios.append(f"VERSION p50 {now_v:.1f} / {before_v:.1f} ms = {now_v / before_v:.3f}x")
        lines.append(f"flannel vs baseline ({report['baseline']}): " + "; ".join(ratios))
    lines.append(
        f"interpreter start-up ({report['interpreter']} -c pass): "
        f"p50 {statistics.median(report['startup_ms']):.1f} ms "
        f"(min {min(report['startup_ms']):.1f}); "
        f"plugin VERSION (start-up + loading the plugin + answer): "
        f"flannel p50 {statistics.median(version['flannel']):.1f} ms "
        f"(min {min(version['flannel']):.1f}), "
        f"single p50 {statistics.median(version['single']):.1f} ms "
        f"(min {min(version['single']):.1f}); "
        f"compiling the plugin's source: min {report['compile_ms']:.1f} ms"
    )
    lines.append(
        "plugin's top-level imports (cumulative us): "
        + ", ".join(f"{m} {us}" for m, us in report["top_level_imports_us"])
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="also print the raw report")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run the timed part under SCHED_FIFO (chrt) to keep other load on a busy machine "
        "from dominating the figures",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also time cni/flannel.py as of this git revision, installed the same way",
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--namespaces", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return 0
    if os.geteuid() != 0:
        print("bench_cni: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not (REFERENCE / "bridge").exists():
        print(f"bench_cni: no {REFERENCE}/bridge: install containernetworking-plugins")
        return 2

    token = uuid.uuid4().hex[:6]
    host = f"cbh{token}"
    spaces = [f"cbc{token}{i}" for i in range(4)]
    work = Path(tempfile.mkdtemp(prefix="bench-cni-"))
    made: list[str] = []
    try:
        installed = install_cni(work / "bin", work / "net.d", force=False)
        single = work / "bin-single" / "flannel"
        single.parent.mkdir()
        single.write_text(plugin_text(installed.interpreter))  # the old one-file install
        single.chmod(0o755)
        if args.baseline:
            repo = Path(__file__).resolve().parent.parent
            source = sh("git", "-C", str(repo), "show", f"{args.baseline}:cni/flannel.py")
            (work / "bin-baseline").mkdir()
            install_plugin(work / "bin-baseline", installed.interpreter, source)
        (work / "subnet.env").write_text(SUBNET_ENV)
        for ns in [host, *spaces]:
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        log(f"{args.rounds} rounds in host namespace {host}")
        prefix = ["chrt", "--fifo", "10"] if args.realtime else []
        out = sh(
            *prefix,
            "ip", "netns", "exec", host, sys.executable, str(Path(__file__).resolve()),
            "--inner", "--rounds", str(args.rounds), "--work", str(work),
            "--namespaces", *spaces,
        )  # fmt: skip
        report = json.loads(out)
        report["load_before"] = load_before
        report["baseline"] = args.baseline
        report["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(summarize(report))
        if args.json:
            print(json.dumps(report))
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

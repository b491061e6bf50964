"""`lab up` on the two providers side by side, and the container image's code layer rebuild.

Rounds alternate the providers (netns, containers, containers, netns, ...); each round is a
whole `Lab.up(nodes=N)` (etcd, hosts, daemons ready, containers attached) timed to its end,
then the connectivity matrix (checked to pass, not timed), then `down` (timed). The container
image must exist (it is built first if not, and that build is reported apart). Then the code
layer alone: the checkout is copied to a temporary directory, one file of it changed, and
`ensure_image` on that copy builds only the code layer (timed; the layer is removed again).

    .venv/bin/python bench/bench_lab_up.py                  # 3 rounds, 3 nodes
    .venv/bin/python bench/bench_lab_up.py --rounds 5 --nodes 5 --json

Root only. Not a test: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.docker_lab import (
    CODE_FILES,
    CODE_PACKAGES,
    IMAGE_CONTEXT,
    SOURCE_ROOT,
    ensure_engine,
    ensure_image,
    layer_tags,
)
from integration.lab import open_lab


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


async def one_round(provider: str, nodes: int, root: Path) -> dict[str, float]:
    lab = open_lab(f"b{uuid.uuid4().hex[:6]}", state_root=root, provider=provider)
    try:
        started = time.monotonic()
        await lab.up(nodes=nodes)
        up = time.monotonic() - started
        entries = await lab.matrix()
        if not all(e.ok for e in entries):
            raise SystemExit(f"bench: {provider} lab has failing probes: {entries}")
    finally:
        started = time.monotonic()
        await lab.down()
        down = time.monotonic() - started
    return {"up_s": up, "down_s": down}


def code_layer_rebuild() -> float:
    """Seconds to build the code layer for a copy of the checkout with one file changed."""
    client = ensure_engine(_progress)
    with tempfile.TemporaryDirectory(prefix="bench-lab-src-") as tmp:
        root = Path(tmp)
        for rel in CODE_FILES:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SOURCE_ROOT / rel, root / rel)
        for pkg in CODE_PACKAGES:
            shutil.copytree(
                SOURCE_ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__")
            )
        changed = root / "overlay" / "daemon.py"
        changed.write_text(changed.read_text() + f"\n# bench {uuid.uuid4().hex}\n")
        tag = layer_tags(root, IMAGE_CONTEXT).code
        started = time.monotonic()
        ensure_image(client, _progress, root=root, context=IMAGE_CONTEXT)
        took = time.monotonic() - started
        client.images.remove(tag)
    # The checkout's own image again (the copy's build pruned it if no container used it).
    ensure_image(client, _progress)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_lab_up: needs root", file=sys.stderr)
        return 2
    client = ensure_engine(_progress)
    started = time.monotonic()
    tag = ensure_image(client, _progress)
    report: dict[str, Any] = {
        "image": tag,
        "image_ensure_s": time.monotonic() - started,
        "image_sizes_mb": {
            t: round(client.images.get(t).attrs["Size"] / 1e6, 1)
            for t in (layer_tags().base, layer_tags().deps, tag)
        },
        "rounds": {"netns": [], "containers": []},
    }
    with tempfile.TemporaryDirectory(prefix="bench-labs-") as tmp:
        for i in range(args.rounds):
            order = ["netns", "containers"] if i % 2 == 0 else ["containers", "netns"]
            for provider in order:
                r = asyncio.run(one_round(provider, args.nodes, Path(tmp)))
                _progress(f"round {i + 1} {provider}: up {r['up_s']:.2f}s down {r['down_s']:.2f}s")
                report["rounds"][provider].append(r)
    report["code_layer_rebuild_s"] = code_layer_rebuild()
    med = {
        p: {k: statistics.median(r[k] for r in rs) for k in ("up_s", "down_s")}
        for p, rs in report["rounds"].items()
    }
    report["median"] = med
    report["ratio_up_containers_to_netns"] = med["containers"]["up_s"] / med["netns"]["up_s"]
    print(f"lab up, {args.nodes} nodes, median of {args.rounds} (alternating):")
    for p in ("netns", "containers"):
        print(f"  {p:10} up {med[p]['up_s']:6.2f} s   down {med[p]['down_s']:5.2f} s")
    print(f"  containers / netns (up): {report['ratio_up_containers_to_netns']:.2f}x")
    print(f"code layer rebuild after a one-file change: {report['code_layer_rebuild_s']:.1f} s")
    print(f"image sizes (MB): {report['image_sizes_mb']}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

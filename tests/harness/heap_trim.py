"""What trimming the C heap after each request does to a worker's memory, and what it costs.

In-process, on the built-in tiny model (built if missing), the same WanService a TorchServe worker
runs: ``--requests`` small requests with the trim after each (as shipped) and without it, the
process's RSS read after each block; then the trim's own cost after a small and a big request.
The figures RELIABILITY.md quotes for the trim come from this script's JSON.

    .venv/bin/python -m tests.harness.heap_trim --out reliability/results/heap-trim.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from scripts.serve import REPO_ROOT, ServerLayout
from tests.harness.payloads import BIG as LARGEST
from tests.harness.payloads import SMALL

BIG = {**LARGEST, "num_inference_steps": 2}  # tiny-ti2v's largest size, few steps: the trim's cost, not denoising
BLOCK = 60


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_service():
    from handler.service import WanService
    from model_store.tiny_model import build_tiny_checkpoint, is_built

    weights = ServerLayout().tiny_weights
    if not is_built(weights):
        build_tiny_checkpoint("ti2v-5b", weights)
    config = yaml.safe_load((REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml").read_text())
    config["handler"]["model_path"] = str(weights)
    return WanService.from_model_config(config, weights)


def growth(service, requests: int, trim: bool, seed: int) -> dict[str, Any]:
    """RSS after a warm-up and after each block of BLOCK requests, with or without the trim."""
    import handler.service as service_module

    shipped = service_module.trim_host_heap
    service_module.trim_host_heap = shipped if trim else (lambda: None)
    try:
        def run(count: int, first: int) -> None:
            for i in range(first, first + count):
                reply = service.handle({"prompt": f"heap {i}", **SMALL, "seed": i, "output": "inline"}, f"h{i}")
                if reply.status != 200:
                    raise RuntimeError(f"request {i} answered {reply.status}: {reply.body}")

        run(BLOCK // 2, seed)  # warm-up
        gc.collect()
        shipped()  # the same start for both runs
        readings = [round(rss_mib(), 1)]
        for block in range(requests // BLOCK):
            run(BLOCK, seed + 1000 * (block + 1))
            gc.collect()
            readings.append(round(rss_mib(), 1))
    finally:
        service_module.trim_host_heap = shipped
    return {"trim": trim, "requests": BLOCK * (requests // BLOCK), "rss_mib_after_each_block": readings,
            "growth_mib": round(readings[-1] - readings[0], 1),
            "python_objects": len(gc.get_objects())}


def trim_cost(service) -> list[dict[str, Any]]:
    """Seconds one trim takes right after a request (its own trim disabled), and what it frees."""
    import handler.service as service_module

    shipped = service_module.trim_host_heap
    service_module.trim_host_heap = lambda: None
    results = []
    try:
        for name, size in (("small", SMALL), ("big", BIG), ("small", SMALL), ("big", BIG)):
            started = time.perf_counter()
            service.handle({"prompt": "trim cost", **size, "seed": 1, "output": "inline"}, "cost")
            generate_s = time.perf_counter() - started
            before = rss_mib()
            started = time.perf_counter()
            shipped()
            trim_s = time.perf_counter() - started
            results.append({"request": name, **size, "request_s": round(generate_s, 3),
                            "trim_ms": round(trim_s * 1000, 2), "rss_before_trim_mib": round(before, 1),
                            "rss_after_trim_mib": round(rss_mib(), 1)})
    finally:
        service_module.trim_host_heap = shipped
    return results


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=240, help=f"small requests per run (blocks of {BLOCK})")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    service = load_service()
    # Without the trim first: the run with it then starts from a heap the first one grew and the
    # trim has just emptied, as a long-running worker's would be.
    runs = [growth(service, args.requests, trim=False, seed=0), growth(service, args.requests, trim=True, seed=1)]
    result = {
        "command": "python -m tests.harness.heap_trim" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "trim_cost": trim_cost(service),
        "seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

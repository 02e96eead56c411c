"""Run requests on one worker spread over N ranks, in-process, as TorchServe's torchrun starts it.

Each rank builds the same ``WanService`` TorchServe's handler builds (the rank layout comes from
torchrun's environment: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and is handed
every request, as TorchServe hands every request to every rank. The leader writes what it
answered, and, with ``--frames``, the decoded frames of each request (to compare with one GPU
before any video encoding).

    torchrun --nproc-per-node 2 -m scripts.ranks --model-config config/models/ti2v-5b-2gpu.yaml \\
        --requests requests.json --out ranks-out/

Used by tests/test_parallel.py (gloo, CPU) and scripts/benchmark.py's ``parallel`` stage (NCCL).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from handler.config import load_handler_config


def run(model_yaml: dict[str, Any], model_dir: Path, requests: list[dict[str, Any]], out: Path,
        frames: bool = False, gpu: bool = False) -> None:
    from handler.service import WanService

    started = time.perf_counter()
    service = WanService.from_model_config(model_yaml, model_dir, 0 if gpu else None)
    start_s = time.perf_counter() - started
    group = service.pipeline.group
    leader = group is None or group.is_leader
    generated = []
    if frames and leader:
        # Keep the frames the service produced, before its MP4 encoder (no second generation).
        generate = service.pipeline.generate

        def generate_and_keep(*args, **kwargs):
            generated.append(generate(*args, **kwargs))
            return generated[-1]

        service.pipeline.generate = generate_and_keep
    answers = []
    for index, body in enumerate(requests):
        # handle() returns after the frames reached the host (rank 0) or the denoise ended
        # (the others): no device sync is needed around it.
        mark = time.perf_counter()
        reply = service.handle(dict(body), f"ranks-{index}")
        wall_s = time.perf_counter() - mark
        if not leader:
            continue
        answer = {"status": reply.status, "wall_s": round(wall_s, 3)}
        answer["body"] = reply.body if isinstance(reply.body, dict) else {"bytes": len(reply.body)}
        answer["body"].get("video", {}).pop("base64", None)
        if frames and reply.status == 200:
            np.save(out / f"frames-{index}.npy", generated[-1].frames)
        answers.append(answer)
    if leader:
        layout = group.layout if group else None
        (out / "answers.json").write_text(json.dumps({
            "world_size": layout.world_size if layout else 1,
            "cfg_degree": layout.cfg_degree if layout else 1,
            "ulysses_degree": layout.ulysses_degree if layout else 1,
            "start_s": round(start_s, 2), **{k: round(v, 2) for k, v in service.startup_s.items()},
            "answers": answers,
        }, indent=2) + "\n")
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group.control)
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", required=True, help="model-config.yaml (its handler: section)")
    parser.add_argument("--model-path", help="override handler.model_path")
    parser.add_argument("--requests", required=True, help="JSON file: a list of request bodies")
    parser.add_argument("--out", required=True, help="folder for answers.json (and frames-N.npy)")
    parser.add_argument("--frames", action="store_true", help="also save each request's decoded frames")
    parser.add_argument("--set", action="append", default=[], help="handler override, e.g. speed.compile=false")
    args = parser.parse_args(argv)
    model_yaml = yaml.safe_load(Path(args.model_config).read_text())
    handler = model_yaml.setdefault("handler", {})
    if args.model_path:
        handler["model_path"] = str(Path(args.model_path).resolve())
    for setting in args.set:
        key, _, value = setting.partition("=")
        *parents, leaf = key.split(".")
        section = handler
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = yaml.safe_load(value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_config).resolve().parent
    # deviceType as the handler reads it (handler/config.py: the one reader of model-config.yaml).
    gpu = load_handler_config(model_yaml, model_dir).worker.wants_gpu
    if gpu:
        import torch

        gpu = torch.cuda.is_available()
    run(model_yaml, model_dir, json.loads(Path(args.requests).read_text()), out, args.frames, gpu)


if __name__ == "__main__":
    main()

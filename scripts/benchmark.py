"""Benchmark the Wan2.2 server against plain diffusers, in one run on one machine.

Stages (``--stages``, in this order):

- ``build``: the checkpoint (tiny: seconds on a CPU; full: the real architectures with random
  weights, built on the GPU and saved in the diffusers layout; see model_store/full_size.py);
- ``baseline``: plain diffusers as its docs show it (``from_pretrained``, ``.to("cuda")``, one
  call with the same request; encoding with our encoder so only generation differs);
- ``inprocess``: our handler's service in this process: load, warm-up, then the request;
- ``torchserve``: a real TorchServe process with our archive: cold start (start to ready,
  optionally from a dropped page cache) and the same request over HTTP; its overhead over
  ``inprocess``;
- ``parallel``: the same request on one worker of N ranks for each N of ``--nproc`` (1,2 by
  default), each run as TorchServe runs it (torchrun, scripts/ranks.py): seconds per stage, the
  speedup of each stage over the first N, and how far each run's frames are from the first's.
- ``encode``: the MP4 encoder alone, for each x264 setting of ``--x264-params`` (the first is the
  reference): seconds, bytes, and how many different files ``--repeat`` encodes of the same frames
  gave (1 means reproducible), on the tiny model's frames for the request and on a synthetic
  stack (``--synthetic-frames``, 1280x704x121 by default: smooth moving colour fields with noise,
  the size of a TI2V-5B video).

Writes one JSON file (command, device, versions, every figure) and prints a summary.

    python -m scripts.benchmark --variant ti2v-5b --size full --checkpoint /tmp/ti2v-full \\
        --stages build,baseline,inprocess,torchserve --out benchmarks/results/h200-ti2v-5b.json
    python -m scripts.benchmark --size tiny --width 256 --height 256 --num-frames 33 \\
        --stages build,inprocess,torchserve --repeat 5 --out benchmarks/results/cpu-tiny.json
    python -m scripts.benchmark --variant ti2v-5b --size full --checkpoint /tmp/ti2v-full \
        --stages build,parallel --nproc 1,2 --out benchmarks/results/h200x2-ti2v-5b.json
    python -m scripts.benchmark --size tiny --width 64 --height 64 --num-frames 9 --steps 2 --seed 7 \
        --stages build,encode --repeat 40 --out benchmarks/results/cpu-x264-determinism.json
    python -m scripts.benchmark chart benchmarks/results/*.json --out benchmarks/chart.png
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import torch
import yaml

from scripts.serve import REPO_ROOT, isolated_layout, read_key, start, stop

STAGES = ("build", "baseline", "inprocess", "torchserve", "parallel", "encode")
MODEL_CONFIGS = {"ti2v-5b": "ti2v-5b.yaml", "t2v-a14b": "t2v-a14b.yaml", "i2v-a14b": "i2v-a14b.yaml"}
PROMPT = "A red fox trots through fresh snow at dawn, soft golden light, the camera tracking alongside."


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "cuda": str(torch.version.cuda)}
    try:
        import ts.version

        versions["torchserve"] = ts.version.__version__
    except ImportError:
        pass
    return versions


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model} ({os.cpu_count()} cores)"


def _git_commit() -> str:
    if os.environ.get("WAN_GIT_COMMIT"):  # the GPU machines get a copy of the tree without .git
        return os.environ["WAN_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _drop_page_cache() -> bool:
    """Make the next load read from disk, not memory (root on Linux only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class Benchmark:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.size == "full" else "cpu")
        self.checkpoint = Path(args.checkpoint or tempfile.mkdtemp(prefix=f"wan-{args.size}-")) / args.variant
        config_name = "tiny-ti2v.yaml" if args.size == "tiny" else MODEL_CONFIGS[args.variant]
        self.model_config_file = REPO_ROOT / "config" / "models" / config_name
        self.model_yaml = yaml.safe_load(self.model_config_file.read_text())
        handler = self.model_yaml.setdefault("handler", {})
        handler["model_path"] = str(self.checkpoint)
        if args.speed:
            handler["speed"] = {**handler.get("speed", {}), **dict(_parse_setting(s) for s in args.speed)}
        self.request = self._request()
        self.pipe = None  # the in-memory pipeline (--in-memory), shared by baseline and inprocess
        self.result: dict[str, Any] = {
            "command": "python -m scripts.benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "device": _device_name(self.device),
            "versions": _versions(),
            "variant": args.variant,
            "size": args.size,
            "request": {k: v for k, v in self.request.items() if k not in ("prompt", "image")},
            "speed_options": handler.get("speed", {}),
        }

    def _request(self) -> dict[str, Any]:
        from handler.config import load_handler_config
        from handler.variants import VARIANTS

        config = load_handler_config(self.model_yaml, REPO_ROOT)
        defaults = config.defaults_for(VARIANTS[self.args.variant].defaults)
        request = {
            "prompt": PROMPT, "seed": self.args.seed, "output": "inline",
            "width": self.args.width or defaults.width, "height": self.args.height or defaults.height,
            "num_frames": self.args.num_frames or defaults.num_frames,
            "num_inference_steps": self.args.steps or defaults.num_inference_steps,
        }
        if self.args.variant == "i2v-a14b":
            buffer = io.BytesIO()
            _image(request["width"], request["height"]).save(buffer, "PNG")
            request["image"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return request

    # -- stages -----------------------------------------------------------------------

    def build(self) -> None:
        started = time.perf_counter()
        if self.args.in_memory:
            # The A14B pair is ~68 GB: more than the GPU machines' disks hold next to everything
            # else. Build it on the GPU and run it from memory (no cold-start figure then).
            if self.args.size == "tiny":
                from model_store.tiny_model import build_pipeline

                self.pipe = build_pipeline(self.args.variant)
            else:
                from model_store.full_size import build_full_pipeline

                self.pipe = build_full_pipeline(self.args.variant, str(self.device))
            _sync(self.device)
            self.result["build"] = {"seconds": round(time.perf_counter() - started, 2), "in_memory": True}
            return
        if self.args.size == "tiny":
            from model_store.tiny_model import build_tiny_checkpoint

            build_tiny_checkpoint(self.args.variant, self.checkpoint)
        else:
            from model_store.full_size import save_full_checkpoint

            save_full_checkpoint(self.args.variant, self.checkpoint)
        size_gb = sum(p.stat().st_size for p in self.checkpoint.rglob("*") if p.is_file()) / 1e9
        self.result["build"] = {"seconds": round(time.perf_counter() - started, 2), "checkpoint_gb": round(size_gb, 2)}
        _free(self.device)

    def baseline(self) -> None:
        """Plain diffusers, as its documentation shows it, on the same request."""
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline

        from handler.variants import VARIANTS
        from handler.video import encode_mp4

        spec = VARIANTS[self.args.variant]
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        cls = WanImageToVideoPipeline if spec.pipeline_class == "WanImageToVideoPipeline" else WanPipeline
        started = time.perf_counter()
        if self.pipe is not None:
            pipe, vae, offload = self.pipe, None, False
            if self.device.type == "cuda" and self._too_big_for_gpu(pipe):
                self.result["baseline"] = {"skipped": "both experts and an activation reserve do not fit this GPU"}
                return
        else:
            vae = AutoencoderKLWan.from_pretrained(self.checkpoint, subfolder="vae", torch_dtype=torch.float32)
            pipe = cls.from_pretrained(self.checkpoint, vae=vae, torch_dtype=dtype)
            offload = self.device.type == "cuda" and self._too_big_for_gpu(pipe)
            if offload:
                pipe.enable_model_cpu_offload()  # what the diffusers docs do when the model does not fit
            else:
                pipe.to(self.device)
        _sync(self.device)
        load_s = time.perf_counter() - started
        pipe.set_progress_bar_config(disable=True)
        kwargs = {k: v for k, v in self.request.items() if k not in ("seed", "output", "image")}
        kwargs["generator"] = torch.Generator("cpu").manual_seed(self.args.seed)
        if "image" in self.request:
            kwargs["image"] = _image(self.request["width"], self.request["height"])
        _reset_peak(self.device)
        started = time.perf_counter()
        frames = pipe(**kwargs, output_type="np").frames[0]
        _sync(self.device)
        generate_s = time.perf_counter() - started
        mark = time.perf_counter()
        encode_mp4((frames * 255).round().clip(0, 255).astype("uint8"), spec.defaults.fps)
        encode_s = time.perf_counter() - mark
        self.result["baseline"] = {
            "load_s": round(load_s, 2), "generate_s": round(generate_s, 2), "video_encode_s": round(encode_s, 2),
            "total_s": round(generate_s + encode_s, 2), "peak_gpu_gib": _peak_gib(self.device),
            "model_cpu_offload": offload,
        }
        del pipe, vae, frames
        _free(self.device)

    def _too_big_for_gpu(self, pipe) -> bool:
        from handler.pipeline import ACTIVATION_RESERVE_BYTES, _module_bytes

        weights = sum(_module_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
        return weights + ACTIVATION_RESERVE_BYTES > torch.cuda.get_device_properties(self.device).total_memory

    def inprocess(self) -> None:
        from handler.service import WanService

        if self.args.drop_caches:
            self.result["page_cache_dropped_before_inprocess"] = _drop_page_cache()
        started = time.perf_counter()
        if self.pipe is not None:
            service = self._service_from_memory()
        else:
            service = WanService.from_model_config(self.model_yaml, REPO_ROOT, 0 if self.device.type == "cuda" else None)
        cold_start_s = time.perf_counter() - started
        runs = []
        for index in range(self.args.repeat):
            _reset_peak(self.device)
            mark = time.perf_counter()
            reply = service.handle(dict(self.request), f"bench-{index}")
            wall_s = time.perf_counter() - mark
            if reply.status != 200:
                raise SystemExit(f"in-process request failed: {reply.body}")
            runs.append({"wall_s": round(wall_s, 3), **reply.body["timings"], "peak_gpu_gib": _peak_gib(self.device)})
        swap = service.pipeline.expert_swap
        self.result["inprocess"] = {
            "cold_start_s": round(cold_start_s, 2), **{k: round(v, 2) for k, v in service.startup_s.items()},
            "runs": runs, **_summary(runs, self.request),
            "experts_swapped": swap is not None, "expert_swaps": swap.swaps if swap else 0,
        }
        del service
        _free(self.device)

    def _service_from_memory(self):
        """WanService over the in-memory pipeline, set up exactly as from_model_config does."""
        from handler.config import load_handler_config
        from handler.pipeline import WanVideoPipeline
        from handler.service import WanService
        from handler.variants import VARIANTS

        config = load_handler_config(self.model_yaml, REPO_ROOT)
        spec = VARIANTS[self.args.variant]
        pipeline = WanVideoPipeline(self.pipe, spec, config.defaults_for(spec.defaults), self.device, config.speed)
        service = WanService(config, pipeline)
        if self.device.type == "cuda" and config.speed.warmup:
            service.startup_s["warmup_s"] = pipeline.warm_up(config.defaults_for(spec.defaults))
        self.pipe = None  # the service owns it now
        return service

    def torchserve(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="wan-bench-ts-"))
        model_config = root / "model-config.yaml"
        model_config.write_text(yaml.safe_dump(self.model_yaml, sort_keys=False))
        layout = isolated_layout(root, model_path=self.checkpoint, model_config=model_config)
        if self.args.drop_caches:
            self.result["page_cache_dropped_before_torchserve"] = _drop_page_cache()
        cold_start_s = start(layout, timeout_s=self.args.start_timeout)
        try:
            headers = {"Authorization": f"Bearer {read_key(layout.key_file)}"}
            url = f"{layout.inference_url}/predictions/{layout.model_name}"
            runs = []
            for _ in range(self.args.repeat):
                mark = time.perf_counter()
                response = requests.post(url, json=self.request, headers=headers, timeout=3600)
                latency_s = time.perf_counter() - mark
                if response.status_code != 200:
                    raise SystemExit(f"TorchServe request failed: {response.status_code} {response.text[:500]}")
                body = response.json()
                base64.b64decode(body["video"]["base64"])  # the client's work: the video must be usable
                runs.append({"latency_s": round(latency_s, 3), **body["timings"],
                             "response_mb": round(len(response.content) / 1e6, 2)})
        finally:
            stop(layout)
        self.result["torchserve"] = {"cold_start_s": round(cold_start_s, 2), "runs": runs,
                                     "latency_median_s": round(statistics.median(r["latency_s"] for r in runs), 3)}
        inprocess = self.result.get("inprocess")
        if inprocess:
            ratio = self.result["torchserve"]["latency_median_s"] / inprocess["wall_median_s"] - 1
            self.result["torchserve"]["overhead_vs_inprocess"] = round(ratio, 4)

    def parallel(self) -> None:
        import numpy as np

        from scripts.serve import free_ports

        runs: dict[str, Any] = {}
        frames: dict[int, Path] = {}
        for nproc in self.args.nproc:
            out = Path(tempfile.mkdtemp(prefix=f"wan-ranks-{nproc}-"))
            model_yaml = dict(self.model_yaml, handler=dict(self.model_yaml["handler"]))
            if self.args.parallel:
                model_yaml["handler"]["parallel"] = dict(_parse_setting(s) for s in self.args.parallel)
            (out / "model-config.yaml").write_text(yaml.safe_dump(model_yaml, sort_keys=False))
            (out / "requests.json").write_text(json.dumps([self.request] * self.args.repeat))
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_ports(1)[0]), "-m", "scripts.ranks",
                       "--model-config", str(out / "model-config.yaml"), "--requests", str(out / "requests.json"),
                       "--out", str(out), "--frames"]
            print(" ".join(command), flush=True)
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO_ROOT)
            record = json.loads((out / "answers.json").read_text())
            bad = [a for a in record["answers"] if a["status"] != 200]
            if bad:
                raise SystemExit(f"{nproc} rank(s): request failed: {bad[0]}")
            timings = [dict(a["body"]["timings"], wall_s=a["wall_s"]) for a in record["answers"]]
            runs[str(nproc)] = {
                "process_s": round(time.perf_counter() - started, 2),
                **{k: record[k] for k in ("world_size", "cfg_degree", "ulysses_degree", "start_s")},
                **{k: record[k] for k in ("load_s", "warmup_s") if k in record},
                "runs": timings, **_summary(timings, self.request),
            }
            frames[nproc] = out / f"frames-{len(timings) - 1}.npy"
            self.result["parallel"] = {"runs": runs}
            self._write()
        first = self.args.nproc[0]
        reference = np.load(frames[first]).astype(np.int16)
        for nproc in self.args.nproc[1:]:
            entry = runs[str(nproc)]
            entry["speedup"] = {key: round(runs[str(first)][key] / entry[key], 3)
                                for key in ("wall_median_s", "text_encode_median_s", "denoise_median_s",
                                            "vae_decode_median_s", "total_median_s") if entry[key] > 0}
            difference = np.abs(np.load(frames[nproc]).astype(np.int16) - reference)
            # Frames are uint8: the difference is in levels of 255, over every pixel and channel.
            entry[f"frames_vs_{first}"] = {"max_abs": int(difference.max()), "mean_abs": float(difference.mean()),
                                           "share_differing": float((difference > 0).mean())}

    def encode(self) -> None:
        """Each x264 setting on the same frames, ``--repeat`` times: time, size, distinct files."""
        import dataclasses
        import hashlib

        from handler.config import load_handler_config
        from handler.service import WanService
        from handler.video import encode_mp4

        service = WanService.from_model_config(self.model_yaml, REPO_ROOT)
        request = service.parse(dict(self.request))
        stacks = {"tiny_model": service.pipeline.generate(request).frames}
        if self.args.synthetic_frames:
            width, height, count = (int(n) for n in self.args.synthetic_frames.split("x"))
            stacks[f"synthetic_{self.args.synthetic_frames}"] = _synthetic_frames(width, height, count)
        del service
        base = load_handler_config(self.model_yaml, REPO_ROOT).video
        settings = self.args.x264_params
        result: dict[str, Any] = {"crf": base.crf, "preset": base.preset, "fps": request.fps, "stacks": {}}
        for name, frames in stacks.items():
            repeat = self.args.repeat if name == "tiny_model" else max(1, self.args.repeat // 4)
            rows = {}
            for params in settings:
                video = dataclasses.replace(base, x264_params=params)
                seconds, digests = [], {}
                for _ in range(repeat):
                    mark = time.perf_counter()
                    mp4 = encode_mp4(frames, request.fps, video)
                    seconds.append(time.perf_counter() - mark)
                    digest = hashlib.sha256(mp4).hexdigest()[:16]
                    digests[digest] = digests.get(digest, 0) + 1
                rows[params or "x264 defaults"] = {
                    "encodes": repeat, "distinct_files": len(digests), "most_common_share": max(digests.values()) / repeat,
                    "median_s": round(statistics.median(seconds), 4), "bytes": len(mp4),
                }
                print(f"  {name} {params or 'x264 defaults'}: {rows[params or 'x264 defaults']}", flush=True)
            reference = rows[settings[0] or "x264 defaults"]
            for row in rows.values():
                row["time_vs_first"] = round(row["median_s"] / reference["median_s"], 2)
                row["bytes_vs_first"] = round(row["bytes"] / reference["bytes"], 3)
            shape = frames.shape
            result["stacks"][name] = {"frames": f"{shape[2]}x{shape[1]}x{shape[0]}", "settings": rows}
        self.result["encode"] = result

    def run(self) -> dict[str, Any]:
        for stage in self.args.stages:
            print(f"== {stage}", flush=True)
            getattr(self, stage)()
            self._write()
        return self.result

    def _write(self) -> None:
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.result, indent=2) + "\n")


def _image(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height), (128, 110, 90))


def _synthetic_frames(width: int, height: int, count: int):
    """Smooth colour fields drifting across the frame plus a little noise: moving content an
    encoder has to work on (random weights give noise; this is closer to a real video)."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    frames = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        red = 128 + 100 * np.sin((x + 4 * t) / 90.0) * np.cos(y / 70.0)
        green = 128 + 100 * np.sin((y - 3 * t) / 60.0 + x / 200.0)
        blue = 128 + 100 * np.cos((x + y + 5 * t) / 120.0)
        noisy = np.stack([red, green, blue], -1) + rng.normal(0, 6, (height, width, 3))
        frames[t] = np.clip(noisy, 0, 255).astype(np.uint8)
    return frames


def _summary(runs: list[dict[str, Any]], request: dict[str, Any]) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    summary = {"wall_median_s": median("wall_s")}
    for stage in ("text_encode_s", "denoise_s", "vae_decode_s", "video_encode_s", "total_s"):
        summary[f"{stage[:-2]}_median_s"] = median(stage)
    summary["seconds_per_step"] = round(summary["denoise_median_s"] / request["num_inference_steps"], 4)
    return summary


def _parse_setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def print_summary(result: dict[str, Any]) -> None:
    print(f"\n{result['variant']} ({result['size']}) on {result['device']}: {result['request']}")
    baseline = result.get("baseline", {})
    if "skipped" in baseline:
        print(f"  plain diffusers: skipped ({baseline['skipped']})")
    elif baseline:
        print(f"  plain diffusers: {baseline['total_s']:.2f} s (peak {baseline['peak_gpu_gib']} GiB)")
    if "inprocess" in result:
        r = result["inprocess"]
        print(f"  ours in-process: {r['wall_median_s']:.2f} s; denoise {r['denoise_median_s']:.2f} s "
              f"({r['seconds_per_step']:.3f} s/step), decode {r['vae_decode_median_s']:.2f} s; cold start "
              f"{r['cold_start_s']:.1f} s; peak {r['runs'][-1]['peak_gpu_gib']} GiB")
    if "torchserve" in result:
        r = result["torchserve"]
        print(f"  through TorchServe: {r['latency_median_s']:.2f} s, overhead "
              f"{100 * r.get('overhead_vs_inprocess', float('nan')):.2f}%; cold start {r['cold_start_s']:.1f} s")
    if "total_s" in baseline and "torchserve" in result:
        print(f"  speed-up over plain diffusers: {result['baseline']['total_s'] / result['torchserve']['latency_median_s']:.2f}x")


# One colour per stage in every panel.
_STAGE_COLORS = {"generate": "#7f7f7f", "text_encode": "#9467bd", "denoise": "#1f77b4", "vae_decode": "#ff7f0e",
                 "video_encode": "#2ca02c", "serving": "#d62728"}


def chart(paths: list[str], out: str) -> None:
    """Stacked seconds per stage for each benchmark file: baseline, in-process, TorchServe, and
    each rank count of the parallel stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    stages = ("text_encode", "denoise", "vae_decode", "video_encode")
    for ax, result in zip(axes[0], results, strict=True):
        labels, stacks = [], []
        if "total_s" in result.get("baseline", {}):
            labels.append("plain\ndiffusers")
            stacks.append({"generate": result["baseline"]["generate_s"], "video_encode": result["baseline"]["video_encode_s"]})
        if "inprocess" in result:
            labels.append("ours\nin-process")
            stacks.append({s: result["inprocess"][f"{s}_median_s"] for s in stages})
        if "torchserve" in result:
            labels.append("ours via\nTorchServe")
            ts = result["torchserve"]
            inner = {s: statistics.median(r[f"{s}_s"] for r in ts["runs"]) for s in stages}
            inner["serving"] = max(0.0, ts["latency_median_s"] - sum(inner.values()))
            stacks.append(inner)
        for nproc, run in result.get("parallel", {}).get("runs", {}).items():
            labels.append(f"ours on\n{nproc} GPU{'s' if nproc != '1' else ''}")
            stacks.append({s: run[f"{s}_median_s"] for s in stages})
        bottoms = [0.0] * len(stacks)
        for key, color in _STAGE_COLORS.items():
            values = [stack.get(key, 0.0) for stack in stacks]
            if any(values):
                ax.bar(labels, values, bottom=bottoms, label=key.replace("_", " "), color=color)
                bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        request = result["request"]
        ax.set_title(f"{result['variant']} {request['width']}x{request['height']}x{request['num_frames']}, "
                     f"{request['num_inference_steps']} steps\n{result['device'][:40]}", fontsize=9)
        ax.set_ylabel("seconds per request")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "chart":
        parser = argparse.ArgumentParser(prog="scripts.benchmark chart")
        parser.add_argument("results", nargs="+")
        parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "chart.png"))
        args = parser.parse_args(argv[1:])
        chart(args.results, args.out)
        print(args.out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=tuple(MODEL_CONFIGS), default="ti2v-5b")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--checkpoint", help="parent folder of the checkpoint (built there if missing)")
    parser.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x], default=["build", "inprocess"])
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--speed", action="append", default=[], help="handler.speed override, e.g. compile=false")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each cold start")
    parser.add_argument("--in-memory", action="store_true",
                        help="build the pipeline in memory and run from it (no checkpoint on disk, no cold start)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--nproc", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                        help="parallel stage: rank counts to run, the first is the reference")
    parser.add_argument("--parallel", action="append", default=[], help="handler.parallel override, e.g. cfg_split=false")
    parser.add_argument("--x264-params", type=lambda s: s.split(","),
                        default=["", "mbtree=0", "asm=0", "mbtree=0:rc-lookahead=0", "asm=0:threads=1"],
                        help="encode stage: comma-separated x264 settings to compare ('' is x264's defaults)")
    parser.add_argument("--synthetic-frames", default="1280x704x121",
                        help="encode stage: WxHxF of the synthetic stack encoded besides the model's frames ('' for none)")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    result = Benchmark(args).run()
    print_summary(result)


if __name__ == "__main__":
    main()

"""How the fast modes behave with the GPU path's regional compilation, on the tiny model: how
often each way of changing LoRA adapters recompiles, whether the step cache runs under
``compile_repeated_blocks(fullgraph=True)``, and whether FP8 (torchao) runs. Behaviour, not
speed: the tiny model's timings mean nothing. Results go to BENCHMARKS.md with this command:

    python -m scripts.fast_modes_gpu --out fast-modes-gpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from handler.adapters import FastOptions, quantize_fp8
from handler.config import load_handler_config
from handler.pipeline import WanVideoPipeline
from handler.request import parse_request
from handler.variants import detect_variant
from model_store.tiny_model import build_tiny_checkpoint, lora_files

SEQUENCE = [None, [{"name": "tiny-lora"}], [{"name": "tiny-lora-b", "scale": 0.5}],
            [{"name": "tiny-lora", "scale": 0.5}], [{"name": "tiny-lora"}, {"name": "tiny-lora-b"}], None]


def _pipeline(path: Path, handler: dict) -> tuple[WanVideoPipeline, object]:
    config = load_handler_config({"deviceType": "gpu", "handler": {"model_path": str(path), **handler}}, path.parent)
    spec = detect_variant(path)
    pipe = WanVideoPipeline.load(path, spec, config.defaults_for(spec.defaults), torch.device("cuda", 0),
                                 config.speed, None, fast=FastOptions(config.lora, path, config.step_cache, config.fp8))
    return pipe, config


def _run(pipe, config, body: dict) -> np.ndarray:
    request = parse_request(dict({"prompt": "a fox", "seed": 1, "width": 256, "height": 256, "num_frames": 9,
                                  "num_inference_steps": 4}, **body), pipe.spec, pipe.defaults, config.limits,
                            False, rules=config.rules)
    return pipe.generate(request).frames


def _frame_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"frames_ok": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None}


def lora_modes(path: Path, layout: str) -> dict:
    results = {}
    adapters = {name: dict(files) for name, files in lora_files(layout).items()}
    for mode in ("side_by_side", "hotswap"):
        torch._dynamo.reset()
        pipe, config = _pipeline(path, {"lora": {"adapters": adapters, "hotswap": mode == "hotswap"},
                                        "speed": {"compile": True, "warmup": False}})
        per_request = []
        for lora in SEQUENCE:
            before = _frame_counts()
            started = time.perf_counter()
            _run(pipe, config, {"lora": lora} if lora else {})
            after = _frame_counts()
            per_request.append({"lora": lora, "seconds": round(time.perf_counter() - started, 3),
                                "new_dynamo_frames": after["frames_total"] - before["frames_total"]})
        results[mode] = per_request
        del pipe
        torch.cuda.empty_cache()
    return results


def step_cache(path: Path) -> dict:
    torch._dynamo.reset()
    out = {}
    try:
        pipe, config = _pipeline(path, {"speed": {"compile": True, "warmup": False}, "step_cache": {"threshold": 0.05},
                                        "profiles": {"cached": {"lossy": ["step_cache"]}}})
        exact = _run(pipe, config, {})
        cached = _run(pipe, config, {"profile": "cached"})
        again = _run(pipe, config, {})
        out.update(ran=True, differs=bool(not np.array_equal(exact, cached)), off_is_exact=bool(np.array_equal(exact, again)))
    except Exception as e:  # noqa: BLE001 - the finding is whether it runs
        out.update(ran=False, error=f"{e.__class__.__name__}: {str(e)[:400]}", trace=traceback.format_exc()[-1500:])
    return out


def fp8() -> dict:
    out = {}
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024))
        model = model.to("cuda", torch.bfloat16)
        x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
        reference = model(x)
        quantize_fp8([model], torch.device("cuda"))
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
        out.update(ran=True, weight_type=type(model[0].weight).__name__,
                   relative_error=float((got - reference).norm() / reference.norm()))
    except Exception as e:  # noqa: BLE001
        out.update(ran=False, error=f"{e.__class__.__name__}: {str(e)[:400]}", trace=traceback.format_exc()[-1500:])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    weights = Path(tempfile.mkdtemp())
    path = build_tiny_checkpoint("ti2v-5b", weights / "tiny-ti2v-5b")
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "command": "python -m scripts.fast_modes_gpu --out " + args.out}
    for name, run in (("fp8", fp8), ("step_cache", lambda: step_cache(path)),
                      ("lora", lambda: lora_modes(path, "ti2v-5b"))):
        try:
            result[name] = run()
        except Exception as e:  # noqa: BLE001
            result[name] = {"error": f"{e.__class__.__name__}: {str(e)[:400]}", "trace": traceback.format_exc()[-2000:]}
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

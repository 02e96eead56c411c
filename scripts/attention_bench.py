"""Attention kernels and the VAE decode of the full-size Wan2.2 models, timed on one GPU.

Random weights (model_store/full_size.py configurations): the compute is real, nothing here says
anything about quality. Every comparison is inside one run. Stages (``--stages``):

- ``kernels``: the attention op alone at the real shapes (TI2V-5B 1280x704x121: 27,280 tokens x 24
  heads; T2V-A14B 1280x720x81: 75,600 x 40; head dim 128), each SDPA backend and FlashAttention 4,
  with its difference from PyTorch's flash kernel;
- ``profile``: torch.profiler over one eager transformer forward per variant with today's default
  backend (``native`` SDPA): the kernels by CUDA time and the attention share;
- ``forward``: seconds per TI2V-5B transformer forward for each backend, eager and with the
  handler's regional compilation;
- ``a14b``: seconds per T2V-A14B (one expert) forward, ``native`` against ``flash4``;
- ``vae``: TI2V-5B VAE decode (float32, 31 latent frames at 44x80): plain, cudnn.benchmark,
  channels_last_3d, torch.compile of the decoder.

    python -m scripts.attention_bench --stages kernels,profile,forward,vae \\
        --backends native,_native_cudnn,_native_flash,_native_efficient,flash4 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime

import torch

SHAPES = {  # (tokens, heads) at the official 720p sizes; head dim 128 for both
    "ti2v-5b": dict(tokens=27280, heads=24, latent=(48, 31, 44, 80)),
    "t2v-a14b": dict(tokens=75600, heads=40, latent=(16, 21, 90, 160)),
}
START = time.perf_counter()
ATTENTION_MARKERS = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_generated", "cutlass::fmha")


def _events_time(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def _summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "runs": [round(t, 4) for t in times]}


# -- attention op alone -------------------------------------------------------------------------

def stage_kernels(args, result):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {}
    for variant, shape in SHAPES.items():
        torch.manual_seed(1)
        q, k, v = (torch.randn(1, shape["tokens"], shape["heads"], 128, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        flops = 4 * shape["tokens"] ** 2 * 128 * shape["heads"]

        def sdpa(backend=None):
            qt, kt, vt = (x.permute(0, 2, 1, 3) for x in (q, k, v))
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).permute(0, 2, 1, 3)
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).permute(0, 2, 1, 3)

        candidates = {"native (SDPA default)": lambda: sdpa(), "_native_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
                      "_native_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
                      "_native_efficient": lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION)}
        if "flash4" in args.backends:
            from handler.attention import _forward

            candidates["flash4"] = lambda: _forward(q, k, v, None)[0]
        reference = sdpa(SDPBackend.FLASH_ATTENTION).float()
        rows = {}
        for name, fn in candidates.items():
            try:
                out = fn().float()
                error = ((out - reference).norm() / reference.norm()).item()
                times = _events_time(fn, 2, args.reps)
                rows[name] = {**_summary(times), "tflops": round(flops / statistics.median(times) / 1e12, 1),
                              "rel_err_vs_native_flash": float(f"{error:.3e}")}
            except Exception as error:  # noqa: BLE001 -- record why a backend cannot run, go on
                rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"kernels {variant} {name}: {rows[name]}", flush=True)
        table[variant] = {"shape_bshd": [1, shape["tokens"], shape["heads"], 128], "tflop_per_call": round(flops / 1e12, 2),
                          "backends": rows}
        del q, k, v, reference
        torch.cuda.empty_cache()
    result["kernels"] = table


# -- transformer forwards -----------------------------------------------------------------------

def _transformer(variant: str):
    from model_store.full_size import _on, A14B_TRANSFORMER, TI2V_5B_TRANSFORMER
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = TI2V_5B_TRANSFORMER if variant == "ti2v-5b" else dict(A14B_TRANSFORMER, in_channels=16)
    return _on("cuda", torch.bfloat16, lambda: WanTransformer3DModel(**config))


def _inputs(variant: str) -> dict:
    shape = SHAPES[variant]
    generator = torch.Generator("cuda").manual_seed(2)
    latents = torch.randn(1, *shape["latent"], device="cuda", dtype=torch.bfloat16, generator=generator)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=generator)
    if variant == "ti2v-5b":  # expand_timesteps: one timestep per token, as WanPipeline passes it
        timestep = torch.full((1, shape["tokens"]), 500.0, device="cuda")
    else:
        timestep = torch.tensor([500.0], device="cuda")
    return dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)


def _set_backend(model, backend: str):
    from handler.attention import apply_backend

    apply_backend(model, backend)


def stage_profile(args, result):
    from torch.profiler import ProfilerActivity, profile

    table = {}
    for variant in args.profile_variants:
        model = _transformer(variant)
        inputs = _inputs(variant)
        with torch.inference_mode():
            model(**inputs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(**inputs)
                torch.cuda.synchronize()
        kernels = defaultdict(lambda: [0.0, 0])
        for event in prof.events():
            if event.device_type.name == "CUDA":
                kernels[event.name][0] += event.time_range.elapsed_us()
                kernels[event.name][1] += 1
        total = sum(t for t, _ in kernels.values())
        attention = {name: t for name, (t, _) in kernels.items() if any(m in name.lower() for m in ATTENTION_MARKERS)}
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]
        table[variant] = {
            "backend": "native (eager, diffusers default)", "cuda_time_s": round(total / 1e6, 3),
            "attention_share": round(sum(attention.values()) / total, 4),
            "attention_kernels": {name[:200]: round(t / total, 4) for name, t in attention.items()},
            "top_kernels": [{"name": name[:200], "share": round(t / total, 4), "calls": n, "s": round(t / 1e6, 4)}
                            for name, (t, n) in top],
        }
        print(f"profile {variant}: total {total / 1e6:.2f} s, attention {table[variant]['attention_share']:.1%}", flush=True)
        for row in table[variant]["top_kernels"][:8]:
            print(f"  {row['share']:6.1%} x{row['calls']:4d} {row['name'][:110]}", flush=True)
        del model, prof
        torch.cuda.empty_cache()
    result["profile"] = table


def _time_forwards(model, inputs, warmup: int, reps: int) -> dict:
    with torch.inference_mode():
        started = time.perf_counter()
        model(**inputs)
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        times = _events_time(lambda: model(**inputs), max(0, warmup - 1), reps)
    return {**_summary(times), "first_call_s": round(first, 2)}


def stage_forward(args, result, variant="ti2v-5b", key="forward"):
    compiled_backends = args.compiled if key == "forward" else args.a14b_compiled
    reps = args.reps if key == "forward" else args.a14b_reps
    model = _transformer(variant)
    inputs = _inputs(variant)
    table = {"eager": {}, "compiled": {}}
    reference = None
    for backend in args.backends:
        try:
            _set_backend(model, backend)
            table["eager"][backend] = _time_forwards(model, inputs, 1, reps)
            with torch.inference_mode():
                out = model(**inputs)[0].float()
            if reference is None:
                reference = out
            table["eager"][backend]["rel_err_vs_first"] = float(
                f"{((out - reference).norm() / reference.norm()).item():.3e}")
        except Exception as error:  # noqa: BLE001
            table["eager"][backend] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(f"{key} {variant} eager {backend}: {table['eager'][backend]}", flush=True)
    if compiled_backends:
        model.compile_repeated_blocks(fullgraph=True)
        for backend in compiled_backends:
            try:
                _set_backend(model, backend)
                table["compiled"][backend] = _time_forwards(model, inputs, 2, reps)
            except Exception as error:  # noqa: BLE001
                table["compiled"][backend] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"{key} {variant} compiled {backend}: {table['compiled'][backend]}", flush=True)
    result[key] = {"variant": variant, "tokens": SHAPES[variant]["tokens"], **table}
    del model
    torch.cuda.empty_cache()


def stage_a14b(args, result):
    stage_forward(args, result, variant="t2v-a14b", key="a14b")


# -- VAE decode ---------------------------------------------------------------------------------

def stage_vae(args, result):
    from model_store.full_size import _on, WAN22_VAE
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = _on("cuda", torch.float32, lambda: AutoencoderKLWan(**WAN22_VAE))
    latents = torch.randn(1, *SHAPES["ti2v-5b"]["latent"], device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    table = {}

    def decode():
        return vae.decode(latents, return_dict=False)[0]

    def measure(name, reps=2):
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            started = time.perf_counter()
            out = decode()
            torch.cuda.synchronize()
            first = time.perf_counter() - started
            times = _events_time(decode, 0, reps)
        table[name] = {**_summary(times), "first_call_s": round(first, 2),
                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        print(f"vae {name}: {table[name]}", flush=True)
        return out.float()

    reference = measure("plain")
    torch.backends.cudnn.benchmark = True
    out = measure("cudnn.benchmark")
    table["cudnn.benchmark"]["max_abs_diff_vs_plain"] = float(f"{(out - reference).abs().max().item():.3e}")
    vae.to(memory_format=torch.channels_last_3d)
    out = measure("cudnn.benchmark+channels_last_3d")
    table["cudnn.benchmark+channels_last_3d"]["max_abs_diff_vs_plain"] = float(
        f"{(out - reference).abs().max().item():.3e}")
    vae.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False
    if args.vae_compile and time.perf_counter() - START < args.deadline_s - 200:
        try:
            vae.decoder = torch.compile(vae.decoder)
            out = measure("compile(decoder)")
            table["compile(decoder)"]["max_abs_diff_vs_plain"] = float(f"{(out - reference).abs().max().item():.3e}")
        except Exception as error:  # noqa: BLE001
            table["compile(decoder)"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"vae compile: {table['compile(decoder)']}", flush=True)
    result["vae"] = {"latent": [1, *SHAPES["ti2v-5b"]["latent"]], "dtype": "float32", **table}
    del vae
    torch.cuda.empty_cache()


STAGES = {"kernels": stage_kernels, "profile": stage_profile, "forward": stage_forward, "a14b": stage_a14b,
          "vae": stage_vae}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="kernels,profile,forward,vae")
    parser.add_argument("--backends", default="native,_native_cudnn,_native_flash,_native_efficient,flash4",
                        type=lambda s: s.split(","))
    parser.add_argument("--compiled", default="native", type=lambda s: [x for x in s.split(",") if x],
                        help="backends to time with regional compilation too (empty: none)")
    parser.add_argument("--a14b-compiled", default="", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--a14b-reps", type=int, default=2)
    parser.add_argument("--deadline-s", type=float, default=540, help="skip what would start after this")
    parser.add_argument("--profile-variants", default="ti2v-5b,t2v-a14b", type=lambda s: s.split(","))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--vae-compile", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import diffusers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
                "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers.__version__}
    try:
        from importlib.metadata import version

        versions["flash-attn-4"] = version("flash-attn-4")
        versions["nvidia-cutlass-dsl"] = version("nvidia-cutlass-dsl")
    except Exception:  # noqa: BLE001
        pass
    result = {"command": "python -m scripts.attention_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "git_commit": os.environ.get("WAN_GIT_COMMIT", "unknown"),
              "device": torch.cuda.get_device_name(), "versions": versions,
              "note": "full-size architectures, random weights: timings only, nothing about quality"}
    for stage in args.stages.split(","):
        started = time.perf_counter()
        if started - START > args.deadline_s:
            result.setdefault("skipped", []).append(stage)
            continue
        try:
            STAGES[stage](args, result)
        except Exception as error:  # noqa: BLE001 -- keep what the other stages measured
            result.setdefault("errors", {})[stage] = f"{type(error).__name__}: {str(error)[:500]}"
            print(f"stage {stage} failed: {error}", flush=True)
        result.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - started, 1)
        with open(args.out, "w") as handle:  # after every stage: a run cut short keeps what it had
            json.dump(result, handle, indent=1)
    print(json.dumps(result.get("stage_seconds")), flush=True)


if __name__ == "__main__":
    main()

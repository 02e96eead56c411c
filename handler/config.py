"""The handler's configuration: the ``handler:`` section of a model's model-config.yaml.

Read once when the worker starts. Unknown keys are rejected so a typo in a deployment cannot
silently fall back to a default. Units are in the names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handler.errors import ConfigError
from handler.variants import GenerationDefaults


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds on what one request may ask for. They protect the worker, not quality."""

    max_side_px: int = 1280
    # Largest width x height; the native 720p area by default.
    max_pixels: int = 1280 * 720
    max_num_frames: int = 161
    max_fps: int = 60
    max_inference_steps: int = 100
    max_guidance_scale: float = 20.0
    max_prompt_chars: int = 4000
    # Decoded image bytes; the base64 text may be 4/3 of this.
    max_image_bytes: int = 16 * 1024 * 1024
    # Checked from the image header before any pixel is decoded (decompression bombs).
    max_image_pixels: int = 4096 * 4096
    # The whole JSON body as bytes, when TorchServe hands it over undecoded.
    max_body_bytes: int = 24 * 1024 * 1024


@dataclass(frozen=True)
class VideoEncoding:
    """libx264 settings for the MP4 we return."""

    crf: int = 18
    preset: str = "veryfast"


# auto: FlashAttention 4 on Hopper where installed, else native (handler/attention.py).
ATTENTION_BACKENDS = ("auto", "flash4", "native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage")
EXPERT_PLACEMENTS = ("auto", "gpu", "swap")
VAE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class SpeedOptions:
    """How the pipeline runs on a GPU. All defaults are lossless (same math as plain diffusers);
    on CPU only ``vae_dtype`` applies. Measured in BENCHMARKS.md."""

    # diffusers attention backend for the transformer(s).
    attention_backend: str = "native"
    # Regional torch.compile of the repeated transformer blocks (GPU only).
    compile: bool = True
    # Run one short generation at the default size in initialize, so compilation and autotuning
    # are paid at start, not by the first user. Other sizes compile on first use.
    warmup: bool = True
    # float32 is what diffusers recommends for quality; bfloat16 decodes faster and changes pixels.
    vae_dtype: str = "float32"
    # Decode in tiles: less memory, slower. For GPUs too small for a full-size decode.
    vae_tiling: bool = False
    # TF32 for float32 matmuls: faster VAE, slightly different pixels; off = PyTorch's default.
    tf32: bool = False
    # Two-expert variants: "gpu" keeps both on the GPU; "swap" keeps only the active one there
    # (the other waits in pinned host memory and is swapped in at the boundary step), so the
    # 14B pair fits one 80 GB GPU; "auto" swaps when both would not fit with room to run.
    expert_placement: str = "auto"

    def __post_init__(self):
        for name, allowed in (("attention_backend", ATTENTION_BACKENDS), ("expert_placement", EXPERT_PLACEMENTS),
                              ("vae_dtype", VAE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"handler.speed.{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ParallelOptions:
    """How one worker spread over several GPUs (torchrun ranks) splits a generation. Only read
    when TorchServe starts the worker with torchrun (model-config.yaml's ``torchrun`` section)."""

    # Run the conditional and unconditional forwards of each guided step on two halves of the
    # ranks at once (when the rank count is even); the rest of the split goes to the sequence.
    cfg_split: bool = True
    # A rank waits this long in a collective for the others before giving up (then the worker
    # restarts). Above the longest single step, far below responseTimeout.
    collective_timeout_s: float = 300.0

    def __post_init__(self):
        if self.collective_timeout_s <= 0:
            raise ConfigError("handler.parallel.collective_timeout_s must be above 0")


@dataclass(frozen=True)
class HandlerConfig:
    model_path: Path
    # Overrides of the variant's defaults table, by GenerationDefaults field name.
    default_overrides: Mapping[str, Any] = field(default_factory=dict)
    limits: RequestLimits = field(default_factory=RequestLimits)
    video: VideoEncoding = field(default_factory=VideoEncoding)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    # torch intra-op threads per worker on CPU; None: the machine's cores / maxWorkers.
    cpu_threads: int | None = None
    # A generation still running this many seconds after its request arrived stops itself at
    # the next step (504), so TorchServe's responseTimeout never has to kill the worker.
    deadline_s: float = 108.0

    def defaults_for(self, variant_defaults: GenerationDefaults) -> GenerationDefaults:
        return dataclasses.replace(variant_defaults, **self.default_overrides)


def _typed_section(cls, section: Any, where: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if section is None:
        return cls()
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"unknown key {where}.{key}; known: {', '.join(sorted(known))}")
        values[key] = _check_type(value, type(getattr(cls(), key)), f"{where}.{key}")
    return cls(**values)


def _check_type(value: Any, expected: type, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    return value


_DEFAULT_FIELD_TYPES = {
    "width": int, "height": int, "num_frames": int, "fps": int, "num_inference_steps": int,
    "guidance_scale": float, "guidance_scale_2": float, "flow_shift": float,
    "negative_prompt": str,
}
_HANDLER_KEYS = {"model_path", "defaults", "limits", "video", "speed", "parallel", "cpu_threads", "deadline_s"}
# TorchServe's responseTimeout when model-config.yaml does not set one.
TORCHSERVE_DEFAULT_RESPONSE_TIMEOUT_S = 120


def _deadline(model_yaml: Mapping[str, Any], section: Mapping[str, Any]) -> float:
    """handler.deadline_s, or responseTimeout less a margin for the VAE decode, encoding and
    the answer: 10 % of it, at least 10 s."""
    response_timeout = (model_yaml or {}).get("responseTimeout", TORCHSERVE_DEFAULT_RESPONSE_TIMEOUT_S)
    response_timeout = _check_type(response_timeout, float, "responseTimeout")
    if "deadline_s" not in section:
        return max(1.0, response_timeout - max(10.0, 0.1 * response_timeout))
    deadline = _check_type(section["deadline_s"], float, "handler.deadline_s")
    if not 0 < deadline < response_timeout:
        raise ConfigError(f"handler.deadline_s must be above 0 and below responseTimeout ({response_timeout:g} s), "
                          f"got {deadline:g}")
    return deadline


def load_handler_config(model_yaml: Mapping[str, Any] | None, model_dir: str | Path) -> HandlerConfig:
    """Parse model-config.yaml (as TorchServe hands it over) into a HandlerConfig.

    ``handler.model_path`` may be absolute or relative to the model's folder; the environment
    variable ``WAN_MODEL_PATH`` overrides it (handy in containers).
    """
    section = (model_yaml or {}).get("handler") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("handler: must be a mapping in model-config.yaml")
    unknown = set(section) - _HANDLER_KEYS
    if unknown:
        raise ConfigError(
            f"unknown key(s) handler.{', handler.'.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(_HANDLER_KEYS))}"
        )

    raw_path = os.environ.get("WAN_MODEL_PATH") or section.get("model_path")
    if not raw_path or not isinstance(raw_path, str):
        raise ConfigError("handler.model_path is required: the folder of the diffusers checkpoint")
    model_path = Path(raw_path)
    if not model_path.is_absolute():
        # TorchServe hands a symlinked temp folder for no-archive models; resolve it first so
        # relative paths mean "relative to the model's own folder".
        model_path = Path(os.path.realpath(model_dir)) / model_path

    overrides = section.get("defaults") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError("handler.defaults must be a mapping")
    checked = {}
    for key, value in overrides.items():
        if key not in _DEFAULT_FIELD_TYPES:
            raise ConfigError(
                f"unknown key handler.defaults.{key}; known: {', '.join(sorted(_DEFAULT_FIELD_TYPES))}"
            )
        checked[key] = _check_type(value, _DEFAULT_FIELD_TYPES[key], f"handler.defaults.{key}")

    cpu_threads = section.get("cpu_threads")
    if cpu_threads is not None:
        cpu_threads = _check_type(cpu_threads, int, "handler.cpu_threads")
        if cpu_threads < 1:
            raise ConfigError("handler.cpu_threads must be at least 1")

    return HandlerConfig(
        model_path=model_path.resolve(),
        default_overrides=checked,
        limits=_typed_section(RequestLimits, section.get("limits"), "handler.limits"),
        video=_typed_section(VideoEncoding, section.get("video"), "handler.video"),
        speed=_typed_section(SpeedOptions, section.get("speed"), "handler.speed"),
        parallel=_typed_section(ParallelOptions, section.get("parallel"), "handler.parallel"),
        cpu_threads=cpu_threads,
        deadline_s=_deadline(model_yaml, section),
    )

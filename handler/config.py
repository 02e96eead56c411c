"""The handler's configuration: the ``handler:`` section of a model's model-config.yaml.

Read once when the worker starts. Unknown keys are rejected so a typo in a deployment cannot
silently fall back to a default. Units are in the names.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
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
    # Same frames, same bytes: with x264's defaults (macroblock-tree rate control on) the same
    # frames gave different files in about one encode of five (PyAV's libx264); with mbtree=0
    # every encode was identical. Cost at crf 18: 1.6x the bytes and +34 % encode time on a
    # 1280x704x121 video, ~1 s (BENCHMARKS.md, scripts/benchmark.py's encode stage).
    # Only x264's own ``key=value:...`` syntax; empty: x264's defaults (not reproducible).
    x264_params: str = "mbtree=0"

    def __post_init__(self):
        if self.x264_params and not _X264_PARAMS.fullmatch(self.x264_params):
            raise ConfigError(f"handler.video.x264_params must be x264's key=value:key=value form, "
                              f"got {self.x264_params!r}")


_X264_PARAMS = re.compile(r"[a-z0-9-]+=[\w.,-]+(:[a-z0-9-]+=[\w.,-]+)*")


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


SCHEDULERS = ("unipc", "euler")
# What a profile may switch on that changes the computation (listed in the response's "lossy").
PROFILE_LOSSY = ("step_cache",)


@dataclass(frozen=True)
class LoraChoice:
    """One adapter at one scale: what a request, a profile or the fused list names."""

    name: str
    scale: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


@dataclass(frozen=True)
class LoraAdapter:
    """One allowed adapter (diffusers/PEFT or original Wan key layout, safetensors). ``path`` goes
    into ``transformer`` (TI2V-5B's only one; the A14B high-noise expert), ``path_2`` into
    ``transformer_2`` (the A14B low-noise expert; ``load_into_transformer_2``): Wan2.2-Lightning
    ships one file per expert. Relative paths are relative to the checkpoint folder."""

    name: str
    path: str | None = None
    path_2: str | None = None
    # A request may ask for a scale in (0, max_scale].
    max_scale: float = 2.0


@dataclass(frozen=True)
class LoraOptions:
    """handler.lora: the allow-list, what is fused at load, and how adapters change per request."""

    adapters: Mapping[str, LoraAdapter] = field(default_factory=dict)
    # Fused into the weights at load (no per-request cost, cannot be switched off).
    fuse: tuple[LoraChoice, ...] = ()
    # Adapters one request may combine (its own plus its profile's).
    max_per_request: int = 2
    # Swap adapter weights in place (diffusers' enable_lora_hotswap) instead of switching among
    # adapters loaded side by side: the compiled transformer's graph never changes (README).
    hotswap: bool = False


@dataclass(frozen=True)
class StepCache:
    """handler.step_cache: diffusers' FirstBlockCache, off unless a profile switches it on. A
    step whose first block's output changed less than ``threshold`` (relative) reuses the rest
    of the last step's residual. Lossy: listed in the response's "lossy"."""

    threshold: float = 0.05

    def __post_init__(self):
        if not 0 < self.threshold:
            raise ConfigError("handler.step_cache.threshold must be above 0")


@dataclass(frozen=True)
class Profile:
    """A named speed preset (handler.profiles.NAME) a request picks with "profile"."""

    name: str
    # Overrides of the defaults (GenerationDefaults names, flow_shift included); a request's own
    # fields still win, except the ones in ``locked``.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    lora: tuple[LoraChoice, ...] = ()
    scheduler: str | None = None  # None: the checkpoint's (UniPC)
    lossy: tuple[str, ...] = ()  # PROFILE_LOSSY
    # Request fields this profile fixes (a distilled LoRA is only right at its own steps and
    # guidance): giving one with the profile is a 400.
    locked: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"defaults": {k: v for k, v in self.defaults.items()}, "lora": [c.to_json() for c in self.lora],
                "scheduler": self.scheduler, "lossy": list(self.lossy), "locked": list(self.locked)}


@dataclass(frozen=True)
class RequestRules:
    """What one model accepts per request: its limits and its overrides of the variant's
    defaults. Read without torch and without the weights (``load_request_rules``), so the job
    service refuses a bad job with the same rules the handler applies."""

    limits: RequestLimits = field(default_factory=RequestLimits)
    # Overrides of the variant's defaults table, by GenerationDefaults field name.
    default_overrides: Mapping[str, Any] = field(default_factory=dict)
    lora: LoraOptions = field(default_factory=LoraOptions)
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    step_cache: StepCache | None = None

    def defaults_for(self, variant_defaults: GenerationDefaults) -> GenerationDefaults:
        return dataclasses.replace(variant_defaults, **self.default_overrides)


@dataclass(frozen=True)
class WorkerSettings:
    """The TorchServe keys of model-config.yaml (top level, outside ``handler:``) the handler
    itself needs, read here so nothing else reads the raw yaml."""

    # TorchServe's maxWorkers: CPU workers share the cores between them.
    max_workers: int = 1
    # TorchServe's deviceType ("gpu" or "cpu"); None when not set.
    device_type: str | None = None

    @property
    def wants_gpu(self) -> bool:
        return self.device_type == "gpu"


# Where each HandlerConfig field comes from in the handler: section; None: not from it.
_YAML_KEY = "yaml_key"


@dataclass(frozen=True)
class HandlerConfig:
    model_path: Path
    default_overrides: Mapping[str, Any] = field(default_factory=dict, metadata={_YAML_KEY: "defaults"})
    limits: RequestLimits = field(default_factory=RequestLimits)
    lora: LoraOptions = field(default_factory=LoraOptions)
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    step_cache: StepCache | None = None
    # FP8 matmuls (torchao) in the transformer(s): GPU only, lossy, for every request.
    fp8: bool = False
    video: VideoEncoding = field(default_factory=VideoEncoding)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    # torch intra-op threads per worker on CPU; None: the machine's cores / maxWorkers.
    cpu_threads: int | None = None
    # A generation still running this many seconds after its request arrived stops itself at
    # the next step (504), so TorchServe's responseTimeout never has to kill the worker.
    deadline_s: float = 108.0
    worker: WorkerSettings = field(default_factory=WorkerSettings, metadata={_YAML_KEY: None})

    @property
    def rules(self) -> RequestRules:
        return RequestRules(self.limits, self.default_overrides, self.lora, self.profiles, self.step_cache)

    def defaults_for(self, variant_defaults: GenerationDefaults) -> GenerationDefaults:
        return self.rules.defaults_for(variant_defaults)

    @property
    def fast(self):
        """What the loaded pipeline needs of the fast modes (adapter paths are relative to the checkpoint)."""
        from handler.adapters import FastOptions  # torch: only where a pipeline is loaded

        return FastOptions(lora=self.lora, root=self.model_path, step_cache=self.step_cache, fp8=self.fp8)


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


def _value_type(hint: Any) -> type:
    """``float | None`` -> float: an override gives a value, never null."""
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


# Both derived from the dataclasses, so a new field cannot be forgotten here.
DEFAULT_KEYS: dict[str, type] = {name: _value_type(hint)
                                 for name, hint in typing.get_type_hints(GenerationDefaults).items()}
HANDLER_KEYS: tuple[str, ...] = tuple(
    key for key in (f.metadata.get(_YAML_KEY, f.name) for f in dataclasses.fields(HandlerConfig)) if key
)
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


def _handler_section(model_yaml: Mapping[str, Any] | None) -> Mapping[str, Any]:
    section = (model_yaml or {}).get("handler") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("handler: must be a mapping in model-config.yaml")
    unknown = set(section) - set(HANDLER_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) handler.{', handler.'.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(HANDLER_KEYS))}"
        )
    return section


def _default_overrides(overrides: Any, where: str) -> dict[str, Any]:
    overrides = overrides or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    checked = {}
    for key, value in overrides.items():
        if key not in DEFAULT_KEYS:
            raise ConfigError(f"unknown key {where}.{key}; known: {', '.join(sorted(DEFAULT_KEYS))}")
        checked[key] = _check_type(value, DEFAULT_KEYS[key], f"{where}.{key}")
    return checked


def _mapping(value: Any, where: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    value = value or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; known: {', '.join(known)}")
    return value


def _choices(value: Any, where: str, adapters: Mapping[str, LoraAdapter]) -> tuple[LoraChoice, ...]:
    """A config's list of {name, scale}: names from the allow-list, scales within it."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of {{name, scale}}")
    choices = []
    for i, item in enumerate(value):
        item = _mapping(item, f"{where}[{i}]", ("name", "scale"))
        name = _check_type(item.get("name"), str, f"{where}[{i}].name")
        if name not in adapters:
            raise ConfigError(f"{where}[{i}].name {name!r} is not in handler.lora.adapters")
        scale = _check_type(item.get("scale", 1.0), float, f"{where}[{i}].scale")
        if not 0 < scale <= adapters[name].max_scale:
            raise ConfigError(f"{where}[{i}].scale must be in (0, {adapters[name].max_scale:g}]")
        choices.append(LoraChoice(name, scale))
    if len({c.name for c in choices}) != len(choices):
        raise ConfigError(f"{where} names an adapter twice")
    return tuple(choices)


def _lora_options(section: Any) -> LoraOptions:
    section = _mapping(section, "handler.lora", ("adapters", "fuse", "max_per_request", "hotswap"))
    adapters = {}
    listed = section.get("adapters") or {}
    if not isinstance(listed, Mapping):
        raise ConfigError("handler.lora.adapters must be a mapping of name: {path, path_2, max_scale}")
    for name, entry in listed.items():
        where = f"handler.lora.adapters.{name}"
        entry = _mapping(entry, where, ("path", "path_2", "max_scale"))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise ConfigError(f"{where}: adapter names are 1-64 letters, digits, '_', '.', '-'")
        paths = {key: _check_type(entry[key], str, f"{where}.{key}") for key in ("path", "path_2") if key in entry}
        if not paths:
            raise ConfigError(f"{where} needs path (transformer) and/or path_2 (transformer_2)")
        max_scale = _check_type(entry.get("max_scale", 2.0), float, f"{where}.max_scale")
        if not max_scale > 0:
            raise ConfigError(f"{where}.max_scale must be above 0")
        adapters[name] = LoraAdapter(name=name, max_scale=max_scale, **paths)
    max_per_request = _check_type(section.get("max_per_request", 2), int, "handler.lora.max_per_request")
    if max_per_request < 1:
        raise ConfigError("handler.lora.max_per_request must be at least 1")
    return LoraOptions(adapters=adapters, fuse=_choices(section.get("fuse"), "handler.lora.fuse", adapters),
                       max_per_request=max_per_request,
                       hotswap=_check_type(section.get("hotswap", False), bool, "handler.lora.hotswap"))


_PROFILE_KEYS = ("defaults", "lora", "scheduler", "lossy", "locked")


def _profiles(section: Any, lora: LoraOptions, step_cache: StepCache | None) -> dict[str, Profile]:
    section = section or {}
    if not isinstance(section, Mapping):
        raise ConfigError("handler.profiles must be a mapping of name: profile")
    profiles = {}
    for name, entry in section.items():
        where = f"handler.profiles.{name}"
        entry = _mapping(entry, where, _PROFILE_KEYS)
        scheduler = entry.get("scheduler")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ConfigError(f"{where}.scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        lossy = tuple(entry.get("lossy") or ())
        for item in lossy:
            if item not in PROFILE_LOSSY:
                raise ConfigError(f"{where}.lossy: {item!r} is not one of {', '.join(PROFILE_LOSSY)}")
        if "step_cache" in lossy and step_cache is None:
            raise ConfigError(f"{where}.lossy names step_cache, which needs handler.step_cache")
        locked = tuple(entry.get("locked") or ())
        for item in locked:
            if item not in REQUEST_KEYS:
                raise ConfigError(f"{where}.locked: {item!r} is not a request field")
        choices = _choices(entry.get("lora"), f"{where}.lora", lora.adapters)
        if len(choices) > lora.max_per_request:
            raise ConfigError(f"{where}.lora holds more than handler.lora.max_per_request adapters")
        profiles[name] = Profile(name=str(name), defaults=_default_overrides(entry.get("defaults"), f"{where}.defaults"),
                                 lora=choices, scheduler=scheduler, lossy=lossy, locked=locked)
    return profiles


# Request fields a profile may lock (kept here so the config needs no import of the request module).
REQUEST_KEYS = ("negative_prompt", "width", "height", "num_frames", "fps", "num_inference_steps",
                "guidance_scale", "guidance_scale_2", "lora")


def load_request_rules(model_yaml: Mapping[str, Any] | None) -> RequestRules:
    """The request rules of a model-config.yaml (as loaded by yaml.safe_load): what the job
    service needs to check a job as the handler will. No torch, and the weights need not exist."""
    section = _handler_section(model_yaml)
    lora = _lora_options(section.get("lora"))
    step_cache = (_typed_section(StepCache, section.get("step_cache"), "handler.step_cache")
                  if section.get("step_cache") is not None else None)
    return RequestRules(
        limits=_typed_section(RequestLimits, section.get("limits"), "handler.limits"),
        default_overrides=_default_overrides(section.get("defaults"), "handler.defaults"),
        lora=lora,
        profiles=_profiles(section.get("profiles"), lora, step_cache),
        step_cache=step_cache,
    )


def _worker_settings(model_yaml: Mapping[str, Any] | None) -> WorkerSettings:
    model_yaml = model_yaml or {}
    max_workers = _check_type(model_yaml.get("maxWorkers", 1), int, "maxWorkers")
    if max_workers < 1:
        raise ConfigError("maxWorkers must be at least 1")
    device_type = model_yaml.get("deviceType")
    if device_type is not None:
        device_type = _check_type(device_type, str, "deviceType")
    return WorkerSettings(max_workers=max_workers, device_type=device_type)


def load_handler_config(model_yaml: Mapping[str, Any] | None, model_dir: str | Path) -> HandlerConfig:
    """Parse model-config.yaml (as TorchServe hands it over) into a HandlerConfig: the one
    place the handler reads it.

    ``handler.model_path`` may be absolute or relative to the model's folder; the environment
    variable ``WAN_MODEL_PATH`` overrides it (handy in containers).
    """
    section = _handler_section(model_yaml)
    rules = load_request_rules(model_yaml)

    raw_path = os.environ.get("WAN_MODEL_PATH") or section.get("model_path")
    if not raw_path or not isinstance(raw_path, str):
        raise ConfigError("handler.model_path is required: the folder of the diffusers checkpoint")
    model_path = Path(raw_path)
    if not model_path.is_absolute():
        # TorchServe hands a symlinked temp folder for no-archive models; resolve it first so
        # relative paths mean "relative to the model's own folder".
        model_path = Path(os.path.realpath(model_dir)) / model_path

    cpu_threads = section.get("cpu_threads")
    if cpu_threads is not None:
        cpu_threads = _check_type(cpu_threads, int, "handler.cpu_threads")
        if cpu_threads < 1:
            raise ConfigError("handler.cpu_threads must be at least 1")

    worker = _worker_settings(model_yaml)
    fp8 = _check_type(section.get("fp8", False), bool, "handler.fp8")
    if fp8 and worker.device_type != "gpu":
        # torchao's float8 kernels need an H100-class GPU; a CPU worker would fail at the first matmul.
        raise ConfigError("handler.fp8 needs deviceType: gpu (FP8 matmuls run on GPUs only)")

    return HandlerConfig(
        model_path=model_path.resolve(),
        default_overrides=rules.default_overrides,
        limits=rules.limits,
        lora=rules.lora,
        profiles=rules.profiles,
        step_cache=rules.step_cache,
        fp8=fp8,
        video=_typed_section(VideoEncoding, section.get("video"), "handler.video"),
        speed=_typed_section(SpeedOptions, section.get("speed"), "handler.speed"),
        parallel=_typed_section(ParallelOptions, section.get("parallel"), "handler.parallel"),
        cpu_threads=cpu_threads,
        deadline_s=_deadline(model_yaml, section),
        worker=worker,
    )

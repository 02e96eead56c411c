"""Loading a Wan2.2 checkpoint with diffusers and running one generation.

This module knows diffusers and torch, not TorchServe. ``WanVideoPipeline.load`` detects the
variant from the checkpoint, loads it on the right device and dtype, and sets the scheduler's
flow shift and the expert boundary explicitly (a converted checkpoint may carry other values).
``generate`` runs the stages separately (text encode, denoise, VAE decode) so each is timed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Offline always: set before diffusers/transformers are imported, whoever imports us first.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from handler import attention
from handler.adapters import FP8, STEP_CACHE, Adapters, FastOptions, StepCacheSwitch, quantize_fp8
from handler.config import SpeedOptions
from handler.errors import Cancelled, DeadlineExceeded, InvalidRequest, ModelLoadError
from handler.parallel import CfgSplitHook, RankGroup
from handler.request import GenerationRequest
from handler.variants import GenerationDefaults, ImageInput, VariantSpec

log = logging.getLogger(__name__)

# UMT5's context as the Wan pipelines use it; longer prompts would be cut silently.
MAX_PROMPT_TOKENS = 512

# on_step(step, total_steps, elapsed_s) is called after every denoising step; it stops the
# generation by raising one of STOPS.
StepCallback = Callable[[int, int, float], None]
# What a step callback may raise to stop a generation on purpose: every rank stops at that step.
STOPS = (DeadlineExceeded, Cancelled)


@dataclass(frozen=True)
class Generated:
    frames: np.ndarray | None  # uint8 (F, H, W, 3); None on the ranks that do not decode
    timings_s: dict[str, float]
    # True when on_frames received exactly these frames, chunk by chunk, during the decode.
    streamed: bool = False


# on_frames(frames) receives uint8 (f, H, W, 3) chunks as the VAE decodes them.
FramesCallback = Callable[[np.ndarray], None]


class CollectiveBroken(Exception):
    """A rank failed while the others may wait for it in a collective: this worker's ranks
    cannot run together again. ``__cause__`` is the failure."""


def pick_device(gpu_id: int | None) -> torch.device:
    """TorchServe's gpu_id when a GPU is there, the CPU otherwise."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


def _scheduler_for(base, name: str | None, shift: float):
    """The request's sampler: the checkpoint's (UniPC) or flow-matching Euler (what
    Wan2.2-Lightning samples with), at ``shift``."""
    if name == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(base.config, shift=shift)
    return _with_flow_shift(base, shift)


def _with_flow_shift(scheduler, shift: float):
    config = scheduler.config
    if "flow_shift" in config:  # UniPCMultistepScheduler, as the official checkpoints ship
        return scheduler.__class__.from_config(config, flow_shift=shift)
    if "shift" in config:  # FlowMatchEulerDiscreteScheduler
        return scheduler.__class__.from_config(config, shift=shift)
    raise ModelLoadError(f"scheduler {scheduler.__class__.__name__} has no flow shift setting")


# Room left on the GPU for activations and the VAE decode when deciding whether both 14B
# experts can stay on the GPU (one expert's 720p forward peaks at ~25 GiB over its weights).
ACTIVATION_RESERVE_BYTES = 34 * 2**30


def _module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class ExpertSwap:
    """Keep one of the two experts on the GPU; the other waits in pinned host memory.

    A forward pre-hook brings the called expert in (and sends the other out) just before it
    runs, so the swap happens once at the boundary step and once at the next request's first
    step. Weights never change at inference, so "sending out" only drops the GPU copy; the
    pinned host copy makes the way in a fast DMA (~25 GB/s) instead of a pageable copy.
    """

    def __init__(self, experts: list[torch.nn.Module], device: torch.device):
        self.device = device
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for expert in experts:
            tensors = [*expert.parameters(), *expert.buffers()]
            self.host[id(expert)] = [(t, t.data.to("cpu").pin_memory()) for t in tensors]
            expert.register_forward_pre_hook(self._before_forward)
        self.active: torch.nn.Module | None = None
        for expert in experts:
            self._send_out(expert)
        self.swaps = 0

    def _send_out(self, expert: torch.nn.Module) -> None:
        for tensor, host in self.host[id(expert)]:
            tensor.data = host

    def _bring_in(self, expert: torch.nn.Module) -> None:
        for tensor, host in self.host[id(expert)]:
            tensor.data = host.to(self.device, non_blocking=True)

    def _before_forward(self, expert: torch.nn.Module, _args) -> None:
        if self.active is expert:
            return
        if self.active is not None:
            self._send_out(self.active)
        self._bring_in(expert)
        self.active = expert
        self.swaps += 1


def _apply_speed_options(pipe, speed: SpeedOptions, device: torch.device,
                         group: RankGroup | None = None) -> tuple[ExpertSwap | None, list[CfgSplitHook]]:
    """Attention backend, splitting over ranks, expert placement and regional compilation, on
    the loaded pipeline. Returns the expert swap (if any) and the guidance-split hooks."""
    if speed.vae_tiling:
        pipe.vae.enable_tiling()
    experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = speed.tf32
        torch.backends.cudnn.allow_tf32 = speed.tf32 or torch.backends.cudnn.allow_tf32
        backend = attention.resolve_backend(speed.attention_backend, device)
        for expert in experts:
            attention.apply_backend(expert, backend)
    splits_sequence = group is not None and group.layout.ulysses_degree > 1
    if speed.compile and device.type == "cuda" and splits_sequence:
        # diffusers' sequence-split hook on the first block reads the block's signature, which
        # dynamo cannot trace: compile each block's own forward, before the hooks wrap it, so
        # the split runs eagerly around the compiled block.
        for expert in experts:
            _compile_block_forwards(expert)
    hooks = [hook for hook in (group.enable_on(expert) for expert in experts) if hook] if group else []
    if device.type != "cuda":
        return None, hooks
    swap = None
    if len(experts) == 2:
        weights = sum(_module_bytes(m) for m in (*experts, pipe.text_encoder, pipe.vae))
        total = torch.cuda.get_device_properties(device).total_memory
        wants_swap = speed.expert_placement == "swap" or (
            speed.expert_placement == "auto" and weights + ACTIVATION_RESERVE_BYTES > total
        )
        if wants_swap:
            swap = ExpertSwap(experts, device)
            torch.cuda.empty_cache()
        log.info("experts: %s (weights %.1f GiB, GPU %.1f GiB)", "swapped" if swap else "both on the GPU",
                 weights / 2**30, total / 2**30)
    if speed.compile and not splits_sequence:
        for expert in experts:
            expert.compile_repeated_blocks(fullgraph=True)
    return swap, hooks


def _compile_block_forwards(model: torch.nn.Module) -> None:
    """What ``compile_repeated_blocks(fullgraph=True)`` does, applied to each repeated block's
    ``forward`` instead of its whole call, so hooks registered afterwards stay outside."""
    for module in model.modules():
        if module.__class__.__name__ in model._repeated_blocks:
            module.forward = torch.compile(module.forward, fullgraph=True)


class WanVideoPipeline:
    """One loaded Wan2.2 checkpoint, ready to generate on one device, or as one rank of a
    worker spread over several (``group``; see handler/parallel.py)."""

    def __init__(self, text_pipe: WanPipeline | WanImageToVideoPipeline, spec: VariantSpec,
                 defaults: GenerationDefaults, device: torch.device, speed: SpeedOptions | None = None,
                 group: RankGroup | None = None, fast: FastOptions | None = None):
        self.spec = spec
        # What a request gets for every field it leaves out: the variant's, with the model's overrides.
        self.defaults = defaults
        self.device = device
        self.group = group
        self.text_pipe = text_pipe
        # Image-conditioned requests need the I2V pipeline class. For TI2V-5B it shares every
        # module with the text pipeline (no extra memory); for I2V-A14B it is the same object.
        if spec.image_input is ImageInput.REJECTED:
            self.image_pipe = None
        elif isinstance(text_pipe, WanImageToVideoPipeline):
            self.image_pipe = text_pipe
        else:
            self.image_pipe = WanImageToVideoPipeline(
                tokenizer=text_pipe.tokenizer,
                text_encoder=text_pipe.text_encoder,
                vae=text_pipe.vae,
                scheduler=text_pipe.scheduler,
                transformer=text_pipe.transformer,
                transformer_2=None,
                boundary_ratio=None,
                expand_timesteps=True,
            )
        for pipe in {id(p): p for p in (self.text_pipe, self.image_pipe) if p is not None}.values():
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = _with_flow_shift(pipe.scheduler, defaults.flow_shift)
            pipe.register_to_config(boundary_ratio=spec.boundary_ratio)
        self._check_size_multiple()
        self.speed = speed or SpeedOptions()
        self.fast = fast or FastOptions()
        self.base_schedulers = {id(p): p.scheduler for p in (self.text_pipe, self.image_pipe) if p is not None}
        experts = [m for m in (text_pipe.transformer, getattr(text_pipe, "transformer_2", None)) if m is not None]
        # Before compilation: adapters and FP8 change the modules the compiled graph is made of.
        self.adapters = Adapters(text_pipe, self.fast.lora, self.fast.root) if (
            self.fast.lora.adapters or self.fast.lora.fuse) else None
        if self.fast.fp8:
            quantize_fp8(experts, device)
        self.expert_swap, self.cfg_hooks = _apply_speed_options(text_pipe, self.speed, device, group)

    def lossy(self, req: GenerationRequest) -> list[str]:
        """The approximations that make this request's video (the response's "lossy")."""
        modes = [FP8] if self.fast.fp8 else []
        if self.speed.vae_dtype != "float32":
            modes.append(f"vae_{self.speed.vae_dtype}")
        return modes + [mode for mode in req.lossy if mode not in modes]

    def _prepare(self, pipe, req: GenerationRequest):
        """The request's adapters and sampler; the step cache when it asks for it (a context)."""
        if self.adapters is not None:
            self.adapters.apply(req.lora)
        base = self.base_schedulers[id(pipe)]
        wanted = (req.scheduler, req.flow_shift)
        if wanted != (None, None) and wanted != (None, self.defaults.flow_shift):
            pipe.scheduler = _scheduler_for(base, req.scheduler, req.flow_shift or self.defaults.flow_shift)
        else:
            pipe.scheduler = base
        if STEP_CACHE in req.lossy and self.fast.step_cache is not None:
            experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
            return StepCacheSwitch(experts, self.fast.step_cache)
        return contextlib.nullcontext()

    @classmethod
    def load(cls, model_path: str | Path, spec: VariantSpec, defaults: GenerationDefaults, device: torch.device,
             speed: SpeedOptions | None = None, group: RankGroup | None = None,
             fast: FastOptions | None = None) -> WanVideoPipeline:
        """Load a checkpoint folder of variant ``spec`` (``detect_variant``): bf16 on GPU, fp32 on
        CPU; the VAE in ``speed.vae_dtype``. ``defaults``: the model's (its flow shift is set).

        On a GPU the safetensors are read straight into device memory (``device_map``), with no
        host copy of the weights in between.
        """
        speed = speed or SpeedOptions()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae_dtype = getattr(torch, speed.vae_dtype)
        pipeline_class = WanImageToVideoPipeline if spec.pipeline_class == "WanImageToVideoPipeline" else WanPipeline
        if device.type == "cuda":
            torch.cuda.set_device(device)  # device_map "cuda" means the current device
        try:
            pipe = pipeline_class.from_pretrained(
                str(model_path), dtype={"vae": vae_dtype, "default": dtype}, local_files_only=True,
                device_map="cuda" if device.type == "cuda" else None,
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load {spec.name} checkpoint from {model_path}: {e}") from e
        if device.type == "cuda":
            # One device, so no dispatch hooks hold the modules; forgetting the map makes plain
            # .to() legal again (reset_device_map() would move everything back to the CPU).
            pipe.remove_all_hooks()
            pipe.hf_device_map = None
        else:
            pipe.to(device)
        if fast is not None and fast.root == Path("."):
            fast = dataclasses.replace(fast, root=Path(model_path))
        return cls(pipe, spec, defaults, device, speed, group, fast)

    def warm_up(self, defaults: GenerationDefaults) -> float:
        """One short generation at the default size, touching every expert: compiles the
        blocks and autotunes kernels before the first user arrives. Returns seconds taken."""
        started = time.perf_counter()
        steps = self._steps_covering_every_expert()
        request = GenerationRequest.from_defaults(defaults, prompt="warm-up", seed=0, num_inference_steps=steps)
        if self.spec.image_input is ImageInput.REQUIRED:
            from PIL import Image

            image = Image.new("RGB", (defaults.width, defaults.height), (127, 127, 127))
            request = dataclasses.replace(request, image=image)
        # One path is enough: TI2V-5B's image requests run the same compiled blocks at the same
        # shapes; only the small VAE encoder is left to warm on the first image request.
        self.generate(request)
        return time.perf_counter() - started

    def _steps_covering_every_expert(self) -> int:
        if self.spec.boundary_ratio is None:
            return 2
        scheduler = self.text_pipe.scheduler.__class__.from_config(self.text_pipe.scheduler.config)
        boundary = self.spec.boundary_ratio * scheduler.config.num_train_timesteps
        for steps in range(2, 41):
            scheduler.set_timesteps(steps)
            timesteps = scheduler.timesteps
            if bool((timesteps >= boundary).any()) and bool((timesteps < boundary).any()):
                return steps
        return 40

    def _check_size_multiple(self) -> None:
        vae_factor = self.text_pipe.vae_scale_factor_spatial
        patch = self.text_pipe.transformer.config.patch_size[1]
        if vae_factor * patch != self.spec.size_multiple:
            raise ModelLoadError(
                f"checkpoint needs sizes in multiples of {vae_factor * patch}, "
                f"but {self.spec.name} is {self.spec.size_multiple}"
            )

    def check_prompt_length(self, text: str, field: str) -> None:
        """Refuse prompts the text encoder would truncate, instead of cutting them silently."""
        count = len(self.text_pipe.tokenizer(prompt_clean(text), add_special_tokens=True).input_ids)
        if count > MAX_PROMPT_TOKENS:
            raise InvalidRequest(
                f"{field} is {count} tokens; the text encoder reads at most {MAX_PROMPT_TOKENS}", field
            )

    def check_split(self, req: GenerationRequest) -> None:
        """On several ranks: refuse (400) a size whose tokens do not split evenly over them."""
        if self.group is None:
            return
        pipe = self.text_pipe
        patch_t, patch_h, patch_w = pipe.transformer.config.patch_size
        latent_frames = (req.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        tokens = (latent_frames // patch_t) * (req.height // pipe.vae_scale_factor_spatial // patch_h) * (
            req.width // pipe.vae_scale_factor_spatial // patch_w)
        self.group.check_tokens(tokens, f"{req.width}x{req.height} with {req.num_frames} frames")

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None,
                 on_frames: FramesCallback | None = None) -> Generated:
        """Text encode, denoise, decode. With several ranks every rank calls this for the same
        request; the ranks other than the leader stop before the decode (``frames`` None).
        ``on_frames`` gets the frames during the decode (see ``Generated.streamed``)."""
        started = time.perf_counter()
        pipe = self.image_pipe if req.image is not None else self.text_pipe
        if self.group is None:
            with self._prepare(pipe, req):
                latents, timings = self._denoise(pipe, req, on_step)
        else:
            try:
                # Every rank applies the adapters and sampler the leader's decision carries.
                with self._prepare(pipe, req):
                    latents, timings = self._denoise(pipe, req, on_step)
            except STOPS:
                raise  # agreed by every rank at the same step: they are in step again
            except Exception as exc:
                raise CollectiveBroken(f"{exc.__class__.__name__}: {exc}") from exc
            if not self.group.is_leader:
                return Generated(frames=None, timings_s=timings)
        # The other ranks are done with this request: a failure from here on is the leader's alone.
        mark = time.perf_counter()
        streamer = _FrameStreamer(pipe.vae, on_frames) if on_frames is not None and not pipe.vae.use_tiling else None
        try:
            frames = self._decode(pipe, latents)
        finally:
            if streamer is not None:
                streamer.remove()
        timings["vae_decode_s"] = time.perf_counter() - mark
        timings["generate_s"] = time.perf_counter() - started
        return Generated(frames=frames, timings_s=timings, streamed=streamer is not None and streamer.sent_exactly(frames))

    def batch_key(self, req: GenerationRequest) -> tuple | None:
        """Requests with equal keys can be denoised in one batch (their own prompts, negative
        prompts and seeds); None: this one runs alone. Image requests run alone (the I2V
        pipeline conditions one image), and so does everything on several ranks."""
        if self.group is not None or req.image is not None:
            return None
        # The same adapters, sampler and approximations too: they are set on the pipeline for
        # the whole batch (_prepare).
        return (req.width, req.height, req.num_frames, req.num_inference_steps, req.guidance_scale,
                req.guidance_scale_2 if self.spec.two_experts else None, req.lora, req.scheduler,
                req.flow_shift, req.lossy)

    @torch.inference_mode()
    def generate_batch(self, reqs: list[GenerationRequest], on_steps: list[StepCallback],
                       on_frames: list[FramesCallback | None]) -> list[Generated | Exception]:
        """Requests of one ``batch_key`` denoised together, then decoded one by one (as alone).
        Each gets its own noise (a generator per seed) and step callbacks; one that stops
        (cancelled, past its deadline) gets its stop as its outcome while the others go on, and
        the batch ends early once all stopped. Each result equals the request's own generation
        up to float rounding (a batched matmul sums in another order: ~1e-6 on the latents)."""
        if len(reqs) == 1:
            try:
                return [self.generate(reqs[0], on_steps[0], on_frames[0])]
            except STOPS as exc:
                return [exc]
        started = time.perf_counter()
        with self._prepare(self.text_pipe, reqs[0]):  # one batch_key: the same for every request
            latents, timings, stops = self._denoise_batch(self.text_pipe, reqs, on_steps)
        outcomes: list[Generated | Exception] = []
        for index, stop in enumerate(stops):
            if stop is not None:
                outcomes.append(stop)
                continue
            mark = time.perf_counter()
            frames_to = on_frames[index]
            streamer = _FrameStreamer(self.text_pipe.vae, frames_to) if frames_to is not None and \
                not self.text_pipe.vae.use_tiling else None
            try:
                frames = self._decode(self.text_pipe, latents[index:index + 1])
            finally:
                if streamer is not None:
                    streamer.remove()
            own = dict(timings, vae_decode_s=time.perf_counter() - mark, generate_s=time.perf_counter() - started)
            outcomes.append(Generated(frames=frames, timings_s=own,
                                      streamed=streamer is not None and streamer.sent_exactly(frames)))
        return outcomes

    def _denoise_batch(self, pipe, reqs: list[GenerationRequest], on_steps: list[StepCallback]
                       ) -> tuple[torch.Tensor | None, dict, list[Exception | None]]:
        """``_denoise`` for several requests of one ``batch_key`` on one process."""
        timings: dict[str, float] = {}
        first = reqs[0]
        use_cfg = first.guidance_scale > 1.0
        mark = time.perf_counter()
        # Each prompt alone: the embeddings are padded to MAX_PROMPT_TOKENS, so they stack.
        encoded = [pipe.encode_prompt(prompt=req.prompt, negative_prompt=req.negative_prompt,
                                      do_classifier_free_guidance=use_cfg, max_sequence_length=MAX_PROMPT_TOKENS,
                                      device=self.device) for req in reqs]
        prompt_embeds = torch.cat([positive for positive, _ in encoded])
        negative_embeds = torch.cat([negative for _, negative in encoded]) if use_cfg else None
        timings["text_encode_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        # One CPU generator per request: diffusers draws each sample's noise from its own, the
        # same noise the request gets alone.
        generators = [torch.Generator(device="cpu").manual_seed(req.seed) for req in reqs]
        stops: list[Exception | None] = [None] * len(reqs)

        def step_end(_pipe, step_index, _timestep, _tensors):
            for index, on_step in enumerate(on_steps):
                if stops[index] is None:
                    try:
                        on_step(step_index + 1, first.num_inference_steps, time.perf_counter() - mark)
                    except STOPS as exc:
                        stops[index] = exc
            if all(stop is not None for stop in stops):
                raise stops[0]
            return {}

        kwargs = self._pipe_call(first, prompt_embeds, negative_embeds, generators, step_end)
        try:
            latents = pipe(**kwargs)[0]
        except STOPS:
            return None, timings, stops  # every one of them stopped
        timings["denoise_s"] = time.perf_counter() - mark
        return latents, timings, stops

    def _pipe_call(self, req: GenerationRequest, prompt_embeds, negative_embeds, generator, step_end) -> dict:
        """The diffusers call's arguments for ``req`` (a batch's shared shape and settings come from
        its first request; only the embeddings and generators hold one entry per request)."""
        kwargs = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "height": req.height,
            "width": req.width,
            "num_frames": req.num_frames,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "generator": generator,
            "output_type": "latent",
            "return_dict": False,
            "callback_on_step_end": step_end,
        }
        if self.spec.two_experts:
            kwargs["guidance_scale_2"] = req.guidance_scale_2
        if req.image is not None:
            kwargs["image"] = req.image
        return kwargs

    def _denoise(self, pipe, req: GenerationRequest, on_step: StepCallback | None) -> tuple[torch.Tensor, dict]:
        """Text encoding and the denoising loop: the part every rank runs together."""
        timings: dict[str, float] = {}
        # diffusers turns classifier-free guidance on for both experts when guidance_scale > 1.
        use_cfg = req.guidance_scale > 1.0

        mark = time.perf_counter()
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            do_classifier_free_guidance=use_cfg,
            max_sequence_length=MAX_PROMPT_TOKENS,
            device=self.device,
        )
        timings["text_encode_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        # A CPU generator gives the same noise for a seed on any device (and on every rank).
        generator = torch.Generator(device="cpu").manual_seed(req.seed)
        for hook in self.cfg_hooks:
            hook.begin(negative_embeds if use_cfg else None)

        def step_end(_pipe, step_index, _timestep, _tensors):
            stop = None
            try:
                if on_step is not None:
                    on_step(step_index + 1, req.num_inference_steps, time.perf_counter() - mark)
            except STOPS as exc:
                stop = exc
            # Every rank stops at the same step, or none does (the others would wait forever).
            if self.group is not None and self.group.agree_to_stop(stop is not None) and stop is None:
                stop = DeadlineExceeded(f"stopped after step {step_index + 1} with the leading rank")
            if stop is not None:
                raise stop
            return {}

        latents = pipe(**self._pipe_call(req, prompt_embeds, negative_embeds, generator, step_end))[0]
        timings["denoise_s"] = time.perf_counter() - mark
        return latents, timings

    def _decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        video = pipe.video_processor.postprocess_video(video, output_type="pt")[0]  # (F, C, H, W) in [0, 1]
        return _to_uint8_frames(video)

    def release_memory(self) -> None:
        """Give memory back after a failure (out of memory above all): the tensors the failure's
        frames held, and the GPU's cached blocks (the C heap is trimmed after every request,
        WanService.handle)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _FrameStreamer:
    """Hands the frames of each latent frame the VAE decoder finishes to ``on_frames``, so the
    video encoder works while the decode goes on (the encode of a 720p video takes seconds).

    diffusers decodes one latent frame per decoder call and applies unpatchify, clamp and the
    [0, 1] mapping to the whole video afterwards; the same element-wise steps are applied here to
    each chunk. ``sent_exactly`` compares what was sent with the final frames, so a different
    decode inside diffusers can never change the video: the caller encodes the final frames then.
    """

    def __init__(self, vae, on_frames: FramesCallback):
        self.on_frames = on_frames
        self.patch_size = vae.config.patch_size
        self.sent: list[np.ndarray] = []
        self.failed = False
        self.handle = vae.decoder.register_forward_hook(self._after_decoder)

    def _after_decoder(self, _module, _args, output) -> None:
        if self.failed:
            return
        try:
            video = output
            if self.patch_size is not None:
                video = unpatchify(video, patch_size=self.patch_size)
            video = (video.clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0, 1)  # diffusers' clamp, then denormalize
            chunk = _to_uint8_frames(video[0].permute(1, 0, 2, 3))
            self.sent.append(chunk)
            self.on_frames(chunk)
        except Exception:  # the final frames are encoded instead
            log.exception("streaming frames to the encoder failed; encoding after the decode")
            self.failed = True

    def remove(self) -> None:
        self.handle.remove()

    def sent_exactly(self, frames: np.ndarray) -> bool:
        if self.failed or sum(len(c) for c in self.sent) != len(frames):
            return False
        start = 0
        for chunk in self.sent:
            if not np.array_equal(chunk, frames[start:start + len(chunk)]):
                log.warning("frames streamed during the decode differ from the final ones; encoding after")
                return False
            start += len(chunk)
        return True


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(F, C, H, W) in [0, 1] to uint8 (F, H, W, C) on the host."""
    return (video.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def trim_host_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system. A no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl)
        return None

"""Loading a Wan2.2 checkpoint with diffusers and running one generation.

This module knows diffusers and torch, not TorchServe. ``WanVideoPipeline.load`` detects the
variant from the checkpoint, loads it on the right device and dtype, and sets the scheduler's
flow shift and the expert boundary explicitly (a converted checkpoint may carry other values).
``generate`` runs the stages separately (text encode, denoise, VAE decode) so each is timed.
"""

from __future__ import annotations

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
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from handler.errors import InvalidRequest, ModelLoadError
from handler.request import GenerationRequest
from handler.variants import GenerationDefaults, VariantSpec, detect_variant

log = logging.getLogger(__name__)

# UMT5's context as the Wan pipelines use it; longer prompts would be cut silently.
MAX_PROMPT_TOKENS = 512

# on_step(step, total_steps, elapsed_s) is called after every denoising step.
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Generated:
    frames: np.ndarray  # uint8 (F, H, W, 3)
    timings_s: dict[str, float]


def pick_device(gpu_id: int | None) -> torch.device:
    """TorchServe's gpu_id when a GPU is there, the CPU otherwise."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


def _with_flow_shift(scheduler, shift: float):
    config = scheduler.config
    if "flow_shift" in config:  # UniPCMultistepScheduler, as the official checkpoints ship
        return scheduler.__class__.from_config(config, flow_shift=shift)
    if "shift" in config:  # FlowMatchEulerDiscreteScheduler
        return scheduler.__class__.from_config(config, shift=shift)
    raise ModelLoadError(f"scheduler {scheduler.__class__.__name__} has no flow shift setting")


class WanVideoPipeline:
    """One loaded Wan2.2 checkpoint, ready to generate on one device."""

    def __init__(self, text_pipe: WanPipeline | WanImageToVideoPipeline, spec: VariantSpec,
                 defaults: GenerationDefaults, device: torch.device):
        self.spec = spec
        self.device = device
        self.text_pipe = text_pipe
        # Image-conditioned requests need the I2V pipeline class. For TI2V-5B it shares every
        # module with the text pipeline (no extra memory); for I2V-A14B it is the same object.
        if spec.image_input.value == "rejected":
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

    @classmethod
    def load(cls, model_path: str | Path, defaults_for: Callable[[GenerationDefaults], GenerationDefaults],
             device: torch.device) -> WanVideoPipeline:
        """Load a checkpoint folder: bf16 on GPU, fp32 on CPU; the VAE in fp32 for quality."""
        spec = detect_variant(model_path)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipeline_class = WanImageToVideoPipeline if spec.pipeline_class == "WanImageToVideoPipeline" else WanPipeline
        try:
            pipe = pipeline_class.from_pretrained(
                str(model_path), dtype={"vae": torch.float32, "default": dtype}, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load {spec.name} checkpoint from {model_path}: {e}") from e
        pipe.to(device)
        return cls(pipe, spec, defaults_for(spec.defaults), device)

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

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None) -> Generated:
        started = time.perf_counter()
        pipe = self.image_pipe if req.image is not None else self.text_pipe
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
        # A CPU generator gives the same noise for a seed on any device.
        generator = torch.Generator(device="cpu").manual_seed(req.seed)

        def step_end(_pipe, step_index, _timestep, _tensors):
            if on_step is not None:
                on_step(step_index + 1, req.num_inference_steps, time.perf_counter() - mark)
            return {}

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
        latents = pipe(**kwargs)[0]
        timings["denoise_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        frames = self._decode(pipe, latents)
        timings["vae_decode_s"] = time.perf_counter() - mark
        timings["generate_s"] = time.perf_counter() - started
        return Generated(frames=frames, timings_s=timings)

    def _decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        video = pipe.video_processor.postprocess_video(video, output_type="pt")[0]  # (F, C, H, W) in [0, 1]
        return (video.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    def release_memory(self) -> None:
        """Give cached device memory back after a failure (out of memory above all)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

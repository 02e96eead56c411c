"""The three Wan2.2 variants we serve: official defaults, and detection from a checkpoint.

The defaults are the official ones from Wan2.2's ``wan/configs`` (steps, guidance, flow shift,
sizes, frames, fps). A model may override them in its model-config.yaml (``handler.defaults``);
requests may override the per-request ones. The variant is read from the checkpoint's
``model_index.json`` and component configs, never from a folder or model name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from handler.errors import ModelLoadError

# Wan2.2's shared negative prompt (wan/configs/shared_config.py, sample_neg_prompt). The models
# were tuned with it, so it is the default whenever a request does not give its own.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ImageInput(str, Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    REJECTED = "rejected"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request gets for every field it leaves out (and the scheduler's flow shift)."""

    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    # Guidance of the low-noise expert (``transformer_2``); None for one-expert variants.
    guidance_scale_2: float | None
    flow_shift: float
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT


@dataclass(frozen=True)
class VariantSpec:
    name: str
    pipeline_class: str  # the diffusers class used for text(-only) requests
    two_experts: bool
    # Fraction of the 1000 training timesteps above which the high-noise expert runs.
    boundary_ratio: float | None
    # Width and height must be multiples of this: VAE spatial factor x transformer patch size.
    size_multiple: int
    native_sizes: tuple[tuple[int, int], ...]  # (width, height)
    image_input: ImageInput
    # Latent channels of the VAE: 16 for the Wan2.1 VAE, 48 for the Wan2.2 VAE.
    vae_z_dim: int
    defaults: GenerationDefaults


T2V_A14B = VariantSpec(
    name="t2v-a14b",
    pipeline_class="WanPipeline",
    two_experts=True,
    boundary_ratio=0.875,
    size_multiple=16,
    native_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
    image_input=ImageInput.REJECTED,
    vae_z_dim=16,
    defaults=GenerationDefaults(
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=40,
        # Official sample_guide_scale is (low-noise 3.0, high-noise 4.0); diffusers applies
        # guidance_scale to the high-noise expert and guidance_scale_2 to the low-noise one.
        guidance_scale=4.0, guidance_scale_2=3.0, flow_shift=12.0,
    ),
)

I2V_A14B = VariantSpec(
    name="i2v-a14b",
    pipeline_class="WanImageToVideoPipeline",
    two_experts=True,
    boundary_ratio=0.900,
    size_multiple=16,
    native_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
    image_input=ImageInput.REQUIRED,
    vae_z_dim=16,
    defaults=GenerationDefaults(
        # For image requests without a size, this is the pixel area; the aspect comes
        # from the image (as the official generate.py does with max_area).
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=40,
        guidance_scale=3.5, guidance_scale_2=3.5, flow_shift=5.0,
    ),
)

TI2V_5B = VariantSpec(
    name="ti2v-5b",
    pipeline_class="WanPipeline",
    two_experts=False,
    boundary_ratio=None,
    size_multiple=32,
    native_sizes=((1280, 704), (704, 1280)),
    image_input=ImageInput.OPTIONAL,
    vae_z_dim=48,
    defaults=GenerationDefaults(
        width=1280, height=704, num_frames=121, fps=24, num_inference_steps=50,
        guidance_scale=5.0, guidance_scale_2=None, flow_shift=5.0,
    ),
)

VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (T2V_A14B, I2V_A14B, TI2V_5B)}


def _read_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"checkpoint file missing: {path}") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(content, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(content).__name__}")
    return content


def _component_present(model_index: dict, name: str) -> bool:
    # diffusers writes absent optional components as [null, null].
    entry = model_index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def detect_variant(model_path: str | Path) -> VariantSpec:
    """Tell which Wan2.2 variant a diffusers checkpoint folder holds, from its configs only."""
    root = Path(model_path)
    if not root.is_dir():
        raise ModelLoadError(f"model_path is not a folder: {root}")
    index = _read_json(root / "model_index.json")
    pipeline_class = index.get("_class_name")
    vae_z_dim = _read_json(root / "vae" / "config.json").get("z_dim")
    two_experts = _component_present(index, "transformer") and _component_present(
        index, "transformer_2"
    )

    if vae_z_dim == 48 and index.get("expand_timesteps") and not two_experts:
        spec = TI2V_5B
    elif two_experts and vae_z_dim == 16 and pipeline_class == "WanPipeline":
        spec = T2V_A14B
    elif two_experts and vae_z_dim == 16 and pipeline_class == "WanImageToVideoPipeline":
        spec = I2V_A14B
    else:
        raise ModelLoadError(
            f"{root} is not a Wan2.2 checkpoint we serve (pipeline {pipeline_class!r}, "
            f"VAE z_dim {vae_z_dim!r}, two experts {two_experts}, expand_timesteps "
            f"{index.get('expand_timesteps')!r}); expected t2v-a14b, i2v-a14b or ti2v-5b"
        )
    return spec

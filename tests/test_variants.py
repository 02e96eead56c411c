"""detect_variant on hand-written checkpoint folders, and the official defaults table."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from handler.config import RequestLimits
from handler.errors import ModelLoadError
from handler.variants import (
    I2V_A14B,
    OFFICIAL_NEGATIVE_PROMPT,
    T2V_A14B,
    TI2V_5B,
    VARIANTS,
    ImageInput,
    detect_variant,
)

# model_index.json as diffusers writes it for the official Wan2.2 *-Diffusers checkpoints.
_COMMON = {
    "_diffusers_version": "0.35.0",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
T2V_INDEX = {
    "_class_name": "WanPipeline",
    **_COMMON,
    "boundary_ratio": 0.875,
    "expand_timesteps": False,
    "transformer_2": ["diffusers", "WanTransformer3DModel"],
}
I2V_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    **_COMMON,
    "boundary_ratio": 0.9,
    "expand_timesteps": False,
    "image_encoder": [None, None],
    "image_processor": [None, None],
    "transformer_2": ["diffusers", "WanTransformer3DModel"],
}
TI2V_INDEX = {
    "_class_name": "WanPipeline",
    **_COMMON,
    "boundary_ratio": None,
    "expand_timesteps": True,
    "transformer_2": [None, None],
}
# Wan2.1 T2V/I2V: one transformer, the Wan2.1 VAE.
WAN21_T2V_INDEX = {"_class_name": "WanPipeline", **_COMMON}
WAN21_I2V_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    **_COMMON,
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
}

VAE_21 = {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
          "is_residual": False, "patch_size": None, "scale_factor_spatial": 8}
VAE_22 = {"_class_name": "AutoencoderKLWan", "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48,
          "dim_mult": [1, 2, 4, 4], "in_channels": 12, "out_channels": 12, "is_residual": True, "patch_size": 2,
          "scale_factor_spatial": 16}


def write_checkpoint(root: Path, model_index, vae_config) -> Path:
    """A diffusers checkpoint folder with only the configs that detection reads."""
    root.mkdir(parents=True, exist_ok=True)
    if model_index is not None:
        text = model_index if isinstance(model_index, (str, bytes)) else json.dumps(model_index, indent=2)
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(root / "model_index.json", mode) as f:
            f.write(text)
    if vae_config is not None:
        (root / "vae").mkdir(exist_ok=True)
        text = vae_config if isinstance(vae_config, (str, bytes)) else json.dumps(vae_config, indent=2)
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(root / "vae" / "config.json", mode) as f:
            f.write(text)
    return root


def changed(index: dict, **updates) -> dict:
    result = copy.deepcopy(index)
    for key, value in updates.items():
        if value is ...:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def load_error(path, *words) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        detect_variant(path)
    error = info.value
    assert type(error) is ModelLoadError
    assert error.http_status == 500 and error.error_type == "model_load_error"
    for word in words:
        assert word in error.message, error.message
    return error


# --- the three layouts --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "index, vae, expected",
    [
        pytest.param(T2V_INDEX, VAE_21, T2V_A14B, id="t2v-a14b"),
        pytest.param(I2V_INDEX, VAE_21, I2V_A14B, id="i2v-a14b"),
        pytest.param(TI2V_INDEX, VAE_22, TI2V_5B, id="ti2v-5b"),
    ],
)
def test_detects_the_three_layouts(index, vae, expected, tmp_path):
    root = write_checkpoint(tmp_path / "checkpoint", index, vae)
    assert detect_variant(root) is expected
    assert detect_variant(str(root)) is expected


def test_folder_name_does_not_matter(tmp_path):
    # Named like another variant: only the configs decide.
    assert detect_variant(write_checkpoint(tmp_path / "Wan2.2-T2V-A14B", TI2V_INDEX, VAE_22)) is TI2V_5B
    assert detect_variant(write_checkpoint(tmp_path / "ti2v-5b", I2V_INDEX, VAE_21)) is I2V_A14B


def test_ti2v_with_the_image_to_video_class_is_still_ti2v(tmp_path):
    # DESIGN: ti2v-5b is WanPipeline (or I2V) with the Wan2.2 VAE and expand_timesteps.
    index = changed(TI2V_INDEX, _class_name="WanImageToVideoPipeline", image_encoder=[None, None])
    assert detect_variant(write_checkpoint(tmp_path / "c", index, VAE_22)) is TI2V_5B


def test_ti2v_without_a_transformer_2_entry(tmp_path):
    index = changed(TI2V_INDEX, transformer_2=...)
    assert detect_variant(write_checkpoint(tmp_path / "c", index, VAE_22)) is TI2V_5B


def test_detection_works_through_a_symlinked_folder(tmp_path):
    real = write_checkpoint(tmp_path / "real", T2V_INDEX, VAE_21)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert detect_variant(link) is T2V_A14B


# --- failures -----------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    load_error(missing, "model_path is not a folder", str(missing))


def test_path_is_a_file(tmp_path):
    file_path = tmp_path / "model.safetensors"
    file_path.write_bytes(b"\x00" * 16)
    load_error(file_path, "not a folder")


def test_missing_model_index(tmp_path):
    root = write_checkpoint(tmp_path / "c", None, VAE_21)
    load_error(root, "missing", "model_index.json")


def test_missing_vae_config(tmp_path):
    root = write_checkpoint(tmp_path / "c", T2V_INDEX, None)
    load_error(root, "missing", os.path.join("vae", "config.json"))


def test_empty_folder(tmp_path):
    (tmp_path / "c").mkdir()
    load_error(tmp_path / "c", "missing", "model_index.json")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{not json", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param('{"_class_name": "WanPipeline",', id="truncated"),
        pytest.param(b"\xff\xfe\x00{", id="not-utf8"),
    ],
)
def test_unreadable_model_index(content, tmp_path):
    root = write_checkpoint(tmp_path / "c", content, VAE_21)
    load_error(root, "cannot read", "model_index.json")


@pytest.mark.parametrize("content", ["{not json", "", b"\x80\x81"])
def test_unreadable_vae_config(content, tmp_path):
    root = write_checkpoint(tmp_path / "c", T2V_INDEX, content)
    load_error(root, "cannot read", "config.json")


@pytest.mark.parametrize("which, content", [("model_index", "[]"), ("vae", "null")])
def test_json_that_is_not_an_object(which, content, tmp_path):
    # Valid JSON of the wrong shape is a broken checkpoint: a ModelLoadError, not an
    # AttributeError from deep inside detection.
    if which == "model_index":
        root = write_checkpoint(tmp_path / "c", content, VAE_21)
    else:
        root = write_checkpoint(tmp_path / "c", T2V_INDEX, content)
    load_error(root)


NOT_SERVED = [
    pytest.param(WAN21_T2V_INDEX, VAE_21, id="wan2.1-t2v-one-expert"),
    pytest.param(WAN21_I2V_INDEX, VAE_21, id="wan2.1-i2v-one-expert"),
    pytest.param(changed(T2V_INDEX, transformer_2=[None, None]), VAE_21, id="t2v-transformer_2-null"),
    pytest.param(changed(T2V_INDEX, transformer=[None, None]), VAE_21, id="t2v-transformer-null"),
    pytest.param(changed(T2V_INDEX, transformer_2=["diffusers"]), VAE_21, id="t2v-transformer_2-malformed"),
    pytest.param(T2V_INDEX, VAE_22, id="two-experts-with-wan2.2-vae"),
    pytest.param(changed(T2V_INDEX, _class_name="WanVACEPipeline"), VAE_21, id="other-pipeline-class"),
    pytest.param(changed(T2V_INDEX, _class_name=...), VAE_21, id="no-class-name"),
    pytest.param(changed(TI2V_INDEX, expand_timesteps=False), VAE_22, id="ti2v-without-expand-timesteps"),
    pytest.param(changed(TI2V_INDEX, expand_timesteps=...), VAE_22, id="ti2v-no-expand-timesteps-key"),
    pytest.param(TI2V_INDEX, VAE_21, id="ti2v-with-wan2.1-vae"),
    pytest.param(TI2V_INDEX, changed(VAE_22, z_dim=...), id="vae-without-z_dim"),
    pytest.param(T2V_INDEX, changed(VAE_21, z_dim=32), id="vae-z_dim-32"),
]


@pytest.mark.parametrize("index, vae", NOT_SERVED)
def test_layouts_we_do_not_serve(index, vae, tmp_path):
    root = write_checkpoint(tmp_path / "c", index, vae)
    error = load_error(root, "not a Wan2.2 checkpoint we serve", "expected t2v-a14b, i2v-a14b or ti2v-5b", str(root))
    # The message says what was found, so an operator can tell what is wrong.
    assert "z_dim" in error.message and "two experts" in error.message


def test_wan21_message_names_what_was_found(tmp_path):
    root = write_checkpoint(tmp_path / "wan21", WAN21_T2V_INDEX, VAE_21)
    error = load_error(root)
    assert "'WanPipeline'" in error.message
    assert "z_dim 16" in error.message
    assert "two experts False" in error.message


# --- the table against the official Wan2.2 defaults (DESIGN.md's variant table) --------------

OFFICIAL = {
    "t2v-a14b": {
        "pipeline_class": "WanPipeline", "two_experts": True, "boundary_ratio": 0.875, "size_multiple": 16,
        "native_sizes": {(1280, 720), (720, 1280), (832, 480), (480, 832)}, "image_input": ImageInput.REJECTED,
        "vae_z_dim": 16, "width": 1280, "height": 720, "num_frames": 81, "fps": 16, "steps": 40, "guidance": 4.0, "guidance_2": 3.0,
        "flow_shift": 12.0,
    },
    "i2v-a14b": {
        "pipeline_class": "WanImageToVideoPipeline", "two_experts": True, "boundary_ratio": 0.900, "size_multiple": 16,
        "native_sizes": {(1280, 720), (720, 1280), (832, 480), (480, 832)}, "image_input": ImageInput.REQUIRED,
        "vae_z_dim": 16, "width": 1280, "height": 720, "num_frames": 81, "fps": 16, "steps": 40, "guidance": 3.5, "guidance_2": 3.5,
        "flow_shift": 5.0,
    },
    "ti2v-5b": {
        "pipeline_class": "WanPipeline", "two_experts": False, "boundary_ratio": None, "size_multiple": 32,
        "native_sizes": {(1280, 704), (704, 1280)}, "image_input": ImageInput.OPTIONAL,
        "vae_z_dim": 48, "width": 1280, "height": 704, "num_frames": 121, "fps": 24, "steps": 50, "guidance": 5.0, "guidance_2": None,
        "flow_shift": 5.0,
    },
}


def test_variants_table_has_exactly_the_three_variants():
    assert set(VARIANTS) == set(OFFICIAL)
    assert VARIANTS["t2v-a14b"] is T2V_A14B
    assert VARIANTS["i2v-a14b"] is I2V_A14B
    assert VARIANTS["ti2v-5b"] is TI2V_5B
    for name, spec in VARIANTS.items():
        assert spec.name == name


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_variant_matches_the_official_defaults(name):
    spec, official = VARIANTS[name], OFFICIAL[name]
    assert spec.pipeline_class == official["pipeline_class"]
    assert spec.two_experts is official["two_experts"]
    if official["boundary_ratio"] is None:
        assert spec.boundary_ratio is None
    else:
        assert spec.boundary_ratio == pytest.approx(official["boundary_ratio"])
    assert spec.size_multiple == official["size_multiple"]
    assert set(spec.native_sizes) == official["native_sizes"]
    assert len(spec.native_sizes) == len(official["native_sizes"])
    assert spec.image_input is official["image_input"]
    assert spec.vae_z_dim == official["vae_z_dim"]
    d = spec.defaults
    assert (d.width, d.height) == (official["width"], official["height"])
    assert (d.num_frames, d.fps) == (official["num_frames"], official["fps"])
    assert d.num_inference_steps == official["steps"]
    assert d.guidance_scale == official["guidance"]
    assert d.guidance_scale_2 == official["guidance_2"]
    assert d.flow_shift == official["flow_shift"]
    assert d.negative_prompt == OFFICIAL_NEGATIVE_PROMPT


@pytest.mark.parametrize("spec", list(VARIANTS.values()), ids=list(VARIANTS))
def test_variant_table_is_self_consistent(spec):
    d = spec.defaults
    for width, height in spec.native_sizes:
        assert width % spec.size_multiple == 0 and height % spec.size_multiple == 0
    assert (d.width, d.height) in spec.native_sizes
    assert (d.num_frames - 1) % 4 == 0
    assert (spec.boundary_ratio is not None) is spec.two_experts
    assert (d.guidance_scale_2 is not None) is spec.two_experts
    assert spec.vae_z_dim == (48 if spec.size_multiple == 32 else 16)
    # The official defaults fit the default request limits.
    limits = RequestLimits()
    assert d.width * d.height <= limits.max_pixels
    assert max(d.width, d.height) <= limits.max_side_px
    assert d.num_frames <= limits.max_num_frames
    assert d.fps <= limits.max_fps
    assert d.num_inference_steps <= limits.max_inference_steps
    assert d.guidance_scale <= limits.max_guidance_scale


def test_official_negative_prompt():
    # wan/configs/shared_config.py sample_neg_prompt
    assert OFFICIAL_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕")
    assert OFFICIAL_NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")

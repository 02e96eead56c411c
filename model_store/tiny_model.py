"""Tiny Wan2.2 checkpoints with random weights, built offline in seconds.

Each layout is the real one (real diffusers classes, saved with ``save_pretrained``), only
shrunk: two transformer blocks, a narrow VAE, a two-layer UMT5 encoder, and a UMT5-style
Unigram tokenizer built here from a small word list (no model hub). The outputs are noise;
the point is that every code path of the server runs on a laptop CPU exactly as it would on
full-size weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402

LAYOUTS = ("t2v-a14b", "i2v-a14b", "ti2v-5b")
TEXT_DIM = 32
# Written last: a folder without it is a half-built checkpoint and gets rebuilt. (Renamed when
# the folder gained lora/: older builds lack the adapters and are rebuilt.)
COMPLETE_MARKER = ".tiny-model-complete-2"
# The tiny adapters in <checkpoint>/lora/: (name, seed, key layout). "diffusers" is the PEFT
# layout diffusers saves (transformer.blocks.N.attn1.to_q.lora_A.weight); "wan" is the original
# Wan layout that Wan2.2-Lightning ships (diffusion_model.blocks.N.self_attn.q.lora_A.weight),
# which diffusers converts on load. Two-expert layouts get one file per expert (NAME-high,
# NAME-low), as Lightning does.
TINY_LORAS = (("tiny-lora", 10, "diffusers"), ("tiny-lora-b", 20, "wan"))
LORA_RANK = 4

_WORDS = (
    "a an the of in on at with and or to from over under into through across above below "
    "cat dog bird fish horse monkey person people child man woman robot car train boat plane "
    "city street forest river sea ocean mountain sky cloud rain snow sun moon star night day "
    "sunset sunrise light shadow fire water wind red orange yellow green blue purple black white "
    "gold silver slow fast camera pan zoom tilt close wide shot walking running dancing flying "
    "swimming jumping sitting standing looking smiling big small old young bright dark soft "
    "video scene style cinematic realistic anime painting photo detailed high quality"
).split()


def build_tokenizer() -> T5Tokenizer:
    """A UMT5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2) over a small vocabulary."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -5.0) for word in _WORDS]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    vocab += [(c, -10.0) for c in chars] + [(f"▁{c}", -9.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _text_encoder(vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, is_encoder_decoder=False,
    )
    return UMT5EncoderModel(config).eval()


def _transformer(in_channels: int, out_channels: int, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=in_channels, out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=256,
        ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        # Same as the real models: RoPE tables must cover full-size latent grids.
        rope_max_seq_len=1024,
    )


def _wan21_vae() -> AutoencoderKLWan:
    """The A14B variants' VAE layout: z_dim 16, 8x spatial, 4x temporal."""
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _wan22_vae() -> AutoencoderKLWan:
    """TI2V-5B's VAE layout: z_dim 48, 16x spatial (2x2 patchify), residual blocks."""
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
        latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
    )


def build_pipeline(layout: str):
    """The tiny pipeline object of a layout, in memory."""
    tokenizer = build_tokenizer()
    common = dict(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(len(tokenizer)),
        # The official checkpoints ship UniPC with flow sigmas; the shift stored here (3.0) is
        # deliberately not the variant's, so tests see the loader set it explicitly.
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=3.0),
    )
    if layout == "t2v-a14b":
        return WanPipeline(vae=_wan21_vae(), transformer=_transformer(16, 16, 1),
                           transformer_2=_transformer(16, 16, 2), boundary_ratio=0.875, **common)
    if layout == "i2v-a14b":
        # Wan2.2 I2V has no CLIP image encoder: the image enters as 16 latent + 4 mask channels.
        return WanImageToVideoPipeline(vae=_wan21_vae(), transformer=_transformer(36, 16, 1),
                                       transformer_2=_transformer(36, 16, 2), boundary_ratio=0.900,
                                       image_processor=None, image_encoder=None, **common)
    if layout == "ti2v-5b":
        return WanPipeline(vae=_wan22_vae(), transformer=_transformer(48, 48, 1), transformer_2=None,
                           boundary_ratio=None, expand_timesteps=True, **common)
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


# Linear layers of one Wan block, diffusers name -> original Wan name.
_BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def lora_state_dict(transformer: WanTransformer3DModel, seed: int, layout: str) -> dict[str, torch.Tensor]:
    """A random rank-LORA_RANK adapter for every linear layer of every block, in ``layout``'s keys.
    lora_B is not zero (a trained adapter's is not): the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, block in enumerate(transformer.blocks):
        for name, wan_name in _BLOCK_LINEARS.items():
            linear = block.get_submodule(name)
            a = torch.randn(LORA_RANK, linear.in_features, generator=generator) * 0.5
            b = torch.randn(linear.out_features, LORA_RANK, generator=generator) * 0.5
            prefix = f"transformer.blocks.{index}.{name}" if layout == "diffusers" else \
                f"diffusion_model.blocks.{index}.{wan_name}"
            state[f"{prefix}.lora_A.weight"] = a.contiguous()
            state[f"{prefix}.lora_B.weight"] = b.contiguous()
    return state


def lora_files(layout: str) -> dict[str, dict[str, str]]:
    """Adapter name -> {"path": ..., "path_2": ...} relative to the checkpoint folder."""
    if layout == "ti2v-5b":
        return {name: {"path": f"lora/{name}.safetensors"} for name, _, _ in TINY_LORAS}
    return {name: {"path": f"lora/{name}-high.safetensors", "path_2": f"lora/{name}-low.safetensors"}
            for name, _, _ in TINY_LORAS}


def write_tiny_loras(pipe, layout: str, folder: Path) -> None:
    from safetensors.torch import save_file

    (folder / "lora").mkdir(exist_ok=True)
    for name, seed, key_layout in TINY_LORAS:
        files = lora_files(layout)[name]
        save_file(lora_state_dict(pipe.transformer, seed, key_layout), folder / files["path"])
        if "path_2" in files:
            # Another seed: each expert gets its own adapter, so a test can tell them apart.
            save_file(lora_state_dict(pipe.transformer_2, seed + 1, key_layout), folder / files["path_2"])


def is_built(out_dir: str | Path) -> bool:
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


def build_tiny_checkpoint(layout: str, out_dir: str | Path, force: bool = False) -> Path:
    """Save a tiny checkpoint of ``layout`` to ``out_dir`` (atomically); return the folder."""
    out = Path(out_dir).resolve()
    if is_built(out) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe = build_pipeline(layout)
        pipe.save_pretrained(staging, safe_serialization=True)
        write_tiny_loras(pipe, layout, staging)
        # save_pretrained may write 0600 files; a server running as another user must read them.
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.chmod(0o755)
        (staging / COMPLETE_MARKER).write_text(layout + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=LAYOUTS + ("all",), default="ti2v-5b")
    parser.add_argument("--out", default="weights", help="parent folder; each layout goes to <out>/tiny-<layout>")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    for layout in LAYOUTS if args.layout == "all" else (args.layout,):
        path = build_tiny_checkpoint(layout, Path(args.out) / f"tiny-{layout}", force=args.force)
        print(f"{layout}: {path}")


if __name__ == "__main__":
    main()

"""Full-size Wan2.2 architectures with random weights, for timing on a GPU.

The real component configurations (transformer widths and depths, the VAEs, UMT5-XXL) are
built directly on the device in their serving dtype and saved in the diffusers layout, so
loading, compilation and every forward cost what they cost with the real weights. The
pictures are noise: never judge quality from these. The tokenizer is the tiny offline one
(a real vocabulary would not change the compute: prompts are padded to 512 tokens).
"""

from __future__ import annotations

import argparse
import os
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
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

from model_store.tiny_model import COMPLETE_MARKER, LAYOUTS, build_tokenizer  # noqa: E402

UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
_TRANSFORMER_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256,
                           cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TI2V_5B_TRANSFORMER = dict(_TRANSFORMER_COMMON, num_attention_heads=24, in_channels=48, out_channels=48,
                           ffn_dim=14336, num_layers=30)
A14B_TRANSFORMER = dict(_TRANSFORMER_COMMON, num_attention_heads=40, out_channels=16, ffn_dim=13824, num_layers=40)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                 in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)


def _on(device: str, dtype: torch.dtype, build):
    """Construct a module directly on the device, in its dtype (no float32 detour in memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build().eval()
    finally:
        torch.set_default_dtype(previous)


def build_full_pipeline(layout: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """The full-size pipeline of a layout with random weights, in memory on ``device``."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    common = dict(
        tokenizer=tokenizer,
        text_encoder=_on(device, dtype, lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL))),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=5.0),
    )
    if layout == "ti2v-5b":
        return WanPipeline(vae=_on(device, torch.float32, lambda: AutoencoderKLWan(**WAN22_VAE)),
                           transformer=_on(device, dtype, lambda: WanTransformer3DModel(**TI2V_5B_TRANSFORMER)),
                           transformer_2=None, boundary_ratio=None, expand_timesteps=True, **common)
    in_channels = 16 if layout == "t2v-a14b" else 36

    def expert():
        return _on(device, dtype, lambda: WanTransformer3DModel(**A14B_TRANSFORMER, in_channels=in_channels))

    vae = _on(device, torch.float32, lambda: AutoencoderKLWan(**WAN21_VAE))
    if layout == "t2v-a14b":
        return WanPipeline(vae=vae, transformer=expert(), transformer_2=expert(), boundary_ratio=0.875, **common)
    if layout == "i2v-a14b":
        return WanImageToVideoPipeline(vae=vae, transformer=expert(), transformer_2=expert(), boundary_ratio=0.900,
                                       image_processor=None, image_encoder=None, **common)
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def save_full_checkpoint(layout: str, out_dir: str | Path, device: str = "cuda") -> Path:
    """Build and save a full-size random checkpoint (TI2V-5B: ~21 GB; A14B: ~68 GB)."""
    out = Path(out_dir)
    if (out / COMPLETE_MARKER).is_file():
        return out
    pipe = build_full_pipeline(layout, device)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    (out / COMPLETE_MARKER).write_text(f"full-size random {layout}\n")
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=LAYOUTS, default="ti2v-5b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    print(save_full_checkpoint(args.layout, args.out, args.device))


if __name__ == "__main__":
    main()

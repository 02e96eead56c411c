"""Attention kernel selection (handler/attention.py) on the CPU: ``auto`` falls back to SDPA where
FlashAttention 4 cannot run, an explicit ``flash4`` says why it cannot, and the FA4 wiring into
diffusers (also through the Ulysses sequence split) computes what SDPA computes. The FA4 kernel
itself needs a Hopper GPU: here a float64 reference kernel with FA4's calling convention stands in."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from handler import attention
from handler.config import ConfigError, SpeedOptions


def reference_kernel(query, key, value, scale):
    """FA4's convention: (B, S, H, D) in, (out (B, S, H, D), lse (B, H, S) float32) out."""
    q, k, v = (x.permute(0, 2, 1, 3).double() for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * scale
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(0, 2, 1, 3).to(query.dtype), torch.logsumexp(scores, dim=-1).float()


def sdpa(query, key, value):
    return torch.nn.functional.scaled_dot_product_attention(
        *(x.permute(0, 2, 1, 3) for x in (query, key, value))).permute(0, 2, 1, 3)


def test_auto_is_sdpa_on_cpu_and_explicit_flash4_says_why_not():
    cpu = torch.device("cpu")
    assert attention.resolve_backend("auto", cpu) == "native"
    assert attention.resolve_backend("_native_cudnn", cpu) == "_native_cudnn"
    with pytest.raises(RuntimeError, match="flash4, but FlashAttention 4 needs a CUDA GPU"):
        attention.resolve_backend("flash4", cpu)


@pytest.mark.parametrize(("capability", "imports", "expected"), [
    ((9, 0), True, "flash4"),      # Hopper with the wheel
    ((9, 0), False, "native"),     # Hopper without it
    ((8, 0), True, "native"),      # Ampere: FA4's CuTe kernels do not cover it
])
def test_auto_picks_flash4_only_on_hopper_with_the_wheel(monkeypatch, capability, imports, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(attention, "_import_flash4",
                        lambda: (reference_kernel, "") if imports else (None, "flash-attn-4 does not import: x"))
    assert attention.resolve_backend("auto", torch.device("cuda")) == expected


def test_speed_options_accept_the_new_names_and_refuse_unknown_ones():
    assert SpeedOptions(attention_backend="auto").attention_backend == "auto"
    assert SpeedOptions(attention_backend="flash4").attention_backend == "flash4"
    with pytest.raises(ConfigError, match="attention_backend must be one of auto, flash4, native"):
        SpeedOptions(attention_backend="flash5")


def test_flash4_backend_in_a_wan_transformer_computes_what_sdpa_computes(monkeypatch):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, 32), return_dict=False)
    with torch.inference_mode():
        expected = model(**inputs)[0]
        monkeypatch.setattr(attention, "_kernel_override", reference_kernel)
        attention.apply_backend(model, "flash4")
        assert {m.processor._attention_backend.value for m in model.modules() if hasattr(m, "processor")} == {
            "flash_4_hub"}
        got = model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _ulysses_rank(rank: int, world: int, port: int, query, key, value, results):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
        config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
        config.setup(rank, world, torch.device("cpu"), mesh=mesh)
        shard = query.shape[1] // world
        mine = slice(rank * shard, (rank + 1) * shard)
        out = attention.flash4_attention(query[:, mine], key[:, mine], value[:, mine], _parallel_config=config,
                                         kernel=reference_kernel)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_flash4_runs_under_the_ulysses_sequence_split():
    """Two gloo ranks each hold half the tokens; diffusers' Ulysses exchange gives each rank all
    tokens of half the heads, our forward_op attends, and the halves must match one process."""
    from scripts.serve import free_ports

    torch.manual_seed(1)
    query, key, value = (torch.randn(1, 16, 4, 8) for _ in range(3))
    results = mp.Manager().dict()
    mp.start_processes(_ulysses_rank, args=(2, free_ports(1)[0], query, key, value, results), nprocs=2,
                       start_method="spawn")
    got = torch.cat([results[0], results[1]], dim=1)
    torch.testing.assert_close(got, sdpa(query, key, value), rtol=1e-4, atol=1e-5)

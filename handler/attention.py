"""Which attention kernel the transformers run, and FlashAttention 4 wired into diffusers.

``handler.speed.attention_backend`` names a diffusers backend, or:

- ``auto`` (the default): FlashAttention 4 (the ``flash-attn-4`` wheel, CuTe DSL) on a Hopper GPU
  where it is installed and imports; PyTorch SDPA (``native``) everywhere else, CPUs included.
  Both compute exact softmax attention (FA4 is as lossless as SDPA's flash kernel: same math,
  another tiling); BENCHMARKS.md has the measured difference.
- ``flash4``: FlashAttention 4, and a clear error at start where it cannot run.

diffusers 0.42 only knows FA4 as ``flash_4_hub``, fetched at run time from the Hugging Face Hub
(impossible offline) and without context-parallel support. We keep that enum member (diffusers'
processors dispatch on it) but register our own function for it: the locally installed kernel,
wrapped as a torch custom op (so regional compilation keeps ``fullgraph=True``), with the
``forward_op`` that diffusers' Ulysses sequence split calls on each rank's full-sequence heads.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
FLASH4 = "flash4"
# Compute capabilities FA4's CuTe kernels support for the forward: Hopper (9.x), Blackwell (10.x).
_FLASH4_MAJORS = (9, 10)


def _import_flash4():
    """FA4's ``flash_attn_func``, or the reason it cannot be used."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as error:  # noqa: BLE001 -- any import failure (missing wheel, CUDA DSL libs) means "not here"
        return None, f"flash-attn-4 does not import: {type(error).__name__}: {error}"
    return flash_attn_func, ""


def flash4_unavailable_reason(device: torch.device) -> str:
    """Empty when FA4 can run on ``device``; otherwise why not (for the log or the error)."""
    if device.type != "cuda":
        return f"FlashAttention 4 needs a CUDA GPU, the device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in _FLASH4_MAJORS:
        return f"FlashAttention 4 runs on Hopper/Blackwell, this GPU is sm_{major}{minor}"
    return _import_flash4()[1]


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend to run: ``auto`` becomes ``flash4`` or ``native``; an explicit ``flash4``
    that cannot run raises, so a deployment never silently runs slower than configured."""
    if requested not in (AUTO, FLASH4):
        return requested
    reason = flash4_unavailable_reason(device)
    if not reason:
        return FLASH4
    if requested == FLASH4:
        raise RuntimeError(f"handler.speed.attention_backend is flash4, but {reason}")
    log.info("attention: PyTorch SDPA (%s)", reason)
    return "native"


def apply_backend(model: torch.nn.Module, backend: str) -> None:
    """Set the attention backend of every attention module of ``model``."""
    if backend != FLASH4:
        model.set_attention_backend(backend)
        return
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import AttentionBackendName

    register_flash4()
    if _kernel_override is None:
        _flash4_op()  # define the custom op now, not while dynamo traces the first compiled call
    # Not model.set_attention_backend: for this enum member it checks for (and would download)
    # the Hub kernel. Setting the processors' field is all it does otherwise.
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin) and module.processor is not None:
            module.processor._attention_backend = AttentionBackendName.FLASH_4_HUB


_FLASH4_OP = None


def _flash4_op():
    """FA4 forward as a custom op: opaque to dynamo, with a fake for shape inference. Made once,
    eagerly (apply_backend): dynamo must never trace its creation (measured: compiling a block
    that created it failed in ``infer_schema``), so traced code reads the module global only."""
    global _FLASH4_OP
    if _FLASH4_OP is not None:
        return _FLASH4_OP
    flash_attn_func, reason = _import_flash4()
    if flash_attn_func is None:
        raise RuntimeError(reason)

    @torch.library.custom_op("wan::flash4_forward", mutates_args=())
    def flash4_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = flash_attn_func(query, key, value, softmax_scale=scale, return_lse=True)[:2]
        return out, lse

    @flash4_forward.register_fake
    def _(query, key, value, scale):
        batch, seq, heads, _ = query.shape
        return (query.new_empty((*query.shape[:-1], value.shape[-1])),
                query.new_empty((batch, heads, seq), dtype=torch.float32))

    _FLASH4_OP = flash4_forward
    return flash4_forward


def _forward(query, key, value, scale, kernel=None):
    """(out, lse): out (B, S, H, D) like the inputs, lse (B, S, H) as diffusers' ring merge wants."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    out, lse = (kernel or _kernel_override or _FLASH4_OP or _flash4_op())(query, key, value, scale)
    return out, lse.permute(0, 2, 1)


def _forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None, *, kernel=None):
    """What diffusers' sequence split calls on each rank (inference only: no backward)."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("flash4 attention: no mask, dropout, causal or GQA (Wan uses none of them)")
    out, lse = _forward(query, key, value, scale, kernel)
    return (out, lse) if return_lse else out


def _backward_op(*_args, **_kwargs):
    raise NotImplementedError("flash4 attention is wired for inference only")


def flash4_attention(query, key, value, attn_mask=None, scale=None, is_causal=False, return_lse=False,
                     _parallel_config=None, *, kernel=None):
    """The diffusers backend function (``dispatch_attention_fn`` calls it with these names)."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    if _parallel_config is None:
        out = _forward_op(None, query, key, value, attn_mask, 0.0, is_causal, scale, return_lse=True, kernel=kernel)
    else:
        out = _templated_context_parallel_attention(
            query, key, value, attn_mask, 0.0, is_causal, scale, False, True,
            forward_op=functools.partial(_forward_op, kernel=kernel), backward_op=_backward_op,
            _parallel_config=_parallel_config)
    out, lse = out
    return (out, lse) if return_lse else out


_registered = False
# Tests put a reference kernel with FA4's calling convention here (the real one needs a GPU).
_kernel_override = None


def register_flash4() -> None:
    """Put ``flash4_attention`` (with context-parallel support) in diffusers' registry under
    ``flash_4_hub``, once."""
    global _registered
    if _registered:
        return
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        _check_qkv_dtype_bf16_or_fp16,
        _check_shape,
    )

    _AttentionBackendRegistry.register(
        AttentionBackendName.FLASH_4_HUB, constraints=[_check_qkv_dtype_bf16_or_fp16, _check_shape],
        supports_context_parallel=True,
    )(flash4_attention)
    _registered = True

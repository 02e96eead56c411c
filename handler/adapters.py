"""Fast modes on a loaded pipeline: LoRA adapters (fused at load, or chosen per request), the
step cache and FP8 matmuls. Knows diffusers/PEFT and torch; the rules of what a request may ask
for are in handler/config.py (read without torch) and handler/request.py.

Per request, two ways to change adapters (``handler.lora.hotswap``):

- side by side (default): every allowed adapter is loaded once under its own name; a request
  activates its own with ``set_adapters`` (its scales) and a request without any switches LoRA
  off (``disable_lora``: each layer then computes exactly its base output). Cheap, exact, but a
  compiled transformer sees another module state for each new combination of adapters and
  scales: torch.compile guards on it and recompiles (the README says what that costs).
- hot swap: diffusers' ``enable_lora_hotswap`` pads every adapter to one rank and makes the
  scaling a tensor; ``max_per_request`` fixed slots are loaded once, and a request copies its
  adapters' weights (lora_B times its scale) into them in place, zeros into the unused ones. The
  module structure, and so the compiled graph, never changes; the cost is the slots' matmuls on
  every request, adapters or not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from handler.config import LoraChoice, LoraOptions, StepCache
from handler.errors import ModelLoadError

log = logging.getLogger(__name__)

# The experts in diffusers' names, and the LoraAdapter field holding each one's file.
EXPERT_FILES = (("transformer", "path"), ("transformer_2", "path_2"))
STEP_CACHE = "step_cache"
FP8 = "fp8"


@dataclass(frozen=True)
class FastOptions:
    """What a model's config asks of the loaded pipeline (HandlerConfig's fields)."""

    lora: LoraOptions = field(default_factory=LoraOptions)
    # Relative adapter paths are relative to the checkpoint folder.
    root: Path = Path(".")
    step_cache: StepCache | None = None
    fp8: bool = False


class Adapters:
    """The LoRA adapters of one pipeline: fused at construction, then chosen per request."""

    def __init__(self, pipe, options: LoraOptions, root: Path):
        self.pipe = pipe
        self.options = options
        self.root = root
        self.experts = {name: getattr(pipe, name) for name, _ in EXPERT_FILES if getattr(pipe, name, None) is not None}
        for adapter in options.adapters.values():
            for expert, key in EXPERT_FILES:
                if getattr(adapter, key) and expert not in self.experts:
                    raise ModelLoadError(f"handler.lora.adapters.{adapter.name}.{key}: this checkpoint has no {expert}")
        self.fused = options.fuse
        for choice in options.fuse:
            self._fuse(choice)
        self.active: tuple[LoraChoice, ...] = ()
        self.slots: list[str] = []
        # Host copies of each adapter's diffusers state dict, per expert (hot swap reads them).
        self.weights: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        if not options.adapters:
            return
        if options.hotswap:
            self._load_slots()
        else:
            for adapter in options.adapters.values():
                self._load(adapter.name, adapter.name)
            for model in self.experts.values():
                if getattr(model, "peft_config", None):
                    model.disable_lora()

    # -- loading --------------------------------------------------------------------------

    def _file(self, name: str, key: str) -> Path | None:
        raw = getattr(self.options.adapters[name], key)
        if raw is None:
            return None
        path = Path(raw) if Path(raw).is_absolute() else self.root / raw
        if not path.is_file():
            raise ModelLoadError(f"handler.lora.adapters.{name}.{key}: no file at {path}")
        return path

    def _state(self, name: str, expert: str) -> dict[str, torch.Tensor] | None:
        """The adapter's file for ``expert`` as a diffusers state dict (converted from the
        original Wan layout when it is in that one)."""
        path = self._file(name, dict(EXPERT_FILES)[expert])
        if path is None:
            return None
        try:
            return self.pipe.lora_state_dict(str(path))
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read LoRA {name} for {expert} from {path}: {e}") from e

    def _load(self, name: str, adapter_name: str, state_of=None, hotswap: bool = False) -> None:
        for expert in self.experts:
            state = state_of(expert) if state_of is not None else self._state(name, expert)
            if state is None:
                continue
            try:
                self.pipe.load_lora_weights(state, adapter_name=adapter_name, hotswap=hotswap,
                                            load_into_transformer_2=expert == "transformer_2")
            except (ValueError, KeyError, RuntimeError) as e:
                raise ModelLoadError(f"LoRA {name} does not fit {expert}: {e}") from e

    def _fuse(self, choice: LoraChoice) -> None:
        """Bake one adapter into the weights at its scale, then drop its LoRA layers."""
        self._load(choice.name, f"fused-{choice.name}")
        components = [e for e in self.experts if getattr(self.options.adapters[choice.name], dict(EXPERT_FILES)[e])]
        self.pipe.fuse_lora(components=components, lora_scale=choice.scale, adapter_names=[f"fused-{choice.name}"])
        self.pipe.unload_lora_weights()
        log.info("LoRA %s fused at scale %g into %s", choice.name, choice.scale, ", ".join(components))

    def _load_slots(self) -> None:
        for name in self.options.adapters:
            self.weights[name] = {e: s for e in self.experts if (s := self._state(name, e)) is not None}
        ranks = [t.shape[0] for per in self.weights.values() for s in per.values()
                 for k, t in s.items() if k.endswith("lora_A.weight")]
        self.pipe.enable_lora_hotswap(target_rank=max(ranks))
        # Every slot covers every layer any adapter targets (the hot-swapped weights must fit).
        self.layout = {e: _union_layout([per[e] for per in self.weights.values() if e in per]) for e in self.experts}
        self.slots = [f"slot{i}" for i in range(self.options.max_per_request)]
        for slot in self.slots:
            self._load(slot, slot, state_of=lambda e: _zeros(self.layout[e]) if self.layout[e] else None)
        for expert, model in self.experts.items():
            if self.layout[expert]:
                model.set_adapters(self.slots, [1.0] * len(self.slots))

    # -- per request ----------------------------------------------------------------------

    def apply(self, choices: tuple[LoraChoice, ...]) -> None:
        """Make ``choices`` (names from the allow-list, checked by the request) the adapters that run."""
        choices = tuple(choices)
        if choices == self.active or not self.options.adapters:
            return
        if self.options.hotswap:
            self._swap(choices)
        else:
            for model in self.experts.values():
                loaded = getattr(model, "peft_config", None) or {}
                if not loaded:
                    continue  # no allowed adapter has a file for this expert
                present = [c for c in choices if c.name in loaded]
                if present:
                    model.enable_lora()
                    model.set_adapters([c.name for c in present], [c.scale for c in present])
                else:
                    model.disable_lora()
        self.active = choices

    def _swap(self, choices: tuple[LoraChoice, ...]) -> None:
        for index, slot in enumerate(self.slots):
            choice = choices[index] if index < len(choices) else None

            def state_of(expert, choice=choice):
                if not self.layout[expert]:
                    return None
                own = self.weights[choice.name].get(expert) if choice is not None else None
                return _scaled(self.layout[expert], own, choice.scale if choice is not None else 0.0)

            self._load(choice.name if choice else "(none)", slot, state_of=state_of, hotswap=True)


def _union_layout(states: list[Mapping[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the largest-rank adapter's tensor, over all adapters of one expert."""
    layout: dict[str, tuple[int, ...]] = {}
    for state in states:
        for key, tensor in state.items():
            if key not in layout or tensor.numel() > _numel(layout[key]):
                layout[key] = tuple(tensor.shape)
    return layout


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _zeros(layout: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(shape) for key, shape in layout.items()}


def _scaled(layout: Mapping[str, tuple[int, ...]], own: Mapping[str, torch.Tensor] | None,
            scale: float) -> dict[str, torch.Tensor]:
    """An adapter's weights for a slot: its lora_B times the request's scale (the slot's scaling
    stays 1, so a new scale needs no new graph); zeros where it has no layer."""
    state = {}
    for key, shape in layout.items():
        tensor = own.get(key) if own is not None else None
        if tensor is None:
            # Zeros of this key's rank 1: hot swap pads ranks up to the slot's.
            shape = (1, shape[1]) if key.endswith("lora_A.weight") else (shape[0], 1)
            state[key] = torch.zeros(shape)
        elif key.endswith("lora_B.weight"):
            state[key] = tensor * scale
        else:
            state[key] = tensor.clone()
    return state


class StepCacheSwitch:
    """diffusers' FirstBlockCache on the experts for one generation. It composes with the guidance
    split (handler/parallel.py): the pipeline keeps one cache per branch (cache_context "cond" /
    "uncond"), and a rank of a split computes its one branch inside the first context every step."""

    def __init__(self, experts: list[torch.nn.Module], options: StepCache):
        self.experts = experts
        self.options = options

    def __enter__(self):
        from diffusers.hooks import FirstBlockCacheConfig

        for expert in self.experts:
            expert.enable_cache(FirstBlockCacheConfig(threshold=self.options.threshold))
        return self

    def __exit__(self, *_exc):
        for expert in self.experts:
            expert.disable_cache()


def quantize_fp8(experts: list[torch.nn.Module], device: torch.device) -> None:
    """FP8 weights and dynamic FP8 activations (torchao) in the experts' linear layers. GPU only:
    the config refuses it on a CPU worker; a GPU worker that came up without a GPU refuses here."""
    if device.type != "cuda":
        raise ModelLoadError("handler.fp8: FP8 matmuls need a GPU, and this worker runs on the CPU")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise ModelLoadError("handler.fp8 needs torchao (pip install torchao, constrained to our torch)") from e
    for expert in experts:
        # Per-row scales: the setting torchao recommends for accuracy on H100.
        quantize_(expert, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))

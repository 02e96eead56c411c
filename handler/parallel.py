"""One generation over several GPUs: the ranks of one TorchServe worker started by torchrun.

TorchServe (``parallelType: tp`` with a ``torchrun`` section in model-config.yaml) starts one
process per GPU and sends every request to every rank; only rank 0's answer goes back to the
client (its intermediate responses too). Here:

- Rank 0 (the leader) alone parses the request, reads s3:// inputs and decides. It sends its
  decision to the other ranks (a parsed request, or "nothing to do" after an error reply), so
  the ranks can never disagree about whether, or what, to generate.
- The transformer runs split two ways. Classifier-free guidance: the conditional and the
  unconditional forward of each step run at the same time on two halves of the ranks
  (``cfg_degree`` 2) instead of one after the other. Sequence: inside each half, diffusers'
  Ulysses context parallelism splits the video tokens over ``ulysses_degree`` ranks.
- Every rank encodes the prompt itself (0.05 s; cheaper than sending it), only the leader
  decodes the latents with the VAE and encodes the MP4.
- Stopping (the deadline) is agreed at every step, so all ranks stop at the same step. A failure
  inside the collective part (out of memory in one rank, say) leaves the others waiting in a
  collective that will never complete: that worker cannot serve again, so the failing rank exits,
  torchrun stops the others and TorchServe answers "Worker died." and starts the worker again.
  Even the leader exits without answering: once another rank's connection has closed, TorchServe
  has answered already, and a late answer would be taken for the next request's.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.distributed.device_mesh import init_device_mesh

from handler.config import ParallelOptions
from handler.errors import ConfigError, InvalidRequest

log = logging.getLogger(__name__)

# Exit status of a rank that gives up after a failure in a collective; torchrun then stops the
# other ranks and TorchServe starts the worker again.
EXIT_STATUS_COLLECTIVE_BROKEN = 70
CFG_HOOK_NAME = "wan_cfg_split"


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits among the worker's ranks."""

    world_size: int
    rank: int
    local_rank: int
    cfg_degree: int
    ulysses_degree: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the conditional forward; 1: the unconditional one."""
        return self.rank // self.ulysses_degree

    @classmethod
    def from_environment(cls, options: ParallelOptions, env: dict[str, str] | None = None) -> RankLayout | None:
        """The layout torchrun describes in the environment; None for a plain one-process worker."""
        env = os.environ if env is None else env
        world_size = int(env.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            return None
        rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
        cfg_degree = 2 if options.cfg_split and world_size % 2 == 0 else 1
        return cls(world_size=world_size, rank=rank, local_rank=local_rank, cfg_degree=cfg_degree,
                   ulysses_degree=world_size // cfg_degree)

    def check_heads(self, num_attention_heads: int) -> None:
        """Ulysses gives each rank whole attention heads."""
        if num_attention_heads % self.ulysses_degree:
            raise ConfigError(
                f"{self.world_size} ranks split {self.cfg_degree} way(s) for guidance leave {self.ulysses_degree} "
                f"for the sequence, which does not divide the transformer's {num_attention_heads} attention heads"
            )


class RankGroup:
    """The initialized process group of one worker's ranks, and the messages between them."""

    def __init__(self, layout: RankLayout, device: torch.device, options: ParallelOptions):
        self.layout = layout
        self.device = device
        # A rank that waits for the others can be asked where: kill -USR1 <pid> prints every
        # thread's stack to the worker log.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        timeout = datetime.timedelta(seconds=options.collective_timeout_s)
        if not dist.is_initialized():
            # Tensors on the GPU go through NCCL, Python objects and flags through gloo.
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        mesh_device = "cuda" if device.type == "cuda" else "cpu"
        self.mesh = init_device_mesh(
            mesh_device, (layout.cfg_degree, 1, layout.ulysses_degree), mesh_dim_names=("cfg", "ring", "ulysses")
        )
        # A gloo group for control messages: they are small CPU objects, and must not queue
        # behind GPU work on NCCL streams.
        self.control = dist.new_group(backend="gloo", timeout=timeout)
        log.info("rank %d of %d on %s: guidance split %d way(s), sequence split %d way(s)", layout.rank,
                 layout.world_size, device, layout.cfg_degree, layout.ulysses_degree)

    @classmethod
    def for_worker(cls, options: ParallelOptions, gpu_available: bool) -> RankGroup | None:
        layout = RankLayout.from_environment(options)
        if layout is None:
            return None
        if gpu_available:
            # torchrun's ranks see the GPUs TorchServe gave the worker (CUDA_VISIBLE_DEVICES).
            device = torch.device("cuda", layout.local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        return cls(layout, device, options)

    @property
    def is_leader(self) -> bool:
        return self.layout.is_leader

    def share_decision(self, decision: Any = None) -> Any:
        """The leader's decision for this request (a parsed request, or None: nothing to generate)."""
        message = [decision if self.is_leader else None]
        dist.broadcast_object_list(message, src=0, group=self.control)
        return message[0]

    def agree_to_stop(self, wants_to_stop: bool) -> bool:
        """True on every rank when any rank wants to stop at this step."""
        flag = torch.tensor([1 if wants_to_stop else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def check_tokens(self, tokens: int, size: str) -> None:
        """Equal sequence shards: the video's token count must divide by the sequence split."""
        if tokens % self.layout.ulysses_degree:
            raise InvalidRequest(
                f"{size} makes {tokens} video tokens, which this {self.layout.world_size}-GPU deployment cannot "
                f"split {self.layout.ulysses_degree} ways; change width, height or num_frames so the token count "
                f"divides by {self.layout.ulysses_degree}", "num_frames",
            )

    def enable_on(self, transformer: torch.nn.Module) -> CfgSplitHook | None:
        """Sequence split (diffusers' Ulysses) and guidance split on one transformer."""
        if self.layout.ulysses_degree > 1:
            from diffusers import ContextParallelConfig

            self.layout.check_heads(transformer.config.num_attention_heads)
            if self.device.type == "cpu":
                _resolve_on_cpu(transformer, self.layout)
            transformer.enable_parallelism(config=ContextParallelConfig(
                ulysses_degree=self.layout.ulysses_degree, mesh=self.mesh["ring", "ulysses"]))
        if self.layout.cfg_degree == 1:
            return None
        hook = CfgSplitHook(self)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, CFG_HOOK_NAME)
        return hook

    def give_up(self, reason: str) -> NoReturn:
        """Leave the worker after a failure inside a collective; torchrun stops the other ranks
        and TorchServe starts the worker again."""
        log.error("rank %d: %s; the worker restarts", self.layout.rank, reason)
        logging.shutdown()  # the reason must reach the log before the process is gone
        os._exit(EXIT_STATUS_COLLECTIVE_BROKEN)


def _resolve_on_cpu(transformer: torch.nn.Module, layout: RankLayout) -> None:
    """diffusers places each rank on accelerator ``rank % device_count``, which divides by zero
    without one. On CPU (gloo: the test suite) record the same config on the CPU instead; the
    mesh, the hooks and the attention are diffusers' own."""
    from diffusers.models._modeling_parallel import ParallelConfig

    def resolve(config):
        config = ParallelConfig(context_parallel_config=config)
        config.setup(layout.rank, layout.world_size, torch.device("cpu"), mesh=config.context_parallel_config.mesh)
        transformer._parallel_config = config
        return config

    transformer._resolve_parallel_config = resolve


class CfgSplitHook(ModelHook):
    """Runs the two forwards of a guided step at once, on the two halves of the ranks.

    The pipeline calls the transformer twice per step: conditional (prompt), then unconditional
    (negative prompt). On the first call each half computes its own branch, the halves exchange
    results, and the conditional one is returned; the second call returns the unconditional
    result already computed. Each branch sees exactly the inputs it would have on one GPU.
    """

    def __init__(self, group: RankGroup):
        super().__init__()
        self.group = group
        self.cfg_group = group.mesh["cfg"].get_group()
        self.negative: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def begin(self, negative_prompt_embeds: torch.Tensor | None) -> None:
        """Set before each generation: the negative prompt, or None when guidance is off."""
        self.negative = negative_prompt_embeds
        self.pending = None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if self.negative is None or args or kwargs.get("return_dict", True):
            # Guidance off, or not called the way the Wan pipelines call it: compute it here.
            return forward(*args, **kwargs)
        if self.pending is not None:
            # The unconditional call of this step: computed on the other half already.
            result, self.pending = self.pending, None
            return (result,)
        if self.group.layout.cfg_rank == 1:
            conditional = kwargs["encoder_hidden_states"]
            kwargs["encoder_hidden_states"] = self.negative.to(conditional.device, conditional.dtype)
        mine = forward(**kwargs)[0].contiguous()
        batch = mine.shape[0]
        both = torch.empty((2 * batch, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        _all_gather_single(both, mine, group=self.cfg_group)  # [conditional; unconditional]
        self.pending = both[batch:]
        return (both[:batch],)


# torch 2.13 renamed all_gather_into_tensor (deprecated there); GPU images may carry an older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

"""What a cross-check gets: the manifests of one run, the CRD schemas, and the models built from
them once per run (the TorchServe config the KServe checks compare against, Karmada's world with
its Lua runtime). A check is ``fn(context) -> list[Problem]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from scripts.manifests.core import REPO_ROOT, Manifest, Problem
from scripts.manifests.karmada.world import World
from scripts.manifests.schemas import CrdSchemas
from scripts.manifests.torchserve import TorchServeConfig


@dataclass
class Context:
    manifests: list[Manifest]
    crds: CrdSchemas
    repo_root: Path = REPO_ROOT  # where config/ is read from (tests point it at a changed copy)

    @cached_property
    def torchserve(self) -> TorchServeConfig:
        return TorchServeConfig(self.repo_root)

    @cached_property
    def world(self) -> World:
        return World(self.manifests, self.crds)


Check = Callable[[Context], list[Problem]]

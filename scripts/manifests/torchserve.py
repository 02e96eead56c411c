"""The TorchServe side of the KServe checks, read from the repository, never from the network:
``config/kserve/config.properties`` (ports, auth) and, per variant, ``config/models/<variant>.yaml``
rendered into the model_snapshot exactly as the store builder writes it
(``model_store.kserve_store``), so the timeouts checked are the ones TorchServe will apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from model_store.kserve_store import (
    MODEL_NAME,
    MODEL_VERSION,
    StoreError,
    load_model_config,
    model_snapshot,
    read_properties,
    render_config_properties,
)
from scripts.manifests.core import REPO_ROOT, Problem
from scripts.manifests.kube import as_int

KS_CONFIG = Path("config") / "kserve" / "config.properties"
MODEL_CONFIGS = Path("config") / "models"
# TorchServe's parallelType values whose worker it starts with torchrun, one rank (one GPU) per process.
TORCHRUN_PARALLEL_TYPES = ("tp", "pp", "pptp")


class TorchServeConfig:
    """config/kserve/config.properties and the per-variant snapshots, read once per run."""

    def __init__(self, repo_root: Path = REPO_ROOT):
        self.repo_root = repo_root
        self.config_path = repo_root / KS_CONFIG
        self.problems: list[Problem] = []
        self.properties: dict[str, str] = {}
        self._snapshots: dict[str, dict[str, Any] | StoreError] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        try:
            self.template = self.config_path.read_text(encoding="utf-8")
        except OSError as e:
            self.template = None
            self.problems.append(Problem(None, "", f"cannot read the KServe TorchServe config: {e}",
                                         file=self.config_path))
            return
        self.properties = read_properties(self.template)

    def port(self, key: str) -> int | None:
        url = self.properties.get(key, "")
        try:
            return urlsplit(url).port
        except ValueError:
            return None

    def host(self, key: str) -> str | None:
        return urlsplit(self.properties.get(key, "")).hostname

    def model_config_path(self, variant: str) -> Path:
        return self.repo_root / MODEL_CONFIGS / f"{variant}.yaml"

    def snapshot(self, variant: str) -> dict[str, Any]:
        """The model's entry in the snapshot the builder writes for this variant (StoreError if
        the model config is missing or incomplete)."""
        if variant not in self._snapshots:
            path = self.model_config_path(variant)
            source = str(path.relative_to(self.repo_root)) if path.is_relative_to(self.repo_root) else str(path)
            try:
                if not path.is_file():
                    raise StoreError(f"no model config {source} for variant {variant!r}")
                config = load_model_config(path)
                self._configs[variant] = config
                snapshot = model_snapshot(config, MODEL_NAME, MODEL_VERSION, source=source)
                if self.template is not None:
                    render_config_properties(config, self.template, MODEL_NAME, source=source)
                self._snapshots[variant] = dict(snapshot["models"][MODEL_NAME][MODEL_VERSION], source=source)
            except StoreError as e:
                self._snapshots[variant] = e
        result = self._snapshots[variant]
        if isinstance(result, StoreError):
            raise result
        return result

    def ranks_per_worker(self, variant: str) -> tuple[int | None, str]:
        """How many processes (one GPU each) one TorchServe worker of this variant runs, and
        why: torchrun's ``nproc-per-node`` for a torchrun parallelType, else 1. None when the
        config asks for torchrun without a usable process count. Call after ``snapshot``."""
        config = self._configs.get(variant) or {}
        parallel_type = config.get("parallelType")
        if parallel_type not in TORCHRUN_PARALLEL_TYPES:
            return 1, "no torchrun parallelType: one process per worker"
        torchrun = config.get("torchrun")
        nproc = as_int(torchrun.get("nproc-per-node")) if isinstance(torchrun, dict) else None
        if not nproc:
            return None, (f"parallelType {parallel_type} without a torchrun.nproc-per-node (a positive "
                          "integer): TorchServe would not know how many ranks to start")
        return nproc, f"parallelType {parallel_type}, torchrun.nproc-per-node {nproc}"

    def device_ids(self, variant: str) -> list[Any] | None:
        ids = (self._configs.get(variant) or {}).get("deviceIds")
        return ids if isinstance(ids, list) else None

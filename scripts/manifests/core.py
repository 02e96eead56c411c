"""The validator's core types: a manifest (one YAML document), a problem found in one, and
loading manifests from files. Imports nothing of the package: every other module builds on this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# What a platform engineer applies: the KServe layer, the Karmada layer, the job service.
DEFAULT_PATHS = (REPO_ROOT / "kserve", REPO_ROOT / "karmada", REPO_ROOT / "jobs" / "deploy")


def shown_path(path: Path) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


@dataclass(frozen=True)
class Manifest:
    """One YAML document of one file."""

    path: Path
    index: int  # position of the document in its file
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def api_version(self) -> str:
        return str(self.doc.get("apiVersion", ""))

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def name(self) -> str:
        return str((self.doc.get("metadata") or {}).get("name", ""))

    @property
    def namespace(self) -> str | None:
        return (self.doc.get("metadata") or {}).get("namespace")

    @property
    def label(self) -> str:
        return f"{shown_path(self.path)}[{self.index}] {self.kind}/{self.name}"

    def get(self, *keys: str | int, default: Any = None) -> Any:
        """Nested lookup: ``m.get("spec", "predictor", "timeout")``."""
        node: Any = self.doc
        for key in keys:
            in_dict = isinstance(node, dict) and key in node
            in_list = isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node)
            if not (in_dict or in_list):
                return default
            node = node[key]
        return node


@dataclass(frozen=True)
class Problem:
    manifest: Manifest | None
    where: str  # a JSON-pointer-like path inside the document, or ""
    message: str
    file: Path | None = None

    def __str__(self) -> str:
        label = self.manifest.label if self.manifest else str(self.file or "")
        return f"{label}{' at ' + self.where if self.where else ''}: {self.message}"


def of_kind(manifests: Iterable[Manifest], kind: str, group: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m.kind == kind and (group is None or m.group == group)]


def dedupe(problems: Iterable[Problem]) -> list[Problem]:
    """The problems in order, each once (checks that walk every cluster find some twice)."""
    seen, out = set(), []
    for problem in problems:
        key = (problem.manifest.label if problem.manifest else "", problem.where, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


def load_manifests(paths: Iterable[str | Path]) -> tuple[list[Manifest], list[Problem]]:
    """All YAML documents under the paths (files, or folders searched for *.yaml / *.yml)."""
    manifests, problems = [], []
    for path in _yaml_files(paths):
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as e:
            problems.append(Problem(None, "", f"not valid YAML: {e}", file=path))
            continue
        for index, doc in enumerate(documents):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                problems.append(Problem(None, "", f"document {index} is not a mapping", file=path))
                continue
            manifests.append(Manifest(path.resolve(), index, doc))
    return manifests, problems


def _yaml_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            yield path

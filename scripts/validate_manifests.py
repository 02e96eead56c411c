"""Validate the Kubernetes manifests we ship, offline.

1. Schema: every document against the openAPIV3Schema of its served version in the real CRDs
   (KServe v0.20, Karmada v1.18; ``../shared/crds``), or, for core kinds, against the
   Kubernetes OpenAPI schemas bundled with ``kubernetes-validate``. Unknown fields are errors
   here (the API server would silently prune them, which is how typos ship).
2. Cross-checks the schemas cannot express: registered by ``scripts.checks_kserve`` and
   ``scripts.checks_karmada`` (timeouts against the TorchServe config, GPU limits, references
   between objects, placement and overrides, ...).

    python -m scripts.validate_manifests            # kserve/ and karmada/
    python -m scripts.validate_manifests path.yaml  # specific files or folders

Never reads the network. When the CRD folder is missing it says so and the CRD part fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DEFAULT_PATHS = (REPO_ROOT / "kserve", REPO_ROOT / "karmada")
# The Kubernetes version whose core schemas we validate against.
KUBERNETES_VERSION = "1.33"


# Where the team's workspace keeps the CRDs, for clones that do not sit next to shared/.
WORKSPACE_CRD_DIR = Path("/work/shared/crds")


def default_crd_dir() -> Path:
    """$WAN_CRD_DIR, else ../shared/crds next to the repo, else the workspace's shared/crds."""
    if os.environ.get("WAN_CRD_DIR"):
        return Path(os.environ["WAN_CRD_DIR"])
    beside = REPO_ROOT.parent / "shared" / "crds"
    return beside if beside.is_dir() or not WORKSPACE_CRD_DIR.is_dir() else WORKSPACE_CRD_DIR


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
        return f"{self.path.relative_to(REPO_ROOT) if self.path.is_relative_to(REPO_ROOT) else self.path}" \
               f"[{self.index}] {self.kind}/{self.name}"

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


# -- schemas ----------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Make a CRD structural schema reject unknown fields, as a linter should.

    The API server prunes unknown fields silently; here an object with declared
    ``properties`` gets ``additionalProperties: false`` unless it says
    ``x-kubernetes-preserve-unknown-fields``. ``metadata`` stays open (ObjectMeta is not
    spelled out in CRDs).
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable"):
        # OpenAPI's nullable has no JSON Schema keyword: allow null alongside the type.
        out = {"anyOf": [out, {"type": "null"}]}
    return out


class CrdSchemas:
    """openAPIV3Schema of every served version of every CRD under a folder."""

    def __init__(self, crd_dir: Path):
        self.crd_dir = crd_dir
        self.schemas: dict[tuple[str, str], dict] = {}  # (apiVersion, kind) -> schema
        self.scope: dict[tuple[str, str], str] = {}  # (apiVersion, kind) -> Namespaced | Cluster
        self.missing = not crd_dir.is_dir()
        if self.missing:
            return
        for path in sorted(crd_dir.rglob("*.yaml")):
            try:
                # The InferenceService CRD alone is ~1.9 MB: the C loader when available.
                documents = list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER))
            except yaml.YAMLError:
                continue  # not a CRD file (e.g. Karmada's templated APIService)
            for doc in documents:
                if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec.get("versions", []):
                    if not version.get("served", False):
                        continue
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schema = copy.deepcopy((version.get("schema") or {}).get("openAPIV3Schema") or {})
                    props = schema.setdefault("properties", {})
                    # metadata is ObjectMeta; CRDs leave it as a bare object.
                    props["metadata"] = {"type": "object"}
                    self.schemas[key] = _strict(schema)
                    self.scope[key] = spec.get("scope", "Namespaced")

    def knows(self, manifest: Manifest) -> bool:
        return (manifest.api_version, manifest.kind) in self.schemas

    def is_cluster_scoped(self, manifest: Manifest) -> bool:
        return self.scope.get((manifest.api_version, manifest.kind)) == "Cluster"

    @cached_property
    def groups(self) -> set[str]:
        return {api_version.rpartition("/")[0] for api_version, _ in self.schemas}

    def validate(self, manifest: Manifest) -> list[Problem]:
        schema = self.schemas[(manifest.api_version, manifest.kind)]
        validator = jsonschema.Draft7Validator(schema)
        return [
            Problem(manifest, "/" + "/".join(str(p) for p in error.absolute_path), error.message)
            for error in sorted(validator.iter_errors(manifest.doc), key=lambda e: list(map(str, e.absolute_path)))
        ]


def _validate_core(manifest: Manifest) -> list[Problem]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/" + "/".join(str(p) for p in e.path) if getattr(e, "path", None) else ""
        return [Problem(manifest, where, e.message)]
    except kubernetes_validate.SchemaNotFoundError:
        return [Problem(manifest, "", f"no schema for {manifest.api_version} {manifest.kind} "
                                      f"(not a core Kubernetes {KUBERNETES_VERSION} kind nor a known CRD)")]
    return []


def validate_schemas(manifests: list[Manifest], crds: CrdSchemas) -> list[Problem]:
    problems = []
    for manifest in manifests:
        if not manifest.api_version or not manifest.kind:
            problems.append(Problem(manifest, "", "apiVersion and kind are required"))
        elif not manifest.name:
            problems.append(Problem(manifest, "/metadata/name", "metadata.name is required"))
        elif crds.knows(manifest):
            problems.extend(crds.validate(manifest))
        elif manifest.group in crds.groups or manifest.group.endswith((".kserve.io", ".karmada.io")):
            problems.append(Problem(manifest, "/apiVersion",
                                    f"{manifest.api_version} {manifest.kind} is not served by the CRDs in "
                                    f"{crds.crd_dir}" + (" (the folder is missing)" if crds.missing else "")))
        else:
            problems.extend(_validate_core(manifest))
    return problems


# -- cross-checks -----------------------------------------------------------------------


@dataclass
class Context:
    """What the cross-checks may consult besides the manifests (all local files)."""

    crds: CrdSchemas
    repo_root: Path = REPO_ROOT
    extra: dict[str, Any] = field(default_factory=dict)


Check = Callable[[list[Manifest], Context], list[Problem]]


def registered_checks(manifests: list[Manifest] | None = None) -> list[Check]:
    """All cross-checks; given the manifests, Karmada's only when Karmada objects are among them
    (``kserve/`` alone is what a cluster without Karmada applies: nothing needs placing there)."""
    from scripts import checks_karmada, checks_kserve

    karmada = manifests is None or any(m.group.endswith(".karmada.io") for m in manifests)
    return [*checks_kserve.CHECKS, *(checks_karmada.CHECKS if karmada else [])]


def validate(paths: Iterable[str | Path] = DEFAULT_PATHS, crd_dir: Path | None = None,
             checks: list[Check] | None = None) -> list[Problem]:
    """Every problem found in the manifests under ``paths`` (empty list: all good)."""
    crds = CrdSchemas(crd_dir or default_crd_dir())
    manifests, problems = load_manifests(paths)
    if crds.missing:
        problems.append(Problem(None, "", f"CRD folder {crds.crd_dir} is missing: cannot validate KServe or "
                                          "Karmada objects (set WAN_CRD_DIR)", file=crds.crd_dir))
    problems.extend(validate_schemas(manifests, crds))
    context = Context(crds)
    for check in registered_checks(manifests) if checks is None else checks:
        problems.extend(check(manifests, context))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=[str(p) for p in DEFAULT_PATHS])
    parser.add_argument("--crd-dir", type=Path, help="folder of CRD YAMLs (default: ../shared/crds)")
    args = parser.parse_args(argv)
    problems = validate(args.paths, args.crd_dir)
    for problem in problems:
        print(problem)
    count = len(load_manifests(args.paths)[0])
    print(f"{count} manifests, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

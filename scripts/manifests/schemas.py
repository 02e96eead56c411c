"""Schemas: the upstream CRDs (found, parsed and cached once) and the Kubernetes core schemas
that ``kubernetes-validate`` bundles. Every document is validated against the schema of its
served version; unknown fields are errors here (the API server would prune them silently,
which is how typos ship).

The CRDs are not part of this repository: they are upstream files (KServe v0.20, Karmada v1.18,
CloudNativePG v1.30, KEDA v2.20). They come from ``--crds DIR``, else ``$WAN_CRD_DIR``, else
``../shared/crds`` beside the repository; ``missing_crds_help()`` says how to export them from
a cluster that has them installed.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from scripts.manifests.core import REPO_ROOT, Manifest, Problem

CRD_DIR_ENV = "WAN_CRD_DIR"
BESIDE_REPO = REPO_ROOT.parent / "shared" / "crds"
# The Kubernetes version whose core schemas we validate against.
KUBERNETES_VERSION = "1.33"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The CRDs the shipped manifests use, by the folder the validator reads them from.
NEEDED_CRDS = {
    "kserve": ("inferenceservices.serving.kserve.io", "servingruntimes.serving.kserve.io",
               "clusterservingruntimes.serving.kserve.io", "localmodelcaches.serving.kserve.io",
               "localmodelnodegroups.serving.kserve.io"),
    "karmada": ("propagationpolicies.policy.karmada.io", "clusterpropagationpolicies.policy.karmada.io",
                "overridepolicies.policy.karmada.io", "clusteroverridepolicies.policy.karmada.io",
                "resourceinterpretercustomizations.config.karmada.io", "resourcebindings.work.karmada.io"),
    "cnpg": ("clusters.postgresql.cnpg.io",),
    "keda": ("scaledobjects.keda.sh", "triggerauthentications.keda.sh"),
}


def find_crd_dir(explicit: str | Path | None = None) -> Path | None:
    """``explicit`` (the --crds option), else $WAN_CRD_DIR, else ../shared/crds beside the
    repository when it exists; None when none is given and none exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CRD_DIR_ENV):
        return Path(os.environ[CRD_DIR_ENV])
    return BESIDE_REPO if BESIDE_REPO.is_dir() else None


def missing_crds_help(looked_at: Path | None = None) -> str:
    """One line: where the CRDs were looked for and how to get them."""
    where = f"{looked_at} does not exist" if looked_at else f"no --crds DIR, no ${CRD_DIR_ENV}, no {BESIDE_REPO}"
    names = [name for group in NEEDED_CRDS.values() for name in group]
    return (f"upstream CRD schemas not found ({where}): from a cluster that has them, run "
            f"`kubectl get crd NAME -o yaml > DIR/NAME.yaml` for each of {', '.join(names)}; "
            f"then pass --crds DIR or set {CRD_DIR_ENV}=DIR")


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


@dataclass(eq=False)  # one per folder (load_crds): identity is equality, and it can key a cache
class CrdSchemas:
    """openAPIV3Schema of every served version of every CRD under a folder (use ``load_crds``)."""

    crd_dir: Path
    schemas: dict[tuple[str, str], dict] = field(default_factory=dict)  # (apiVersion, kind) -> schema
    scope: dict[tuple[str, str], str] = field(default_factory=dict)  # (apiVersion, kind) -> Namespaced | Cluster

    @property
    def missing(self) -> bool:
        return not self.crd_dir.is_dir()

    def knows(self, api_version: str, kind: str) -> bool:
        return (api_version, kind) in self.schemas

    def is_cluster_scoped(self, api_version: str, kind: str) -> bool:
        return self.scope.get((api_version, kind)) == "Cluster"

    @property
    def groups(self) -> set[str]:
        return {api_version.rpartition("/")[0] for api_version, _ in self.schemas}

    def validate(self, manifest: Manifest) -> list[Problem]:
        validator = _validator(self, manifest.api_version, manifest.kind)
        return [
            Problem(manifest, "/" + "/".join(str(p) for p in error.absolute_path), error.message)
            for error in sorted(validator.iter_errors(manifest.doc), key=lambda e: list(map(str, e.absolute_path)))
        ]


@cache
def _validator(crds: CrdSchemas, api_version: str, kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crds.schemas[(api_version, kind)])


@cache
def load_crds(crd_dir: Path) -> CrdSchemas:
    """The CRDs under ``crd_dir``, parsed once per process (the InferenceService CRD alone is
    ~1.9 MB of YAML). A missing folder gives an empty set whose ``missing`` is true."""
    crds = CrdSchemas(Path(crd_dir))
    if crds.missing:
        return crds
    for path in sorted(crds.crd_dir.rglob("*.yaml")):
        try:
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
                crds.schemas[key] = _strict(schema)
                crds.scope[key] = spec.get("scope", "Namespaced")
    return crds


def _validate_core(manifest: Manifest) -> list[Problem]:
    try:
        kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/" + "/".join(str(p) for p in e.path) if getattr(e, "path", None) else ""
        return [Problem(manifest, where, e.message)]
    except kubernetes_validate.SchemaNotFoundError:
        return [Problem(manifest, "", f"no schema for {manifest.api_version} {manifest.kind} "
                                      f"(not a core Kubernetes {KUBERNETES_VERSION} kind nor a known CRD)")]
    return []


# Groups whose kinds come from CRDs: never looked up among the core schemas.
CRD_GROUP_SUFFIXES = (".kserve.io", ".karmada.io", ".cnpg.io", "keda.sh")


def validate_schemas(manifests: list[Manifest], crds: CrdSchemas) -> list[Problem]:
    problems = []
    for manifest in manifests:
        if not manifest.api_version or not manifest.kind:
            problems.append(Problem(manifest, "", "apiVersion and kind are required"))
        elif not manifest.name:
            problems.append(Problem(manifest, "/metadata/name", "metadata.name is required"))
        elif crds.knows(manifest.api_version, manifest.kind):
            problems.extend(crds.validate(manifest))
        elif manifest.group in crds.groups or manifest.group.endswith(CRD_GROUP_SUFFIXES):
            problems.append(Problem(manifest, "/apiVersion",
                                    f"{manifest.api_version} {manifest.kind} is not served by the CRDs in "
                                    f"{crds.crd_dir}" + (" (the folder is missing)" if crds.missing else "")))
        else:
            problems.extend(_validate_core(manifest))
    return problems

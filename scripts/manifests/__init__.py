"""Validate the Kubernetes manifests we ship, offline, before ``kubectl apply``.

1. Schema: every document against the openAPIV3Schema of its served version in the upstream CRDs
   (``schemas``), or, for core kinds, against the Kubernetes OpenAPI schemas. Unknown fields are
   errors here (the API server would silently prune them, which is how typos ship).
2. Cross-checks the schemas cannot express (``kserve``, ``jobs``, ``karmada.checks``): timeouts
   against the TorchServe config, the job service's wiring, GPU limits, references between objects, placement and overrides, ...

    python -m scripts.manifests                  # kserve/, karmada/ and jobs/deploy/
    python -m scripts.manifests --crds DIR path  # specific files or folders

Never reads the network. Layers, each importing only those before it:
core <- schemas <- kube <- torchserve, karmada.{clusters, lua, world, overrides} <- context
<- kserve, jobs, karmada.checks <- this registry and the CLI; security (checkov) <- core, kube.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from scripts.manifests import jobs, kserve
from scripts.manifests.context import Check, Context
from scripts.manifests.core import DEFAULT_PATHS, REPO_ROOT, Manifest, Problem, load_manifests
from scripts.manifests.karmada import checks as karmada_checks
from scripts.manifests.schemas import CrdSchemas, find_crd_dir, load_crds, missing_crds_help, validate_schemas

CHECKS: tuple[Check, ...] = (*kserve.CHECKS, *jobs.CHECKS, *karmada_checks.CHECKS)

__all__ = ["CHECKS", "DEFAULT_PATHS", "REPO_ROOT", "Check", "Context", "CrdSchemas", "Manifest", "Problem",
           "find_crd_dir", "load_crds", "load_manifests", "missing_crds_help", "registered_checks", "validate",
           "validate_manifests"]


def registered_checks(manifests: list[Manifest]) -> list[Check]:
    """The cross-checks that apply: Karmada's only when Karmada objects are among the manifests
    (``kserve/`` alone is what a cluster without Karmada applies: nothing needs placing there)."""
    karmada = any(m.group.endswith(".karmada.io") for m in manifests)
    return [*kserve.CHECKS, *jobs.CHECKS, *(karmada_checks.CHECKS if karmada else [])]


def validate_manifests(manifests: list[Manifest], crds: CrdSchemas,
                       checks: Iterable[Check] | None = None) -> list[Problem]:
    """Every problem in manifests already loaded: schemas, then the cross-checks (default: those
    that apply, ``registered_checks``)."""
    problems = []
    if crds.missing:
        problems.append(Problem(None, "", missing_crds_help(crds.crd_dir), file=crds.crd_dir))
    problems.extend(validate_schemas(manifests, crds))
    context = Context(manifests, crds)
    for check in registered_checks(manifests) if checks is None else checks:
        problems.extend(check(context))
    return problems


def validate(paths: Iterable[str | Path] = DEFAULT_PATHS, crds: CrdSchemas | None = None,
             checks: Iterable[Check] | None = None) -> list[Problem]:
    """Every problem found in the manifests under ``paths`` (empty list: all good). ``crds``
    defaults to ``load_crds(find_crd_dir())``; with no CRD folder anywhere that is one problem
    saying how to get them."""
    if crds is None:
        found = find_crd_dir()
        crds = load_crds(found if found is not None else Path("<no CRD folder>"))
    manifests, problems = load_manifests(paths)
    return problems + validate_manifests(manifests, crds, checks)

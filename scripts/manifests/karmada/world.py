"""The shipped manifests as Karmada would see them in its API server (``World``): which policy
claims an object, which clusters its placement may choose, where its dependencies get, and what
our interpreter says about it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from scripts.manifests.core import Manifest
from scripts.manifests.karmada.clusters import CLUSTERS, Cluster, cluster_matches, label_selector_matches, untolerated
from scripts.manifests.karmada.lua import KarmadaLua, LuaConversionError, LuaScriptError
from scripts.manifests.schemas import CrdSchemas

RIC = ("config.karmada.io/v1alpha1", "ResourceInterpreterCustomization")
POLICY_GROUP = "policy.karmada.io/v1alpha1"
PROPAGATION_KINDS = ("PropagationPolicy", "ClusterPropagationPolicy")
OVERRIDE_KINDS = ("OverridePolicy", "ClusterOverridePolicy")
# Core kinds that are cluster-scoped (everything else we might ship from core groups is namespaced).
CLUSTER_SCOPED_CORE_KINDS = {
    ("v1", "Namespace"), ("v1", "PersistentVolume"), ("v1", "Node"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"), ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("storage.k8s.io/v1", "StorageClass"), ("scheduling.k8s.io/v1", "PriorityClass"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"),
}


def is_namespaced_policy(policy: Manifest) -> bool:
    return policy.kind in ("PropagationPolicy", "OverridePolicy")


def selector_matches(selector: dict[str, Any], obj: Manifest, policy: Manifest) -> bool:
    """Does one resourceSelector of ``policy`` select ``obj``?"""
    if selector.get("apiVersion") != obj.api_version or selector.get("kind") != obj.kind:
        return False
    namespace = selector.get("namespace")
    if is_namespaced_policy(policy) and obj.namespace != policy.namespace:
        return False  # a namespaced policy sees its own namespace only
    if namespace and namespace != (obj.namespace or ""):
        return False
    if selector.get("name"):
        return selector["name"] == obj.name
    if selector.get("labelSelector") is not None:
        return label_selector_matches(selector["labelSelector"], (obj.doc.get("metadata") or {}).get("labels"))
    return True


def selector_precision(selector: dict[str, Any]) -> int:
    """Karmada's implicit priority: by name > by labelSelector > by kind."""
    if selector.get("name"):
        return 3
    if selector.get("labelSelector") is not None:
        return 2
    return 1


def selection_precision(policy: Manifest, obj: Manifest) -> int:
    """0 when the policy does not select ``obj``, else the best precision of its matching selectors."""
    return max((selector_precision(s) for s in policy.get("spec", "resourceSelectors", default=[]) or []
                if isinstance(s, dict) and selector_matches(s, obj, policy)), default=0)


def describe(obj: Manifest) -> str:
    where = f"{obj.namespace}/" if obj.namespace else ""
    return f"{obj.kind} {where}{obj.name}"


@dataclass
class Interpretation:
    replicas: int | None = None
    requirement: dict[str, Any] | None = None
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (customization, message)


@dataclass
class World:
    """The shipped manifests as Karmada would see them in its API server."""

    manifests: list[Manifest]
    crds: CrdSchemas
    clusters: tuple[Cluster, ...] = CLUSTERS
    _interpretations: dict[tuple[Path, int], Interpretation] = field(default_factory=dict, repr=False)

    @property
    def policies(self) -> list[Manifest]:
        return [m for m in self.manifests if m.api_version == POLICY_GROUP and m.kind in PROPAGATION_KINDS]

    @property
    def overrides(self) -> list[Manifest]:
        return [m for m in self.manifests if m.api_version == POLICY_GROUP and m.kind in OVERRIDE_KINDS]

    @property
    def interpreters(self) -> list[Manifest]:
        return [m for m in self.manifests if (m.api_version, m.kind) == RIC]

    @property
    def templates(self) -> list[Manifest]:
        """Resource templates: what the policies place (everything that is not Karmada config)."""
        return [m for m in self.manifests
                if not m.api_version.endswith(".karmada.io/v1alpha1") and m.api_version and m.kind]

    def find(self, api_version: str, kind: str, namespace: str | None, name: str) -> Manifest | None:
        for m in self.templates:
            if (m.api_version, m.kind, m.name) == (api_version, kind, name) and (m.namespace or None) == (
                    namespace or None):
                return m
        return None

    @cached_property
    def lua(self) -> KarmadaLua:
        """One Lua runtime for every script run against this world (building one takes a while)."""
        return KarmadaLua()

    def cluster(self, name: str) -> Cluster | None:
        return next((c for c in self.clusters if c.name == name), None)

    def claim(self, obj: Manifest) -> tuple[Manifest | None, list[Manifest]]:
        """The (Cluster)PropagationPolicy that claims ``obj``, and the policies tied with it."""
        def ranked(candidates: list[Manifest]) -> list[tuple[tuple[int, int], Manifest]]:
            out = []
            for policy in candidates:
                precision = selection_precision(policy, obj)
                if precision:
                    out.append(((int(policy.get("spec", "priority", default=0) or 0), precision), policy))
            return sorted(out, key=lambda item: (-item[0][0], -item[0][1], item[1].name))

        namespaced = [p for p in self.policies if p.kind == "PropagationPolicy"]
        clustered = [p for p in self.policies if p.kind == "ClusterPropagationPolicy"]
        for group in ((namespaced, clustered) if obj.namespace else (clustered,)):
            ranking = ranked(group)
            if ranking:
                best_rank = ranking[0][0]
                return ranking[0][1], [p for rank, p in ranking[1:] if rank == best_rank]
        return None, []

    def placement_groups(self, policy: Manifest) -> list[tuple[str, str, dict[str, Any]]]:
        """(path, name, affinity) of every cluster group a placement may use."""
        placement = policy.get("spec", "placement", default={}) or {}
        groups = []
        terms = placement.get("clusterAffinities")
        if terms:
            for i, term in enumerate(terms):
                primary = {k: v for k, v in term.items() if k not in ("affinityName", "overflowAffinities")}
                groups.append((f"/spec/placement/clusterAffinities/{i}", term.get("affinityName", ""), primary))
                for j, overflow in enumerate(term.get("overflowAffinities") or []):
                    affinity = {k: v for k, v in overflow.items() if k != "affinityName"}
                    groups.append((f"/spec/placement/clusterAffinities/{i}/overflowAffinities/{j}",
                                   overflow.get("affinityName", ""), affinity))
        elif placement.get("clusterAffinity") is not None:
            groups.append(("/spec/placement/clusterAffinity", "clusterAffinity", placement["clusterAffinity"]))
        else:
            groups.append(("/spec/placement", "(any cluster)", {}))
        return groups

    def group_clusters(self, policy: Manifest, affinity: dict[str, Any]) -> list[Cluster]:
        tolerations = policy.get("spec", "placement", "clusterTolerations", default=[]) or []
        return [c for c in self.clusters if cluster_matches(affinity, c) and not untolerated(c.taints, tolerations)]

    def choosable(self, policy: Manifest | None) -> set[str]:
        """Every cluster the policy's placement may ever put the object on."""
        if policy is None:
            return set()
        return {c.name for _, _, affinity in self.placement_groups(policy)
                for c in self.group_clusters(policy, affinity)}

    def reaches(self, obj: Manifest, cluster: str, carried_by: Manifest | None = None) -> bool:
        """Will ``obj`` be in ``cluster``: placed there by its own policy, or carried there as a
        dependency of an object whose policy has propagateDeps?"""
        policy, _ = self.claim(obj)
        if cluster in self.choosable(policy):
            return True
        if carried_by is not None:
            carrier, _ = self.claim(carried_by)
            if carrier is not None and carrier.get("spec", "propagateDeps") and cluster in self.choosable(carrier):
                return True
        return False

    def interpreter_for(self, api_version: str, kind: str) -> Manifest | None:
        return next((m for m in self.interpreters if m.get("spec", "target", "apiVersion") == api_version
                     and m.get("spec", "target", "kind") == kind), None)

    def script(self, api_version: str, kind: str, customization: str) -> str | None:
        ric = self.interpreter_for(api_version, kind)
        return ric.get("spec", "customizations", customization, "luaScript") if ric else None

    def interpret(self, obj: Manifest) -> Interpretation:
        """Runs GetReplicas and GetDependencies on a shipped object, as Karmada would (once per object)."""
        key = (obj.path, obj.index)
        if key not in self._interpretations:
            self._interpretations[key] = self._run_interpreter(obj)
        return self._interpretations[key]

    def _run_interpreter(self, obj: Manifest) -> Interpretation:
        result = Interpretation()
        lua = self.lua
        script = self.script(obj.api_version, obj.kind, "replicaResource")
        if script:
            try:
                call = lua.call(script, "GetReplicas", copy.deepcopy(obj.doc))
                replicas, requirement = call.values
                if not isinstance(replicas, (int, float)) or isinstance(replicas, bool):
                    raise LuaScriptError(f"GetReplicas returned {replicas!r} as the replica count, not a number")
                result.replicas = int(replicas)
                if requirement is not None:
                    result.requirement = lua.from_lua(requirement, struct=True)
            except (LuaScriptError, LuaConversionError) as e:
                result.errors.append(("replicaResource", str(e)))
        script = self.script(obj.api_version, obj.kind, "dependencyInterpretation")
        if script:
            try:
                call = lua.call(script, "GetDependencies", copy.deepcopy(obj.doc))
                dependencies = lua.from_lua(call.values[0], struct=False) if call.values[0] is not None else []
                if not isinstance(dependencies, list):
                    raise LuaScriptError("GetDependencies must return a list")
                result.dependencies = dependencies
            except (LuaScriptError, LuaConversionError) as e:
                result.errors.append(("dependencyInterpretation", str(e)))
        return result

"""Cross-checks for the Karmada manifests: what the CRD schemas cannot say about placement,
overrides and our ResourceInterpreterCustomization. Each reads ``context.world`` (the manifests
as Karmada sees them) and never a cluster or the network.

Placement validation follows the karmada-webhook rules for PropagationPolicy (overflowAffinities
need Divided scheduling with dynamic weights or Aggregated division, application failover needs
propagateDeps, ...).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

from scripts.manifests.context import Context
from scripts.manifests.core import Manifest, Problem, dedupe
from scripts.manifests.karmada.clusters import Cluster, cluster_matches, taint_text, untolerated
from scripts.manifests.karmada.lua import (
    ENTRY_POINTS,
    OPTIONAL_ENTRY_POINTS,
    LuaConversionError,
    LuaScriptError,
    lua_forbidden_references,
)
from scripts.manifests.karmada.overrides import Image, effective, override_rules
from scripts.manifests.karmada.world import (
    CLUSTER_SCOPED_CORE_KINDS,
    World,
    describe,
    is_namespaced_policy,
    selection_precision,
    selector_matches,
)
from scripts.manifests.kube import (
    CLUSTER_SERVING_RUNTIME,
    INFERENCE_SERVICE,
    SERVING_RUNTIME,
    find_runtime,
    is_extended_resource_name,
    is_qualified_name,
    named_container,
    render_predictor_pod,
)
from scripts.manifests.schemas import validate_schemas

S3_SECRET_ANNOTATION = "wan.serving/s3-credentials-secret"
DEFAULT_S3_SECRET = "wan-s3-credentials"
S3_ENDPOINT_ANNOTATION = "serving.kserve.io/s3-endpoint"
KSERVE_DEFAULT_S3_ENDPOINT = "s3.amazonaws.com"


def _selector_text(selector: dict[str, Any], policy: Manifest) -> str:
    namespace = selector.get("namespace") or (policy.namespace if is_namespaced_policy(policy) else "")
    what = f"{selector.get('apiVersion')} {selector.get('kind')}"
    if selector.get("name"):
        return f"{what} {namespace + '/' if namespace else ''}{selector['name']}"
    if selector.get("labelSelector") is not None:
        return f"{what} with labels {json.dumps(selector['labelSelector'], sort_keys=True)}" + (
            f" in namespace {namespace}" if namespace else "")
    return f"every {what}" + (f" in namespace {namespace}" if namespace else "")


def _scope(world: World, api_version: str, kind: str) -> str | None:
    """Namespaced | Cluster | None (unknown kind)."""
    if world.crds.knows(api_version, kind):
        return "Cluster" if world.crds.is_cluster_scoped(api_version, kind) else "Namespaced"
    group = api_version.rpartition("/")[0]
    if "." not in group or group.endswith(".k8s.io"):  # core groups: "", apps, batch, *.k8s.io
        return "Cluster" if (api_version, kind) in CLUSTER_SCOPED_CORE_KINDS else "Namespaced"
    return None


def check_policy_selectors(context: Context) -> list[Problem]:
    """Every resourceSelector of every (Cluster)Propagation/OverridePolicy selects an object we ship,
    in a namespace the policy can see; no object is claimed by two equally ranked policies."""
    world = context.world
    problems = []
    for policy in [*world.policies, *world.overrides]:
        selectors = policy.get("spec", "resourceSelectors", default=[]) or []
        for i, selector in enumerate(selectors):
            where = f"/spec/resourceSelectors/{i}"
            if is_namespaced_policy(policy) and selector.get("namespace") not in (None, "", policy.namespace):
                problems.append(Problem(policy, where, f"a {policy.kind} in namespace {policy.namespace} cannot "
                                                       f"select objects in namespace {selector['namespace']}"))
                continue
            if not any(selector_matches(selector, m, policy) for m in world.templates):
                problems.append(Problem(policy, where, f"selects nothing we ship: no {_selector_text(selector, policy)}"
                                                       f" in the manifests (kserve/, karmada/)"))
    for obj in world.templates:
        winner, ties = world.claim(obj)
        for tie in ties:
            problems.append(Problem(tie, "/spec/resourceSelectors",
                                    f"{describe(obj)} is selected with the same priority by {winner.kind} "
                                    f"{winner.name}: only the alphabetically first one places it; give one a "
                                    f"higher spec.priority or a narrower selector"))
    return problems


def check_policy_scope(context: Context) -> list[Problem]:
    """PropagationPolicy/OverridePolicy select namespaced kinds, ClusterPropagationPolicy/
    ClusterOverridePolicy select cluster-scoped kinds (one policy kind per scope, so a namespaced
    object is never claimed from two scopes), and every selected kind is known."""
    world = context.world
    problems = []
    for policy in [*world.policies, *world.overrides]:
        for i, selector in enumerate(policy.get("spec", "resourceSelectors", default=[]) or []):
            where = f"/spec/resourceSelectors/{i}"
            api_version, kind = selector.get("apiVersion", ""), selector.get("kind", "")
            scope = _scope(world, api_version, kind)
            if scope is None:
                problems.append(Problem(policy, where, f"unknown kind {api_version} {kind}: no CRD in "
                                                       f"{world.crds.crd_dir} serves it and it is not a core kind"))
            elif is_namespaced_policy(policy) and scope == "Cluster":
                problems.append(Problem(policy, where, f"{kind} is cluster-scoped: a {policy.kind} cannot select "
                                                       f"it, use a Cluster{policy.kind}"))
            elif not is_namespaced_policy(policy) and scope == "Namespaced":
                problems.append(Problem(policy, where, f"{kind} is namespaced: select it with a "
                                                       f"{policy.kind.removeprefix('Cluster')} in its namespace "
                                                       f"(Cluster* policies are for cluster-scoped kinds here)"))
    return problems


def _is_divided(policy: Manifest) -> bool:
    return policy.get("spec", "placement", "replicaScheduling", "replicaSchedulingType") == "Divided"


def check_placements(context: Context) -> list[Problem]:
    """What karmada-webhook would reject, and placements that can never be satisfied by our
    clusters: every cluster group matches at least one cluster, overflowAffinities come with
    capacity-aware Divided scheduling, application failover comes with propagateDeps and with
    a health interpreter, Divided scheduling comes with replicas."""
    world = context.world
    problems = []
    inventory = ", ".join(f"{c.name} {json.dumps(c.labels, sort_keys=True)}" for c in world.clusters)
    for policy in world.policies:
        placement = policy.get("spec", "placement", default={}) or {}
        terms = placement.get("clusterAffinities") or []
        scheduling = placement.get("replicaScheduling") or {}
        if placement.get("clusterAffinity") is not None and placement.get("clusterAffinities") is not None:
            problems.append(Problem(policy, "/spec/placement", "clusterAffinities cannot co-exist with "
                                                               "clusterAffinity"))
        names = [t.get("affinityName", "") for t in terms]
        for i, name in enumerate(names):
            if not is_qualified_name(name):
                problems.append(Problem(policy, f"/spec/placement/clusterAffinities/{i}/affinityName",
                                        f"{name!r} is not a valid affinity name"))
        if len(set(names)) != len(names):
            problems.append(Problem(policy, "/spec/placement/clusterAffinities",
                                    "each affinity term in a policy must have a unique name"))
        for i, term in enumerate(terms):
            overflows = term.get("overflowAffinities") or []
            if not overflows:
                continue
            where = f"/spec/placement/clusterAffinities/{i}/overflowAffinities"
            if not any(term.get(k) for k in ("clusterNames", "labelSelector", "fieldSelector", "exclude")):
                problems.append(Problem(policy, where, "overflowAffinities can only be used together with the "
                                                       "inline ClusterAffinity (the primary group)"))
            overflow_names = [o.get("affinityName") for o in overflows]
            if len(set(overflow_names)) != len(overflow_names) or term.get("affinityName") in overflow_names:
                problems.append(Problem(policy, where, "overflow affinity name must be unique and must not "
                                                       "duplicate the primary group's affinityName"))
            dynamic = (scheduling.get("weightPreference") or {}).get("dynamicWeight")
            if not (scheduling.get("replicaSchedulingType") == "Divided"
                    and (scheduling.get("replicaDivisionPreference") == "Aggregated" or dynamic)):
                problems.append(Problem(policy, where, "overflowAffinities can only be used together with "
                                                       "dynamic weight or aggregated scheduling (replicaScheduling:"
                                                       " Divided with dynamicWeight: AvailableReplicas or "
                                                       "replicaDivisionPreference: Aggregated)"))
        for path, name, affinity in world.placement_groups(policy):
            for j, cluster_name in enumerate(affinity.get("clusterNames") or []):
                if world.cluster(cluster_name) is None:
                    problems.append(Problem(policy, f"{path}/clusterNames/{j}",
                                            f"unknown cluster {cluster_name!r} (clusters: "
                                            f"{', '.join(c.name for c in world.clusters)})"))
            if not world.group_clusters(policy, affinity):
                problems.append(Problem(policy, path, f"cluster group {name!r} matches no cluster it tolerates "
                                                      f"(clusters: {inventory})"))
        spread = placement.get("spreadConstraints") or []
        by_field = [c.get("spreadByField") for c in spread if c.get("spreadByField")]
        for i, constraint in enumerate(spread):
            if constraint.get("spreadByField") and constraint.get("spreadByLabel"):
                problems.append(Problem(policy, f"/spec/placement/spreadConstraints/{i}",
                                        "spreadByLabel should not co-exist with spreadByField"))
            if constraint.get("maxGroups", 0) and constraint.get("maxGroups", 0) < constraint.get("minGroups", 0):
                problems.append(Problem(policy, f"/spec/placement/spreadConstraints/{i}",
                                        "maxGroups lower than minGroups is not allowed"))
        if len(set(by_field)) != len(by_field):
            problems.append(Problem(policy, "/spec/placement/spreadConstraints",
                                    "multiple spread constraints on the same field are not allowed"))
        if by_field and "cluster" not in by_field:
            problems.append(Problem(policy, "/spec/placement/spreadConstraints", "the cluster spread constraint "
                                    "must be enabled in one of the constraints in case of SpreadByField is enabled"))
        application = policy.get("spec", "failover", "application")
        if application is not None:
            if not policy.get("spec", "propagateDeps"):
                problems.append(Problem(policy, "/spec/propagateDeps", "application failover is set, propagateDeps "
                                                                       "must be true"))
            if application.get("purgeMode") == "Graciously" and application.get("gracePeriodSeconds") is None:
                problems.append(Problem(policy, "/spec/failover/application/gracePeriodSeconds",
                                        "should not be empty when purgeMode is Graciously"))
        selected = [m for m in world.templates if world.claim(m)[0] is policy]
        for kind_key in sorted({(m.api_version, m.kind) for m in selected}):
            if not world.crds.knows(*kind_key):
                continue
            if application is not None and not world.script(*kind_key, "healthInterpretation"):
                problems.append(Problem(policy, "/spec/failover/application",
                                        f"application failover never fires for {kind_key[1]}: without a "
                                        f"healthInterpretation Karmada reports it always Healthy"))
            if _is_divided(policy) and not world.script(*kind_key, "replicaResource"):
                problems.append(Problem(policy, "/spec/placement/replicaScheduling",
                                        f"Divided scheduling of {kind_key[1]} needs a replicaResource "
                                        f"interpreter: without one Karmada sees 0 replicas and divides nothing"))
    return problems


def check_override_targets(context: Context) -> list[Problem]:
    """Every override rule targets clusters we have, and clusters where the objects it overrides
    can actually be placed; every overridden object is placed by some policy."""
    world = context.world
    problems = []
    for policy in world.overrides:
        selected = [m for m in world.templates if selection_precision(policy, m)]
        rules = policy.get("spec", "overrideRules") or []
        if not rules and policy.get("spec", "overriders") is None:
            problems.append(Problem(policy, "/spec/overrideRules", "no override rules: the policy does nothing"))
        for obj in selected:
            if world.claim(obj)[0] is None:
                problems.append(Problem(policy, "/spec/resourceSelectors", f"overrides {describe(obj)}, which no "
                                                                           f"PropagationPolicy places"))
        for i, rule in enumerate(rules):
            where = f"/spec/overrideRules/{i}/targetCluster"
            target = rule.get("targetCluster")
            if target is None:
                continue
            for j, cluster_name in enumerate(target.get("clusterNames") or []):
                if world.cluster(cluster_name) is None:
                    problems.append(Problem(policy, f"{where}/clusterNames/{j}", f"unknown cluster {cluster_name!r}"))
            targets = {c.name for c in world.clusters if cluster_matches(target, c)}
            if not targets:
                problems.append(Problem(policy, where, "targetCluster matches no cluster (clusters: " + ", ".join(
                    f"{c.name} {json.dumps(c.labels, sort_keys=True)}" for c in world.clusters) + ")"))
                continue
            for obj in selected:
                claim, _ = world.claim(obj)
                if claim is None:
                    continue
                choosable = world.choosable(claim)
                if not targets & choosable:
                    problems.append(Problem(policy, where, f"targets {', '.join(sorted(targets))}, where "
                                                           f"{claim.kind} {claim.name} never places {describe(obj)} "
                                                           f"(it can place it on: "
                                                           f"{', '.join(sorted(choosable)) or 'no cluster'})"))
                for j, cluster_name in enumerate(target.get("clusterNames") or []):
                    if world.cluster(cluster_name) is not None and cluster_name not in choosable:
                        problems.append(Problem(policy, f"{where}/clusterNames/{j}",
                                                f"{claim.kind} {claim.name} never places {describe(obj)} on "
                                                f"{cluster_name}"))
    return problems


def check_effective_objects(context: Context) -> list[Problem]:
    """Applies the overrides of every placed object for every cluster it can land on, as Karmada
    would: overrides that fail (missing path, no image at the predicate path) or do nothing are
    reported, and the overridden object must still pass its schema."""
    world = context.world
    problems: list[Problem] = []
    for obj in world.templates:
        claim, _ = world.claim(obj)
        for name in sorted(world.choosable(claim)):
            cluster = world.cluster(name)
            doc, override_problems = effective(world, obj, cluster)
            problems.extend(override_problems)
            if doc == obj.doc or world.crds.missing:
                continue
            touched = [p for p, _, _ in override_rules(world, obj, cluster)]
            for problem in validate_schemas([Manifest(obj.path, obj.index, doc)], world.crds):
                problems.append(Problem(touched[0] if touched else obj, problem.where,
                                        f"{describe(obj)} after the overrides for {cluster.name} "
                                        f"({', '.join(sorted({p.name for p in touched}))}) fails its schema: "
                                        f"{problem.message}"))
    return dedupe(problems)


def check_interpreters(context: Context) -> list[Problem]:
    """Each ResourceInterpreterCustomization targets a kind we ship (once), the InferenceService one
    provides every customization Karmada needs, and every script compiles, defines its entry
    point in Karmada's sandbox and uses nothing the sandbox lacks."""
    world = context.world
    problems = []
    seen: dict[tuple[str, str], Manifest] = {}
    for ric in world.interpreters:
        target = (ric.get("spec", "target", "apiVersion", default=""), ric.get("spec", "target", "kind", default=""))
        if target in seen:
            problems.append(Problem(ric, "/spec/target", f"{target[1]} is already interpreted by "
                                                         f"{seen[target].name}: Karmada would use only one"))
        seen[target] = ric
        if not any((m.api_version, m.kind) == target for m in world.templates):
            problems.append(Problem(ric, "/spec/target", f"targets {target[0]} {target[1]}, which we do not ship"))
        if target[1] == INFERENCE_SERVICE[1] and target != INFERENCE_SERVICE:
            problems.append(Problem(ric, "/spec/target", f"our InferenceServices are {INFERENCE_SERVICE[0]}, "
                                                         f"not {target[0]}"))
        customizations = ric.get("spec", "customizations", default={}) or {}
        if target == INFERENCE_SERVICE:
            for name, entry in ENTRY_POINTS.items():
                if name not in customizations:
                    problems.append(Problem(ric, f"/spec/customizations/{name}",
                                            f"missing: an InferenceService needs {name} ({entry})"))
        for name, entry in {**ENTRY_POINTS, **OPTIONAL_ENTRY_POINTS}.items():
            script = (customizations.get(name) or {}).get("luaScript")
            if script is None:
                continue
            where = f"/spec/customizations/{name}/luaScript"
            forbidden = lua_forbidden_references(script)
            if forbidden:
                problems.append(Problem(ric, where, f"uses {', '.join(forbidden)}, which Karmada's Lua sandbox "
                                                    f"does not offer (or runs differently in gopher-lua)"))
            error = world.lua.defines(script, entry)
            if error:
                problems.append(Problem(ric, where, f"does not load in a Lua 5.1 sandbox like Karmada's: {error}"))
    return problems


def _requirement_schema(world: World) -> dict[str, Any] | None:
    schema = world.crds.schemas.get(("work.karmada.io/v1alpha2", "ResourceBinding"))
    return (((schema or {}).get("properties") or {}).get("spec") or {}).get("properties", {}).get(
        "replicaRequirements")


def _dependency_problems(world: World, ric: Manifest, obj: Manifest, dependencies: list[Any]) -> list[Problem]:
    problems = []
    where = "/spec/customizations/dependencyInterpretation/luaScript"
    claim, _ = world.claim(obj)
    for dep in dependencies:
        if not isinstance(dep, dict) or not isinstance(dep.get("apiVersion"), str) or not isinstance(
                dep.get("kind"), str) or not (dep.get("name") or dep.get("labelSelector")):
            problems.append(Problem(ric, where, f"GetDependencies({describe(obj)}) returned {dep!r}: Karmada needs "
                                                f"apiVersion, kind and a name or labelSelector"))
            continue
        if (dep.get("namespace") or None) != (obj.namespace or None):
            problems.append(Problem(ric, where, f"GetDependencies({describe(obj)}) returned {dep['kind']} "
                                                f"{dep.get('name')} in namespace {dep.get('namespace')!r}: Karmada "
                                                f"propagates dependencies from the object's own namespace only"))
            continue
        found = world.find(dep["apiVersion"], dep["kind"], dep.get("namespace"), dep.get("name", ""))
        if found is None and (dep["apiVersion"], dep["kind"]) == SERVING_RUNTIME:
            fallback = world.find(*CLUSTER_SERVING_RUNTIME, None, dep["name"])
            if fallback is not None:
                continue  # KServe falls back to the ClusterServingRuntime; placed by its own policy
        if found is None:
            problems.append(Problem(ric, where, f"{describe(obj)} depends on {dep['kind']} "
                                                f"{dep.get('namespace')}/{dep.get('name')}, which we do not ship"))
            continue
        for cluster in sorted(world.choosable(claim)):
            if not world.reaches(found, cluster, carried_by=obj):
                problems.append(Problem(ric, where, f"{describe(obj)} may run in {cluster} but its dependency "
                                                    f"{describe(found)} never gets there (no policy places it there "
                                                    f"and propagateDeps is off)"))
    return problems


def check_interpreted_services(context: Context) -> list[Problem]:
    """Runs the interpreter on every InferenceService we ship: replicas >= 1 with valid GPU
    requirements, ReviseReplica results that pass the CRD schema for every share, and
    dependencies we ship that reach every cluster the service can land on."""

    world = context.world
    ric = world.interpreter_for(*INFERENCE_SERVICE)
    problems: list[Problem] = []
    for obj in world.templates:
        if (obj.api_version, obj.kind) != INFERENCE_SERVICE:
            continue
        claim, _ = world.claim(obj)
        if claim is None:
            problems.append(Problem(obj, "", f"no PropagationPolicy places {describe(obj)}"))
            continue
        if ric is None:
            problems.append(Problem(claim, "/spec/resourceSelectors", f"places {describe(obj)} without a "
                                                                      f"ResourceInterpreterCustomization for it"))
            continue
        result = world.interpret(obj)
        for customization, error in result.errors:
            problems.append(Problem(ric, f"/spec/customizations/{customization}/luaScript",
                                    f"fails on {describe(obj)}: {error}"))
        predictor = obj.get("spec", "predictor", default={}) or {}
        if result.replicas is not None:
            if result.replicas < 1:
                problems.append(Problem(ric, "/spec/customizations/replicaResource/luaScript",
                                        f"GetReplicas({describe(obj)}) = {result.replicas}: Karmada drops clusters "
                                        f"with 0 replicas"))
            if _is_divided(claim) and not isinstance(predictor.get("maxReplicas"), int):
                problems.append(Problem(obj, "/spec/predictor/maxReplicas",
                                        f"{claim.name} divides this service's peak between clusters: set "
                                        f"maxReplicas (without it the peak counts as max(minReplicas, 1) and each "
                                        f"cluster gets that many at most)"))
        schema = _requirement_schema(world)
        if result.requirement is not None and schema is not None:
            for error in jsonschema.Draft7Validator(schema).iter_errors(result.requirement):
                problems.append(Problem(ric, "/spec/customizations/replicaResource/luaScript",
                                        f"GetReplicas({describe(obj)}) requirement is not a ReplicaRequirements: "
                                        f"{error.message}"))
        limits = ((predictor.get("model") or {}).get("resources") or {}).get("limits") or {}
        requested = (result.requirement or {}).get("resourceRequest") or {}
        for name in limits:
            if is_extended_resource_name(name) and name not in requested:
                problems.append(Problem(ric, "/spec/customizations/replicaResource/luaScript",
                                        f"GetReplicas({describe(obj)}) does not request {name}: Karmada would "
                                        f"place replicas on clusters without free {name}"))
        script = world.script(*INFERENCE_SERVICE, "replicaRevision")
        if script and result.replicas:
            for share in range(1, min(result.replicas, 16) + 1):
                try:
                    call = world.lua.call(script, "ReviseReplica", copy.deepcopy(obj.doc), share)
                    revised = world.lua.from_lua(call.values[0], struct=True)
                except (LuaScriptError, LuaConversionError) as e:
                    problems.append(Problem(ric, "/spec/customizations/replicaRevision/luaScript",
                                            f"ReviseReplica({describe(obj)}, {share}) fails: {e}"))
                    break
                revised_predictor = (revised.get("spec") or {}).get("predictor") or {}
                if revised_predictor.get("maxReplicas") != share or not (
                        0 <= revised_predictor.get("minReplicas", -1) <= share):
                    problems.append(Problem(ric, "/spec/customizations/replicaRevision/luaScript",
                                            f"ReviseReplica({describe(obj)}, {share}) wrote minReplicas="
                                            f"{revised_predictor.get('minReplicas')} maxReplicas="
                                            f"{revised_predictor.get('maxReplicas')}; want maxReplicas={share} and "
                                            f"0 <= minReplicas <= {share}"))
                    break
                if not world.crds.missing:
                    schema_problems = validate_schemas([Manifest(obj.path, obj.index, revised)], world.crds)
                    if schema_problems:
                        problems.append(Problem(ric, "/spec/customizations/replicaRevision/luaScript",
                                                f"ReviseReplica({describe(obj)}, {share}) breaks the schema: "
                                                f"{schema_problems[0].where}: {schema_problems[0].message}"))
                        break
        problems.extend(_dependency_problems(world, ric, obj, result.dependencies))
    return problems


def _image_in(world: World, doc: dict[str, Any], runtime: Manifest | None, cluster: Cluster) -> str | None:
    """The model container's image of the predictor pod, from the service and its runtime as
    ``cluster`` gets them."""
    runtime_doc = effective(world, runtime, cluster)[0] if runtime is not None else None
    pod = render_predictor_pod(doc, runtime_doc)
    found = named_container((pod.get("spec") or {}).get("containers") or [])
    return found[1].get("image") if found else None


def check_services_runnable(context: Context) -> list[Problem]:
    """For every InferenceService and every cluster its placement may pick, after the overrides for
    that cluster: its runtime is there, its image comes from a registry the cluster can pull from,
    its models from storage the cluster can reach (the PVC is placed there, the S3 endpoint is
    reachable), its pods fit the cluster's GPU nodes (node selector, taints), and the
    scheduler-estimator, which only sees the template, can count those GPU nodes."""
    world = context.world
    problems: list[Problem] = []
    for obj in world.templates:
        if (obj.api_version, obj.kind) != INFERENCE_SERVICE:
            continue
        claim, _ = world.claim(obj)
        if claim is None or world.interpreter_for(*INFERENCE_SERVICE) is None:
            continue  # reported by check_interpreted_services
        requirement = world.interpret(obj).requirement or {}
        wants_gpu = any(is_extended_resource_name(n) for n in (requirement.get("resourceRequest") or {}))
        for name in sorted(world.choosable(claim)):
            cluster = world.cluster(name)
            doc, _ = effective(world, obj, cluster)
            problems.extend(_runnable_in(world, obj, doc, cluster, requirement, wants_gpu))
    return dedupe(problems)


def _runnable_in(world: World, obj: Manifest, doc: dict[str, Any], cluster: Cluster,
                 requirement: dict[str, Any], wants_gpu: bool) -> list[Problem]:
    problems = []
    predictor = (doc.get("spec") or {}).get("predictor") or {}
    model = predictor.get("model") or {}
    where = f"{describe(obj)} in {cluster.name}"
    runtime = find_runtime(world.templates, model["runtime"], obj.namespace) if model.get("runtime") else None
    if model.get("runtime") and runtime is None:
        problems.append(Problem(obj, "/spec/predictor/model/runtime",
                                f"runtime {model['runtime']!r}: no ServingRuntime in {obj.namespace} nor "
                                f"ClusterServingRuntime of that name is shipped"))
    elif runtime is not None and not world.reaches(runtime, cluster.name, carried_by=obj):
        problems.append(Problem(obj, "/spec/predictor/model/runtime",
                                f"{where}: runtime {describe(runtime)} is never placed in {cluster.name}"))
    image = _image_in(world, doc, runtime, cluster)
    if image:
        registry = Image.parse(image).registry
        if registry not in cluster.registries:
            problems.append(Problem(obj, "/spec/predictor/model/image",
                                    f"{where}: image {image} comes from {registry}, which {cluster.name} cannot "
                                    f"pull from (it reaches {', '.join(cluster.registries)}); add an imageOverrider "
                                    f"for this cluster"))
    uri = model.get("storageUri") or ""
    if uri.startswith("pvc://"):
        claim_name = uri[len("pvc://"):].split("/", 1)[0]
        pvc = world.find("v1", "PersistentVolumeClaim", obj.namespace, claim_name)
        if pvc is None:
            problems.append(Problem(obj, "/spec/predictor/model/storageUri",
                                    f"{where}: storageUri {uri} needs PersistentVolumeClaim "
                                    f"{obj.namespace}/{claim_name}, which we do not ship"))
        elif not world.reaches(pvc, cluster.name):
            problems.append(Problem(obj, "/spec/predictor/model/storageUri",
                                    f"{where}: storageUri {uri} needs {describe(pvc)}, which is never placed in "
                                    f"{cluster.name}"))
    elif uri.startswith("s3://"):
        secret_name = ((doc.get("metadata") or {}).get("annotations") or {}).get(S3_SECRET_ANNOTATION,
                                                                                   DEFAULT_S3_SECRET)
        secret = world.find("v1", "Secret", obj.namespace, secret_name)
        if secret is None:
            problems.append(Problem(obj, "/spec/predictor/model/storageUri",
                                    f"{where}: storageUri {uri} needs the S3 Secret {obj.namespace}/{secret_name}, "
                                    f"which we do not ship"))
        elif not world.reaches(secret, cluster.name, carried_by=obj):
            problems.append(Problem(obj, "/spec/predictor/model/storageUri",
                                    f"{where}: the S3 Secret {secret_name} never gets to {cluster.name}"))
        else:
            secret_doc, _ = effective(world, secret, cluster)
            endpoint = ((secret_doc.get("metadata") or {}).get("annotations") or {}).get(
                S3_ENDPOINT_ANNOTATION, KSERVE_DEFAULT_S3_ENDPOINT)
            if endpoint not in cluster.s3_endpoints:
                problems.append(Problem(secret, f"/metadata/annotations/{S3_ENDPOINT_ANNOTATION.replace('/', '~1')}",
                                        f"{where} reads {uri} through {endpoint}, which {cluster.name} cannot reach "
                                        f"(it reaches {', '.join(cluster.s3_endpoints)}); add an annotationsOverrider "
                                        f"or a storage override for this cluster"))
    if not wants_gpu:
        return problems
    for key, value in (predictor.get("nodeSelector") or {}).items():
        if cluster.gpu_node_labels.get(key) != value:
            problems.append(Problem(obj, "/spec/predictor/nodeSelector",
                                    f"{where}: pods would stay Pending: no GPU node there has {key}={value} "
                                    f"(GPU nodes: {json.dumps(cluster.gpu_node_labels, sort_keys=True)})"))
    for taint in untolerated(cluster.gpu_node_taints, predictor.get("tolerations")):
        problems.append(Problem(obj, "/spec/predictor/tolerations",
                                f"{where}: pods would stay Pending: nothing tolerates the GPU node taint "
                                f"{taint_text(taint)}"))
    claim_ = requirement.get("nodeClaim") or {}
    blocked = [f"{k}={v}" for k, v in (claim_.get("nodeSelector") or {}).items()
               if cluster.gpu_node_labels.get(k) != v]
    blocked += [taint_text(t) for t in untolerated(cluster.gpu_node_taints, claim_.get("tolerations"))]
    if blocked:
        problems.append(Problem(obj, "/spec/predictor",
                                f"{where}: the scheduler-estimator, which sees only the template (overrides "
                                f"come after scheduling), would count no GPU node there: "
                                f"{', '.join(blocked)}"))
    return problems


CHECKS = [
    check_policy_selectors,
    check_policy_scope,
    check_placements,
    check_override_targets,
    check_effective_objects,
    check_interpreters,
    check_interpreted_services,
    check_services_runnable,
]

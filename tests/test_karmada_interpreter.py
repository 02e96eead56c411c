"""The InferenceService interpreter (karmada/interpreter/inferenceservice.yaml) in a real Lua 5.1
runtime (lupa), sandboxed like Karmada's gopher-lua VM, with a ``kube`` library that follows
Karmada's Go code. First the sandbox itself (it must refuse what Karmada refuses, or these tests
prove nothing), then each function's contract on realistic InferenceServices."""

from __future__ import annotations

import copy
import itertools
import math
from fractions import Fraction
from pathlib import Path

import jsonschema
import pytest
import yaml

from scripts.manifests import REPO_ROOT, Manifest, load_manifests
from scripts.manifests.karmada.lua import (
    ENTRY_POINTS,
    FORBIDDEN_GLOBALS,
    KarmadaLua,
    LuaConversionError,
    LuaScriptError,
    lua_forbidden_references,
    pod_resource_request,
)
from scripts.manifests.kube import format_binary_si, format_decimal_si, parse_quantity

RIC_PATH = REPO_ROOT / "karmada" / "interpreter" / "inferenceservice.yaml"
# Karmada stops a call after 1 s. C Lua is a few times faster than gopher-lua, and these timings
# include our Python-side conversions: 0.1 s leaves a wide margin without being a benchmark.
CALL_BOUND_S = 0.1


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    doc = yaml.safe_load(RIC_PATH.read_text())
    return {name: c["luaScript"] for name, c in doc["spec"]["customizations"].items()}


@pytest.fixture
def lua() -> KarmadaLua:
    return KarmadaLua()


def isvc(name="wan-t2v-a14b", *, min_replicas=0, max_replicas=2, gpus="1", generation=3, **predictor_extra):
    """An InferenceService shaped like kserve/inferenceservice-*.yaml."""
    predictor = {
        "serviceAccountName": "wan-s3",
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "scaleMetric": "concurrency",
        "scaleTarget": 1,
        "containerConcurrency": 1,
        "timeout": 1860,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "model": {
            "modelFormat": {"name": "pytorch"},
            "runtime": "wan-torchserve",
            "protocolVersion": "v1",
            "storageUri": f"s3://wan-models/{name.removeprefix('wan-')}",
            "image": "registry.wan.internal/wan/wan-torchserve:0.1.0",
            "env": [{"name": "WAN_S3_BUCKET", "value": "wan-results"}],
            "resources": {
                "requests": {"cpu": "8", "memory": "96Gi", "nvidia.com/gpu": gpus},
                "limits": {"memory": "128Gi", "nvidia.com/gpu": gpus},
            },
        },
    }
    for key, value in predictor_extra.items():
        if value is None:
            predictor.pop(key, None)
        else:
            predictor[key] = value
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name, "namespace": "wan", "generation": generation,
            "labels": {"app.kubernetes.io/name": "wan", "wan.serving/variant": name.removeprefix("wan-")},
            "annotations": {"serving.kserve.io/deploymentMode": "Knative"},
        },
        "spec": {"predictor": predictor},
    }


def call(lua: KarmadaLua, scripts: dict[str, str], customization: str, *args):
    result = lua.call(scripts[customization], ENTRY_POINTS[customization], *args)
    assert result.seconds < CALL_BOUND_S, f"{customization} took {result.seconds:.3f} s"
    assert result.globals_assigned == [ENTRY_POINTS[customization]], \
        f"{customization} leaks globals into Karmada's pooled Lua state: {result.globals_assigned}"
    return result


# -- the sandbox must refuse what Karmada refuses ---------------------------------------------------


@pytest.mark.parametrize("name", [*FORBIDDEN_GLOBALS, "print"])
def test_sandbox_refuses_globals_karmada_removes(lua, name):
    with pytest.raises(LuaScriptError, match=f"global '{name}' is not available"):
        lua.call(f"function F() return {name} end", "F")


@pytest.mark.parametrize("expression", ["string.gsub('a', 'a', 'b')", "string.rep('a', 3)", "('a'):rep(3)",
                                        "('a'):gsub('a', 'b')", "string.format('%d', 1)", "os.execute('true')",
                                        "os.getenv('HOME')", "require('json')"])
def test_sandbox_refuses_restricted_library_functions(lua, expression):
    with pytest.raises(LuaScriptError):
        lua.call(f"function F() return {expression} end", "F")


def test_sandbox_offers_what_karmada_offers(lua):
    source = """
    local kube = require("kube")
    function F(obj)
      local parts = {}
      for word in string.gmatch("a b c", "%a+") do parts[#parts + 1] = string.upper(word) end
      table.sort(parts, function(x, y) return x > y end)
      return table.concat(parts, ",") .. ("xyz"):sub(2, 3) .. tostring(math.max(1, 2)) ..
        type(os.time()) .. tostring(select("#", 1, 2)) .. kube.resourceAdd("1", "500m") ..
        tostring(kube.getResourceQuantity("2Gi")), pcall(error, "x")
    end
    """
    result = lua.call(source, "F", {})
    assert result.values[0] == "C,B,Ayz2number21500m2147483648"


def test_sandbox_stops_runaway_scripts(lua):
    with pytest.raises(LuaScriptError, match="exceeded"):
        lua.call("function F() while true do end end", "F", budget_s=0.2)


def test_sandbox_reports_leaked_globals(lua):
    result = lua.call("helper = 1\nfunction F() return helper end", "F")
    assert result.globals_assigned == ["helper", "F"]


def test_conversion_refuses_what_gopher_json_refuses(lua):
    shared = lua.call("function F() local t = {a = 1} return {x = t, y = t} end", "F")
    with pytest.raises(LuaConversionError, match="twice"):
        lua.from_lua(shared.values[0], struct=True)
    sparse = lua.call("function F() return {[1] = 'a', [3] = 'c'} end", "F")
    with pytest.raises(LuaConversionError, match="sparse"):
        lua.from_lua(sparse.values[0], struct=False)
    mixed = lua.call("function F() return {'a', b = 1} end", "F")
    with pytest.raises(LuaConversionError, match="mixed"):
        lua.from_lua(mixed.values[0], struct=True)


def test_conversion_drops_empty_tables_and_nulls_like_karmada(lua):
    # ConvertLuaResultInto removes empty nested tables; decodeValue turns JSON null into nil.
    result = lua.call("function F(o) o.spec.empty = {} return o end", "F",
                      {"spec": {"keep": [1, None, 2], "gone": None}})
    assert lua.from_lua(result.values[0], struct=True) == {"spec": {"keep": [1, 2]}}
    assert lua.from_lua(lua.call("function F() return {} end", "F").values[0], struct=True) == {}


def test_static_scan_finds_forbidden_calls_in_code_only():
    source = """
    -- string.format and setmetatable in a comment are fine
    local s = "rawget and loadstring in a string are fine"
    local function f(x) return x:gsub("a", "b"), string.rep("a", 2), setmetatable({}, {}) end
    local t = {load = 1}; local v = t.load; local w = os.exit
    """
    assert lua_forbidden_references(source) == ["os.exit", "setmetatable", "string.gsub", "string.rep"]


# -- the kube library stand-in follows Karmada's Go code ----------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("500m", Fraction(1, 2)), ("1.5", Fraction(3, 2)), ("2Gi", 2**31),
                                             ("80G", 80 * 10**9), ("1e3", 1000), (4, 4), (".5", Fraction(1, 2))])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize(("value", "decimal"), [(Fraction(3, 2), "1500m"), (Fraction(2), "2"), (100000, "100k"),
                                                 (Fraction(1, 4), "250m"), (0, "0")])
def test_decimal_si_is_canonical(value, decimal):
    assert format_decimal_si(Fraction(value)) == decimal


@pytest.mark.parametrize(("value", "binary"), [(96 * 2**30, "96Gi"), (80 * 10**9, "78125000Ki"), (512, "512"),
                                                (1536 * 2**20, "1536Mi")])
def test_binary_si_is_canonical(value, binary):
    assert format_binary_si(value) == binary


def test_pod_request_follows_add_pod_template_request():
    spec = {
        "containers": [
            {"name": "a", "resources": {"limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 2}}},
            {"name": "b", "resources": {"requests": {"cpu": "500m"}, "limits": {"cpu": "1", "memory": "1Gi"}}},
            {"name": "c", "resources": {"requests": {"foo": "3", "requests.x/y": "1"}}},  # not scalar: dropped
        ],
        "initContainers": [{"name": "init", "resources": {"requests": {"cpu": "4", "memory": "1Gi"}}}],
        "overhead": {"memory": "512Mi"},
    }
    # cpu: max(2 + 0.5, 4); memory: max(4Gi + 1Gi, 1Gi) + 512Mi overhead.
    assert pod_resource_request(spec) == {"cpu": "4", "memory": "5632Mi", "nvidia.com/gpu": "2"}
    assert pod_resource_request({"containers": [{"name": "x"}]}) is None


def test_accurate_pod_requirements_returns_nil_without_resources_or_claims(lua):
    source = """local kube = require("kube")
    function F() return kube.accuratePodRequirements({spec = {containers = {{name = "x"}}}}) == nil end"""
    assert lua.call(source, "F").values[0] is True


def test_accurate_pod_requirements_rejects_what_go_cannot_unmarshal(lua):
    source = """local kube = require("kube")
    function F() return kube.accuratePodRequirements({spec = {containers = {{name = "x",
      resources = {limits = {cpu = "lots"}}}}}}) end"""
    with pytest.raises(LuaScriptError, match="PodTemplateSpec"):
        lua.call(source, "F")
    source = """local kube = require("kube")
    function F() return kube.accuratePodRequirements({spec = {nodeSelector = "gpu"}}) end"""
    with pytest.raises(LuaScriptError, match="PodTemplateSpec"):
        lua.call(source, "F")


def test_accurate_pod_requirements_with_the_resource_quota_estimate_gate():
    """With ResourceQuotaEstimate on, Karmada also fills namespace and priorityClassName from the
    template (GenerateReplicaRequirements)."""
    lua = KarmadaLua(resource_quota_estimate=True)
    source = """local kube = require("kube")
    function F() return kube.accuratePodRequirements({metadata = {namespace = "wan"}, spec = {
      priorityClassName = "wan-inference", containers = {{name = "x", resources = {limits = {cpu = "1"}}}}}}) end"""
    requirement = lua.from_lua(lua.call(source, "F").values[0], struct=True)
    assert requirement == {"resourceRequest": {"cpu": "1"}, "namespace": "wan", "priorityClassName": "wan-inference"}


# -- the scripts ---------------------------------------------------------------------------------


def test_every_customization_is_there_and_loads(lua, scripts):
    assert set(ENTRY_POINTS) <= set(scripts)
    for name, entry in ENTRY_POINTS.items():
        assert lua.defines(scripts[name], entry) is None
        assert lua_forbidden_references(scripts[name]) == [], name


def test_interpreter_targets_v1beta1_inferenceservice():
    doc = yaml.safe_load(RIC_PATH.read_text())
    assert doc["spec"]["target"] == {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService"}


# GetReplicas


def replicas_of(lua, scripts, obj):
    result = call(lua, scripts, "replicaResource", obj)
    count, requirement = result.values
    assert isinstance(count, int), "Karmada reads the count with ConvertLuaResultToInt: a number"
    return count, lua.from_lua(requirement, struct=True)


def test_get_replicas_scale_to_zero_counts_its_peak_never_zero(lua, scripts):
    count, _ = replicas_of(lua, scripts, isvc(min_replicas=0, max_replicas=4))
    assert count == 4
    assert lua.kube_calls == ["accuratePodRequirements"]  # the requirements come from kube
    count, _ = replicas_of(lua, scripts, isvc(min_replicas=0, max_replicas=None))
    assert count == 1  # unbounded scale-to-zero: still one replica, so Karmada places it somewhere
    count, _ = replicas_of(lua, scripts, isvc(min_replicas=None, max_replicas=None))
    assert count == 1  # KServe's default minReplicas


def test_get_replicas_four_gpu_predictor(lua, scripts, crds):
    obj = isvc(gpus="4", max_replicas=3, min_replicas=1, priorityClassName="wan-inference")
    obj["spec"]["predictor"]["model"]["resources"] = {
        "requests": {"cpu": "32", "memory": "320Gi"},
        "limits": {"cpu": "48", "memory": "480Gi", "nvidia.com/gpu": 4},
    }
    count, requirement = replicas_of(lua, scripts, obj)
    assert count == 3
    # Requests win over limits; a limit without a request becomes the request (nvidia.com/gpu).
    assert requirement["resourceRequest"] == {"cpu": "32", "memory": "320Gi", "nvidia.com/gpu": "4"}
    assert requirement["nodeClaim"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert requirement["nodeClaim"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                        "effect": "NoSchedule"}]
    assert requirement["namespace"] == "wan"
    assert requirement["priorityClassName"] == "wan-inference"
    schema = crds.schemas[("work.karmada.io/v1alpha2", "ResourceBinding")]["properties"]["spec"]["properties"][
        "replicaRequirements"]
    jsonschema.Draft7Validator(schema).validate(requirement)


def test_get_replicas_declares_the_gpu_toleration_the_template_lacks(lua, scripts):
    obj = isvc(tolerations=None, affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt",
                                                     "values": ["70000"]}]}]}}})
    _, requirement = replicas_of(lua, scripts, obj)
    claim = requirement["nodeClaim"]
    assert claim["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert claim["hardNodeAffinity"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.memory"


def test_get_replicas_counts_extra_and_init_containers(lua, scripts):
    obj = isvc(containers=[{"name": "sidecar", "image": "busybox",
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}}}],
               initContainers=[{"name": "warmup", "image": "busybox",
                                "resources": {"requests": {"cpu": "16", "memory": "1Gi"}}}])
    _, requirement = replicas_of(lua, scripts, obj)
    assert requirement["resourceRequest"] == {"cpu": "16", "memory": "98816Mi", "nvidia.com/gpu": "1"}


@pytest.mark.parametrize("obj", [
    {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x",
                                                                                        "namespace": "wan"}},
    {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
     "metadata": {"name": "x", "namespace": "wan"}, "spec": {"predictor": {"model": {"modelFormat": {
         "name": "pytorch"}}}}},
    {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"},
     "spec": {"predictor": {"containers": [{"name": "kserve-container", "image": "x",
                                            "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}}},
], ids=["no-spec", "no-resources", "custom-container"])
def test_get_replicas_with_missing_fields(lua, scripts, obj):
    count, requirement = replicas_of(lua, scripts, obj)
    assert count == 1
    if obj.get("spec", {}).get("predictor", {}).get("containers"):
        assert requirement["resourceRequest"] == {"nvidia.com/gpu": "2"}
        assert "namespace" not in requirement
    else:
        assert requirement == {"namespace": "wan"}


# ReviseReplica


def revise(lua, scripts, obj, share):
    result = call(lua, scripts, "replicaRevision", obj, share)
    return lua.from_lua(result.values[0], struct=True)


def test_revise_replica_writes_the_share_as_max_replicas(lua, scripts, crds):
    revised = revise(lua, scripts, isvc(min_replicas=0, max_replicas=4), 3)
    predictor = revised["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 3)  # still scale-to-zero
    assert predictor["model"] == isvc()["spec"]["predictor"]["model"]  # nothing else changes
    assert crds.validate(Manifest(Path("revised.yaml"), 0, revised)) == []


def test_revise_replica_splits_warm_replicas_rounding_up(lua, scripts):
    obj = isvc(min_replicas=2, max_replicas=6)
    private, public = revise(lua, scripts, obj, 4), revise(lua, scripts, obj, 2)
    assert (private["spec"]["predictor"]["minReplicas"], private["spec"]["predictor"]["maxReplicas"]) == (2, 4)
    assert (public["spec"]["predictor"]["minReplicas"], public["spec"]["predictor"]["maxReplicas"]) == (1, 2)
    # Without minReplicas KServe keeps 1 warm pod: every cluster that serves keeps one.
    assert revise(lua, scripts, isvc(min_replicas=None, max_replicas=5), 1)["spec"]["predictor"]["minReplicas"] == 1


def test_revise_replica_never_writes_zero_or_unbounded(lua, scripts):
    for share in (0, -2):
        predictor = revise(lua, scripts, isvc(min_replicas=1, max_replicas=3), share)["spec"]["predictor"]
        assert predictor["maxReplicas"] == 1 and predictor["minReplicas"] == 1


def test_revise_replica_leaves_objects_without_predictor_alone(lua, scripts):
    obj = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
           "metadata": {"name": "x", "namespace": "wan"}, "spec": {"transformer": {"containers": [{"name": "t"}]}}}
    assert revise(lua, scripts, obj, 2) == obj


def test_revise_replica_keeps_totals_for_every_split(lua, scripts):
    """Every way Karmada can split a peak between two clusters keeps the peak and the warm pods."""
    for peak, min_replicas in itertools.product(range(1, 6), range(6)):
        if min_replicas > peak:
            continue
        obj = isvc(min_replicas=min_replicas, max_replicas=peak)
        for first in range(1, peak):
            shares = (first, peak - first)
            revised = [revise(lua, scripts, obj, s)["spec"]["predictor"] for s in shares]
            assert sum(p["maxReplicas"] for p in revised) == peak
            assert sum(p["minReplicas"] for p in revised) >= min_replicas
            assert all(0 <= p["minReplicas"] <= p["maxReplicas"] for p in revised)
            assert all(p["minReplicas"] == math.ceil(min_replicas * s / peak) for p, s in zip(revised, shares))
            if min_replicas == 0:
                assert all(p["minReplicas"] == 0 for p in revised)


# ReflectStatus / AggregateStatus


def member(cluster, *, ready="True", reason=None, message=None, generation=3, observed=3, template_generation=5,
           url=None, model_state="Loaded", transition="UpToDate", failure=None, time="2026-09-01T10:00:00Z"):
    """A member cluster's InferenceService as KServe v0.20 reports it."""
    url = url or f"http://wan-t2v-a14b.wan.{cluster}.example.com"
    ready_condition = {"type": "Ready", "status": ready, "lastTransitionTime": time}
    if reason:
        ready_condition["reason"] = reason
    if message:
        ready_condition["message"] = message
    predictor_ready = {**ready_condition, "type": "PredictorReady"}
    model_status = {"transitionStatus": transition, "states": {"activeModelState": model_state,
                                                               "targetModelState": model_state},
                    "copies": {"failedCopies": 0 if ready == "True" else 1, "totalCopies": 1}}
    if failure:
        model_status["lastFailureInfo"] = failure
    obj = isvc(generation=generation)
    obj["metadata"]["annotations"]["resourcetemplate.karmada.io/generation"] = str(template_generation)
    obj["status"] = {
        "observedGeneration": observed,
        "url": url,
        "address": {"url": "http://wan-t2v-a14b-predictor.wan.svc.cluster.local"},
        "conditions": [
            {"type": "IngressReady", "status": "True", "lastTransitionTime": time},
            predictor_ready,
            ready_condition,
        ],
        "components": {"predictor": {"latestReadyRevision": "wan-t2v-a14b-predictor-00003",
                                     "latestCreatedRevision": "wan-t2v-a14b-predictor-00003",
                                     "url": url.replace("wan-t2v-a14b", "wan-t2v-a14b-predictor"),
                                     "traffic": [{"revisionName": "wan-t2v-a14b-predictor-00003", "percent": 100,
                                                  "latestRevision": True}]}},
        "modelStatus": model_status,
        "deploymentMode": "Knative",
        "clusterServingRuntimeName": "wan-torchserve",
    }
    return obj


def reflect(lua, scripts, observed):
    result = call(lua, scripts, "statusReflection", observed)
    return lua.from_lua(result.values[0], struct=True)


def status_item(cluster, status, applied=True, message=""):
    """workv1alpha2.AggregatedStatusItem as JSON: applied and appliedMessage are omitempty."""
    item = {"clusterName": cluster, "status": status}
    if applied:
        item["applied"] = True
    if message:
        item["appliedMessage"] = message
    return item


def aggregate(lua, scripts, desired, items):
    result = call(lua, scripts, "statusAggregation", desired, items)
    return lua.from_lua(result.values[0], struct=True)


def template(generation=5, status=None):
    obj = isvc(generation=generation)
    if status is not None:
        obj["status"] = status
    return obj


def ready_of(status):
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_reflect_status_keeps_what_aggregation_needs(lua, scripts):
    reflected = reflect(lua, scripts, member("wan-private"))
    assert reflected["generation"] == 3 and reflected["observedGeneration"] == 3
    assert reflected["resourceTemplateGeneration"] == 5
    assert reflected["url"] == "http://wan-t2v-a14b.wan.wan-private.example.com"
    assert [c["type"] for c in reflected["conditions"]] == ["IngressReady", "PredictorReady", "Ready"]
    assert reflected["components"]["predictor"]["traffic"][0]["percent"] == 100
    assert reflected["modelStatus"]["states"]["activeModelState"] == "Loaded"


def test_reflect_status_without_status_or_metadata(lua, scripts):
    bare = isvc()
    assert reflect(lua, scripts, bare) == {"generation": 3}
    assert reflect(lua, scripts, {"apiVersion": "v1", "kind": "X"}) == {}


def test_aggregate_all_ready_and_fresh(lua, scripts, crds):
    items = [status_item(c, reflect(lua, scripts, member(c))) for c in ("wan-private", "wan-public-spot")]
    desired = aggregate(lua, scripts, template(), items)
    status = desired["status"]
    assert ready_of(status)["status"] == "True"
    assert status["observedGeneration"] == 5
    assert status["url"] == "http://wan-t2v-a14b.wan.wan-private.example.com"
    assert status["annotations"] == {
        "wan.serving/url.wan-private": "http://wan-t2v-a14b.wan.wan-private.example.com",
        "wan.serving/url.wan-public-spot": "http://wan-t2v-a14b.wan.wan-public-spot.example.com",
        "wan.serving/ready.wan-private": "True",
        "wan.serving/ready.wan-public-spot": "True",
    }
    assert status["modelStatus"] == {"transitionStatus": "UpToDate",
                                     "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                                     "copies": {"failedCopies": 0, "totalCopies": 2}}
    # The API server prunes what the schema does not know: the aggregated status must fit it.
    assert crds.validate(Manifest(Path("aggregated.yaml"), 0, desired)) == []


def test_aggregate_surfaces_the_failing_cluster_and_keeps_every_url(lua, scripts, crds):
    failure = {"reason": "ModelLoadFailed", "message": "CUDA out of memory", "location": "wan-t2v-a14b-predictor",
               "time": "2026-09-01T10:05:00Z"}
    items = [
        status_item("wan-private", reflect(lua, scripts, member("wan-private"))),
        status_item("wan-public-spot", reflect(lua, scripts, member(
            "wan-public-spot", ready="False", reason="RevisionFailed", message="Revision failed to load the model",
            model_state="FailedToLoad", transition="BlockedByFailedLoad", failure=failure,
            time="2026-09-01T10:05:00Z"))),
    ]
    status = aggregate(lua, scripts, template(), items)["status"]
    ready = ready_of(status)
    assert ready["status"] == "False"
    assert ready["reason"] == "RevisionFailed"
    assert ready["message"] == "wan-public-spot: RevisionFailed: Revision failed to load the model"
    assert ready["lastTransitionTime"] == "2026-09-01T10:05:00Z"
    predictor_ready = next(c for c in status["conditions"] if c["type"] == "PredictorReady")
    assert predictor_ready["status"] == "False" and predictor_ready["message"].startswith("wan-public-spot: ")
    assert next(c for c in status["conditions"] if c["type"] == "IngressReady")["status"] == "True"
    # The URL comes from the Ready member; every member's URL and readiness stay visible.
    assert status["url"] == "http://wan-t2v-a14b.wan.wan-private.example.com"
    assert status["annotations"]["wan.serving/url.wan-public-spot"].endswith("wan-public-spot.example.com")
    assert status["annotations"]["wan.serving/ready.wan-public-spot"] == "False"
    assert status["modelStatus"]["transitionStatus"] == "BlockedByFailedLoad"
    assert status["modelStatus"]["states"]["activeModelState"] == "FailedToLoad"
    assert status["modelStatus"]["lastFailureInfo"]["message"] == "wan-public-spot: CUDA out of memory"
    assert status["modelStatus"]["copies"] == {"failedCopies": 1, "totalCopies": 2}
    assert crds.validate(Manifest(Path("aggregated.yaml"), 0, {**template(), "status": status})) == []


def test_aggregate_is_not_ready_until_every_member_runs_the_current_template(lua, scripts):
    previous = {"observedGeneration": 4, "conditions": [{"type": "Ready", "status": "True",
                                                          "lastTransitionTime": "2026-08-01T00:00:00Z"}]}
    items = [status_item("wan-private", reflect(lua, scripts, member("wan-private"))),
             status_item("wan-public-spot", reflect(lua, scripts, member("wan-public-spot", template_generation=4)))]
    status = aggregate(lua, scripts, template(5, previous), items)["status"]
    ready = ready_of(status)
    assert (ready["status"], ready["reason"]) == ("Unknown", "Propagating")
    assert ready["message"] == "wan-public-spot: Propagating: runs template generation 4, not 5"
    assert status["observedGeneration"] == 4  # not observed until every member has it
    items[1] = status_item("wan-public-spot", reflect(lua, scripts, member("wan-public-spot", generation=4,
                                                                               observed=3)))
    status = aggregate(lua, scripts, template(5, previous), items)["status"]
    assert ready_of(status)["reason"] == "Reconciling"


def test_aggregate_apply_failures_and_missing_status(lua, scripts):
    items = [status_item("wan-private", reflect(lua, scripts, member("wan-private"))),
             status_item("wan-public-spot", None, applied=False,
                         message='admission webhook "inferenceservice.kserve-webhook-server.validator" denied it')]
    ready = ready_of(aggregate(lua, scripts, template(), items)["status"])
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert "wan-public-spot: ApplyFailed: admission webhook" in ready["message"]
    items[1] = status_item("wan-public-spot", None, applied=False)
    ready = ready_of(aggregate(lua, scripts, template(), items)["status"])
    assert (ready["status"], ready["reason"]) == ("Unknown", "NotApplied")
    items[1] = status_item("wan-public-spot", {"generation": 1})
    assert ready_of(aggregate(lua, scripts, template(), items)["status"])["reason"] == "ReadyMissing"


def test_aggregate_keeps_transition_time_while_status_holds(lua, scripts):
    previous = {"observedGeneration": 5,
                "annotations": {"wan.serving/url.wan-gone": "http://old", "team": "video"},
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-08-01T00:00:00Z"}]}
    items = [status_item("wan-private", reflect(lua, scripts, member("wan-private", time="2026-09-02T00:00:00Z")))]
    status = aggregate(lua, scripts, template(5, previous), items)["status"]
    assert ready_of(status)["lastTransitionTime"] == "2026-08-01T00:00:00Z"
    assert "wan.serving/url.wan-gone" not in status["annotations"]  # a cluster no longer serving it
    assert status["annotations"]["team"] == "video"


def test_aggregate_without_items_returns_the_object(lua, scripts):
    desired = template(5, {"observedGeneration": 5})
    assert aggregate(lua, scripts, desired, []) == desired


# InterpretHealth


def health(lua, scripts, observed):
    value = call(lua, scripts, "healthInterpretation", observed).values[0]
    assert isinstance(value, bool), "Karmada reads the result with ConvertLuaResultToBool"
    return value


def test_health_needs_ready_for_the_current_generation(lua, scripts):
    assert health(lua, scripts, member("wan-private")) is True
    assert health(lua, scripts, member("wan-private", generation=4, observed=3)) is False
    assert health(lua, scripts, member("wan-private", ready="False", reason="RevisionFailed")) is False
    assert health(lua, scripts, member("wan-private", ready="Unknown")) is False
    assert health(lua, scripts, isvc()) is False  # no status yet
    no_ready = member("wan-private")
    no_ready["status"]["conditions"] = [c for c in no_ready["status"]["conditions"] if c["type"] != "Ready"]
    assert health(lua, scripts, no_ready) is False


def test_health_scaled_to_zero_is_healthy(lua, scripts):
    idle = member("wan-public-spot")
    idle["status"]["components"]["predictor"]["traffic"][0]["percent"] = 100  # no pods, revision still Ready
    idle["status"]["modelStatus"]["copies"] = {"failedCopies": 0, "totalCopies": 0}
    assert health(lua, scripts, idle) is True


# GetDependencies


def dependencies(lua, scripts, obj):
    result = call(lua, scripts, "dependencyInterpretation", obj)
    return lua.from_lua(result.values[0], struct=False)


def test_dependencies_are_service_account_secret_and_runtime(lua, scripts):
    assert dependencies(lua, scripts, isvc()) == [
        {"apiVersion": "v1", "kind": "Secret", "namespace": "wan", "name": "wan-s3-credentials"},
        {"apiVersion": "v1", "kind": "ServiceAccount", "namespace": "wan", "name": "wan-s3"},
        {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "namespace": "wan",
         "name": "wan-torchserve"},
    ]
    assert lua.kube_calls == ["getPodDependencies"]


def test_dependencies_follow_the_pod_and_the_storage(lua, scripts):
    obj = isvc(volumes=[{"name": "cfg", "configMap": {"name": "wan-extra-config"}}],
               imagePullSecrets=[{"name": "registry-pull"}])
    obj["metadata"]["annotations"]["wan.serving/s3-credentials-secret"] = "wan-s3-other"
    obj["spec"]["predictor"]["model"]["env"].append(
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}})
    obj["spec"]["transformer"] = {"serviceAccountName": "wan-transformer", "containers": [{"name": "t", "image": "x"}]}
    names = {(d["kind"], d["name"]) for d in dependencies(lua, scripts, obj)}
    assert names == {("ConfigMap", "wan-extra-config"), ("Secret", "registry-pull"), ("Secret", "hf-token"),
                     ("Secret", "wan-s3-other"), ("ServiceAccount", "wan-s3"), ("ServiceAccount", "wan-transformer"),
                     ("ServingRuntime", "wan-torchserve")}


def test_dependencies_for_pvc_storage_and_storage_spec(lua, scripts):
    obj = isvc()
    obj["spec"]["predictor"]["model"]["storageUri"] = "pvc://wan-model-store/t2v-a14b"
    assert ("PersistentVolumeClaim", "wan-model-store") in {(d["kind"], d["name"]) for d in
                                                            dependencies(lua, scripts, obj)}
    assert not any(d["kind"] == "Secret" for d in dependencies(lua, scripts, obj))
    obj["spec"]["predictor"]["model"].pop("storageUri")
    obj["spec"]["predictor"]["model"]["storage"] = {"key": "wan-store", "path": "t2v-a14b"}
    assert ("Secret", "storage-config") in {(d["kind"], d["name"]) for d in dependencies(lua, scripts, obj)}


def test_dependencies_never_cluster_scoped_and_empty_when_none(lua, scripts):
    obj = isvc(serviceAccountName=None)
    obj["spec"]["predictor"]["model"].pop("runtime")
    obj["spec"]["predictor"]["model"]["storageUri"] = "https://example.com/model.tar"
    assert dependencies(lua, scripts, obj) == []  # kube.getPodDependencies returns nil here
    for dep in dependencies(lua, scripts, isvc()):
        assert dep["namespace"] == "wan" and dep["kind"] != "ClusterServingRuntime"


# Bounded time on large inputs


def test_calls_stay_far_below_karmadas_limit_on_large_inputs(lua, scripts):
    big = member("wan-private")
    big["status"]["conditions"] += [{"type": f"Extra{i}", "status": "True", "lastTransitionTime":
                                     "2026-09-01T10:00:00Z", "message": "x" * 200} for i in range(40)]
    items = [status_item(f"wan-cluster-{i:02d}", reflect(lua, scripts, copy.deepcopy(big))) for i in range(30)]
    desired = aggregate(lua, scripts, template(), items)
    assert ready_of(desired["status"])["status"] == "True"
    assert len(desired["status"]["annotations"]) == 60
    many = isvc(containers=[{"name": f"c{i}", "image": "x", "resources": {"requests": {"cpu": "100m"}}}
                            for i in range(50)], volumes=[{"name": f"v{i}", "secret": {"secretName": f"s{i}"}}
                                                          for i in range(50)])
    assert replicas_of(lua, scripts, many)[1]["resourceRequest"]["cpu"] == "13"
    assert len(dependencies(lua, scripts, many)) == 53


# The shipped InferenceServices


def shipped_inference_services() -> list[Manifest]:
    manifests, _ = load_manifests([REPO_ROOT / "kserve"])
    return [m for m in manifests if m.kind == "InferenceService"]


@pytest.mark.parametrize("manifest", shipped_inference_services(), ids=lambda m: m.label)
def test_shipped_inference_services(lua, scripts, manifest):
    count, requirement = replicas_of(lua, scripts, copy.deepcopy(manifest.doc))
    predictor = manifest.doc["spec"]["predictor"]
    assert count == max(predictor.get("maxReplicas") or 0, predictor.get("minReplicas", 1), 1) >= 1
    assert "nvidia.com/gpu" in requirement["resourceRequest"]
    kinds = {d["kind"] for d in dependencies(lua, scripts, copy.deepcopy(manifest.doc))}
    assert {"ServiceAccount", "Secret", "ServingRuntime"} <= kinds

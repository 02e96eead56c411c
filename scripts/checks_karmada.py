"""Cross-checks for the Karmada manifests (see scripts.validate_manifests), and the offline model
of Karmada that they need: the cluster inventory, placement and override semantics, and a Lua 5.1
sandbox that runs our ResourceInterpreterCustomization the way karmada-controller-manager does.

Boundary: reads the manifests the validator core loaded, the CRDs (through ``Context``) and the
cluster inventory below. Never a cluster, never the network. Each check is
``fn(manifests, context) -> list[Problem]`` and is registered in ``CHECKS`` at the end.

Sources of the semantics modelled here (Karmada v1.18, gopher-lua v1.1.1):
- Lua VM: ``pkg/resourceinterpreter/customized/declarative/luavm/{lua.go,kube.go,lua_convert.go}``,
  ``pkg/util/lifted/lua/*`` (sandbox), layeh.com/gopher-json (Lua <-> JSON).
- ``kube.accuratePodRequirements``: ``pkg/util/helper`` ``GenerateReplicaRequirements`` and
  ``pkg/util`` ``Resource.AddPodTemplateRequest`` (limits default requests, init containers are
  maxed, overhead added, canonical quantities).
- ``kube.getPodDependencies``: ``pkg/util/helper`` ``GetDependenciesFromPodTemplate``.
- Overrides: ``pkg/util/overridemanager`` (image, labels/annotations, plaintext JSON patch).
- Placement validation: the karmada-webhook rules for PropagationPolicy (overflowAffinities need
  Divided scheduling with dynamic weights or Aggregated division, application failover needs
  propagateDeps, ...).
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

from scripts.validate_manifests import KUBERNETES_VERSION, Context, CrdSchemas, Manifest, Problem

# -- the clusters ---------------------------------------------------------------------------
#
# Karmada's Cluster objects (cluster.karmada.io/v1alpha1) have no CRD: karmada-aggregated-apiserver
# serves them, so they cannot be schema-validated like the rest of karmada/. Their names, labels and
# taints are fixed here, documented in karmada/README.md (a test keeps the two in step), and set
# by the platform engineers with the commands in that README. The node-level facts (GPU node
# labels and taints, reachable registries and S3 endpoints) let the checks answer "would this
# InferenceService actually run there after the overrides?".


@dataclass(frozen=True)
class Cluster:
    name: str
    labels: dict[str, str]
    provider: str
    region: str
    zones: tuple[str, ...]
    sync_mode: str  # Push: karmadactl join; Pull: karmadactl register (karmada-agent)
    taints: tuple[dict[str, str], ...]  # Karmada cluster taints (spec.taints)
    gpu_node_labels: dict[str, str]  # labels every GPU node of the cluster carries
    gpu_node_taints: tuple[dict[str, str], ...]  # taints every GPU node of the cluster carries
    registries: tuple[str, ...]  # image registries the cluster can pull from
    s3_endpoints: tuple[str, ...]  # S3 endpoints (host[:port]) the cluster can reach

    @property
    def fields(self) -> dict[str, tuple[str, ...]]:
        """The values Karmada's fieldSelector sees (provider, region, zone)."""
        return {"provider": (self.provider,), "region": (self.region,), "zone": self.zones}


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
SPOT_CLUSTER_TAINT = {"key": "wan.serving/spot", "value": "true", "effect": "NoSchedule"}

CLUSTERS: tuple[Cluster, ...] = (
    Cluster(
        name="wan-private",
        labels={
            "wan.serving/tier": "private",
            "wan.serving/gpu-product": "NVIDIA-H100-80GB-HBM3",
            "wan.serving/capacity-type": "on-demand",
        },
        provider="on-premises",
        region="fra-dc1",
        zones=("fra-dc1-a",),
        sync_mode="Push",
        taints=(),
        gpu_node_labels={
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        },
        gpu_node_taints=(GPU_TAINT,),
        registries=("registry.wan.internal",),
        s3_endpoints=("s3.wan.internal:9000",),
    ),
    Cluster(
        name="wan-public-spot",
        labels={
            "wan.serving/tier": "public",
            "wan.serving/gpu-product": "NVIDIA-A100-SXM4-80GB",
            "wan.serving/capacity-type": "spot",
        },
        provider="aws",
        region="eu-west-1",
        zones=("eu-west-1a", "eu-west-1b", "eu-west-1c"),
        sync_mode="Pull",
        taints=(SPOT_CLUSTER_TAINT,),
        gpu_node_labels={
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
            "karpenter.sh/capacity-type": "spot",
        },
        gpu_node_taints=(GPU_TAINT,),
        registries=("123456789012.dkr.ecr.eu-west-1.amazonaws.com",),
        s3_endpoints=("s3.eu-west-1.amazonaws.com",),
    ),
)

INFERENCE_SERVICE = ("serving.kserve.io/v1beta1", "InferenceService")
SERVING_RUNTIME = ("serving.kserve.io/v1alpha1", "ServingRuntime")
CLUSTER_SERVING_RUNTIME = ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
RIC = ("config.karmada.io/v1alpha1", "ResourceInterpreterCustomization")
POLICY_GROUP = "policy.karmada.io/v1alpha1"
PROPAGATION_KINDS = ("PropagationPolicy", "ClusterPropagationPolicy")
OVERRIDE_KINDS = ("OverridePolicy", "ClusterOverridePolicy")

# The customizations our interpreter must provide for an InferenceService, and the Lua function
# Karmada calls for each (luavm/lua.go).
ENTRY_POINTS = {
    "replicaResource": "GetReplicas",
    "replicaRevision": "ReviseReplica",
    "statusReflection": "ReflectStatus",
    "statusAggregation": "AggregateStatus",
    "healthInterpretation": "InterpretHealth",
    "dependencyInterpretation": "GetDependencies",
}
OPTIONAL_ENTRY_POINTS = {"retention": "Retain", "componentResource": "GetComponents"}

# Core kinds that are cluster-scoped (everything else we might ship from core groups is namespaced).
CLUSTER_SCOPED_CORE_KINDS = {
    ("v1", "Namespace"), ("v1", "PersistentVolume"), ("v1", "Node"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"), ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("storage.k8s.io/v1", "StorageClass"), ("scheduling.k8s.io/v1", "PriorityClass"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"),
}


# -- quantities (k8s.io/apimachinery resource.Quantity) ----------------------------------------

_QUANTITY_RE = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$")
_SUFFIX_VALUE = {
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18),
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
    "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}
_DECIMAL_SUFFIX = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}
_BINARY_SUFFIX = {0: "", 1: "Ki", 2: "Mi", 3: "Gi", 4: "Ti", 5: "Pi", 6: "Ei"}


class QuantityError(ValueError):
    pass


def parse_quantity(value: Any) -> Fraction:
    """resource.ParseQuantity; JSON numbers are accepted too (Quantity.UnmarshalJSON)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise QuantityError(f"quantity must be a string or a number, not {type(value).__name__}")
    text = repr(value) if isinstance(value, float) else str(value)
    match = _QUANTITY_RE.match(text.strip())
    if not match:
        raise QuantityError(f"quantities must match the regular expression "
                            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}")
    number, exponent, suffix = match.groups()
    result = Fraction(number)
    if exponent:
        result *= Fraction(10) ** int(exponent[1:])
    else:
        result *= _SUFFIX_VALUE[suffix or ""]
    return result


def _remove_factors(value: int, base: int) -> tuple[int, int]:
    times = 0
    while value != 0 and value % base == 0:
        value //= base
        times += 1
    return value, times


def format_decimal_si(value: Fraction) -> str:
    """Quantity.String() of a DecimalSI quantity (canonical mantissa, exponent a multiple of 3)."""
    if value == 0:
        return "0"
    mantissa, exponent = value * 10**9, -9
    mantissa = math.ceil(mantissa)  # Go keeps nano precision at most, rounding up
    mantissa, times = _remove_factors(mantissa, 10)
    exponent += times
    if exponent % 3 == 1:
        mantissa, exponent = mantissa * 10, exponent - 1
    elif exponent % 3 == 2:
        mantissa, exponent = mantissa * 100, exponent - 2
    suffix = _DECIMAL_SUFFIX.get(exponent)
    return f"{mantissa}{suffix}" if suffix is not None else f"{mantissa}e{exponent}"


def format_binary_si(value: int) -> str:
    """Quantity.String() of a BinarySI integer quantity (falls back to DecimalSI under 1024)."""
    if -1024 < value < 1024:
        return format_decimal_si(Fraction(value))
    mantissa, times = _remove_factors(value, 1024)
    return f"{mantissa}{_BINARY_SUFFIX[times]}"


_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _is_qualified_name(name: str) -> bool:
    prefix, _, short = name.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix)):
        return False
    return 0 < len(short) <= 63 and bool(_QUALIFIED_NAME_RE.match(short))


def is_scalar_resource_name(name: str) -> bool:
    """lifted.IsScalarResourceName: extended resources (nvidia.com/gpu), hugepages, ..."""
    if name.startswith(("hugepages-", "attachable-volumes-")) or "kubernetes.io/" in name:
        return True
    native = "/" not in name
    return not native and not name.startswith("requests.") and _is_qualified_name("requests." + name)


def is_extended_resource_name(name: str) -> bool:
    return "/" in name and "kubernetes.io/" not in name and is_scalar_resource_name(name)


class _Resource:
    """util.Resource: the arithmetic behind Resource.AddPodTemplateRequest."""

    def __init__(self) -> None:
        self.milli_cpu = 0
        self.memory = 0
        self.ephemeral = 0
        self.pods = 0
        self.scalars: dict[str, int] = {}

    def _items(self, resource_list: dict[str, Any]) -> Iterable[tuple[str, Fraction]]:
        for name, raw in (resource_list or {}).items():
            yield name, parse_quantity(raw)

    def add(self, resource_list: dict[str, Any], combine: Callable[[int, int], int] = lambda a, b: a + b) -> None:
        for name, quantity in self._items(resource_list):
            if name == "cpu":
                self.milli_cpu = combine(self.milli_cpu, math.ceil(quantity * 1000))
            elif name == "memory":
                self.memory = combine(self.memory, math.ceil(quantity))
            elif name == "pods":
                self.pods = combine(self.pods, math.ceil(quantity))
            elif name == "ephemeral-storage":
                self.ephemeral = combine(self.ephemeral, math.ceil(quantity))
            elif is_scalar_resource_name(name):
                self.scalars[name] = combine(self.scalars.get(name, 0), math.ceil(quantity))

    def set_max(self, resource_list: dict[str, Any]) -> None:
        self.add(resource_list, max)

    def resource_list(self) -> dict[str, str] | None:
        result = {}
        if self.milli_cpu > 0:
            result["cpu"] = format_decimal_si(Fraction(self.milli_cpu, 1000))
        if self.memory > 0:
            result["memory"] = format_binary_si(self.memory)
        if self.ephemeral > 0:
            result["ephemeral-storage"] = format_binary_si(self.ephemeral)
        if self.pods > 0:
            result["pods"] = format_decimal_si(Fraction(self.pods))
        for name, value in self.scalars.items():
            if value > 0:
                result[name] = format_binary_si(value) if name.startswith("hugepages-") else format_decimal_si(
                    Fraction(value))
        return result or None


def pod_resource_request(pod_spec: dict[str, Any]) -> dict[str, str] | None:
    """Resource.AddPodTemplateRequest(podSpec).ResourceList(): what one replica requests."""

    def requests(container: dict[str, Any]) -> dict[str, Any]:
        resources = container.get("resources") or {}
        merged = dict(resources.get("requests") or {})
        for name, value in (resources.get("limits") or {}).items():
            merged.setdefault(name, value)  # limits without requests default the requests
        return merged

    total = _Resource()
    for container in pod_spec.get("containers") or []:
        total.add(requests(container))
    for container in pod_spec.get("initContainers") or []:
        total.set_max(requests(container))
    total.add(pod_spec.get("overhead") or {})
    return total.resource_list()


# -- Lua <-> JSON, the way luavm/lua_convert.go and gopher-json do it --------------------------


class LuaConversionError(ValueError):
    pass


def _go_struct_schema_errors(data: Any, schema_file: str) -> list[str]:
    """What Go's json.Unmarshal into a Kubernetes struct would reject: wrong types (not unknown
    fields, not missing required fields). Uses the Kubernetes OpenAPI schemas that
    kubernetes-validate bundles."""
    validator = _kubernetes_schema_validator(schema_file)
    bad = []
    for error in validator.iter_errors(data):
        if error.validator in ("type", "oneOf", "anyOf"):
            where = "/".join(str(p) for p in error.absolute_path)
            bad.append(f"{where or '<root>'}: {error.message}")
    return bad


@cache
def _kubernetes_schema_validator(schema_file: str):
    import jsonschema
    from kubernetes_validate import utils as kv
    from referencing import Registry, Resource

    version = [v for v in kv.all_versions() if kv.major_minor(v) <= KUBERNETES_VERSION][-1]
    folder = f"kubernetes-json-schema/v{version}-local"
    schema = kv.schema_contents(f"{folder}/{schema_file}", version)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


# -- the Lua sandbox ---------------------------------------------------------------------------
#
# Karmada runs each script in gopher-lua with: base (minus load, loadstring, dofile, loadfile,
# getmetatable, setmetatable, rawget, rawset, rawequal, setfenv, getfenv, collectgarbage, module,
# newproxy), table, math, a string library without gsub, rep and dump, os with only time and date,
# and require("kube"). Our sandbox offers a subset of that: we also leave out string.format
# (gopher-lua formats with Go's fmt.Sprintf, so C Lua would not tell us what Karmada prints),
# print, package and coroutine. Reading any other global raises, so a script that touches a
# forbidden function fails here even when Karmada would only fail on the code path that calls it.

BASE_FUNCTIONS = ("assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring",
                  "type", "unpack", "xpcall")
STRING_FUNCTIONS = ("byte", "char", "find", "gmatch", "len", "lower", "match", "reverse", "sub", "upper")
FORBIDDEN_GLOBALS = ("load", "loadstring", "dofile", "loadfile", "getmetatable", "setmetatable", "rawget",
                     "rawset", "rawequal", "setfenv", "getfenv", "collectgarbage", "module", "newproxy",
                     "debug", "io", "coroutine", "package")
FORBIDDEN_STRING_FUNCTIONS = ("gsub", "rep", "format", "dump")
KARMADA_CALL_LIMIT_S = 1.0

_SANDBOX_LUA = r"""
local base_names, string_names, kube = ...
local function make_env()
  local env = {}
  for _, name in ipairs(base_names) do env[name] = _G[name] end
  env._G = env
  env._VERSION = _VERSION
  env.table = {concat = table.concat, insert = table.insert, maxn = table.maxn,
               remove = table.remove, sort = table.sort}
  local m = {}
  for k, v in pairs(math) do m[k] = v end
  env.math = m
  local s = {}
  for _, name in ipairs(string_names) do s[name] = string[name] end
  s.gfind = string.gmatch
  env.string = s
  env.os = {time = os.time, date = os.date}
  env.require = function(name)
    if name == "kube" then return kube end
    error("module '" .. tostring(name) .. "' not found: Karmada preloads only kube", 2)
  end
  local assigned = {}
  setmetatable(env, {
    __index = function(_, key)
      error("global '" .. tostring(key) .. "' is not available in Karmada's Lua sandbox", 2)
    end,
    __newindex = function(t, key, value)
      assigned[#assigned + 1] = key
      rawset(t, key, value)
    end,
  })
  return env, assigned
end

local function run(source, chunkname, fn_name, budget_s, nargs, ...)
  local chunk, err = loadstring(source, "=" .. chunkname)
  if chunk == nil then return false, "syntax error: " .. tostring(err), nil, {} end
  local env, assigned = make_env()
  setfenv(chunk, env)
  -- The sandbox's string methods ("x"):sub() go through the string metatable: point it at the
  -- restricted library while the script runs, as gopher-lua does.
  local string_mt = getmetatable("")
  local saved_index = string_mt.__index
  string_mt.__index = env.string
  local deadline = os.clock() + budget_s
  debug.sethook(function()
    if os.clock() > deadline then
      error("call exceeded " .. budget_s .. " s (Karmada stops a call after 1 s)")
    end
  end, "", 1000)
  local args = {...}
  local packed = {pcall(function()
    chunk()
    local fn = rawget(env, fn_name)
    if type(fn) ~= "function" then
      error("the script does not define function " .. fn_name)
    end
    return fn(unpack(args, 1, nargs))
  end)}
  debug.sethook()
  string_mt.__index = saved_index
  local names = {}
  for i, key in ipairs(assigned) do names[i] = tostring(key) end
  return packed[1], packed[2], packed[3], names
end

local function identity(t) return tostring(t) end
return run, identity
"""


class LuaScriptError(RuntimeError):
    """The script raised, timed out, or returned something Karmada cannot convert."""


@dataclass
class LuaCall:
    values: tuple[Any, ...]
    seconds: float
    globals_assigned: list[str]


class KarmadaLua:
    """A real Lua 5.1 runtime (lupa) set up like Karmada's sandbox, with a ``kube`` stand-in.

    Arguments go in the way luavm.decodeValue puts them (JSON objects become tables, nulls vanish,
    numbers are doubles); results come back the way ConvertLuaResultInto reads them (empty nested
    tables dropped, a table seen twice refused, arrays must be dense).
    """

    def __init__(self, *, resource_quota_estimate: bool = False) -> None:
        from lupa import lua51

        self._lua51 = lua51
        self.runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
        self.resource_quota_estimate = resource_quota_estimate
        kube = self._table({})
        kube["accuratePodRequirements"] = self._kube_accurate_pod_requirements
        kube["getPodDependencies"] = self._kube_get_pod_dependencies
        kube["resourceAdd"] = self._kube_resource_add
        kube["getResourceQuantity"] = self._kube_get_resource_quantity
        self.kube_calls: list[str] = []
        run, identity = self.runtime.execute(
            _SANDBOX_LUA, self._table(list(BASE_FUNCTIONS)), self._table(list(STRING_FUNCTIONS)), kube)
        self._run = run
        self._identity = identity

    # Python -> Lua (luavm.decodeValue / gopher-json decode)

    def _table(self, value: Any):
        if isinstance(value, dict):
            table = self.runtime.table()
            for key, item in value.items():
                if item is not None:  # JSON null decodes to nil: the key is absent
                    table[key] = self._table(item)
            return table
        if isinstance(value, (list, tuple)):
            table = self.runtime.table()
            index = 1
            for item in value:
                if item is not None:  # LTable.Append(LNil) is a no-op
                    table[index] = self._table(item)
                    index += 1
            return table
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return float(value) if isinstance(value, float) else int(value)
        raise LuaConversionError(f"cannot pass {type(value).__name__} to Lua")

    def to_lua(self, value: Any):
        return self._table(json.loads(json.dumps(value)))

    # Lua -> Python (ConvertLuaResultInto: prune empty nested tables, then gopher-json encode)

    def _is_table(self, value: Any) -> bool:
        return self._lua51.lua_type(value) == "table"

    def _prune_empty(self, table) -> None:
        for key, value in list(table.items()):
            if self._is_table(value):
                if next(iter(value.items()), None) is None:
                    table[key] = None
                else:
                    self._prune_empty(value)

    def _encode(self, value: Any, seen: set[str]) -> Any:
        lua_type = self._lua51.lua_type(value)
        if lua_type is None:
            if value is None or isinstance(value, (bool, str)):
                return value
            if isinstance(value, (int, float)):
                if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
                    raise LuaConversionError(f"json: unsupported value: {value}")
                return int(value) if float(value).is_integer() and abs(value) < 2**53 else value
            raise LuaConversionError(f"cannot encode {type(value).__name__} to JSON")
        if lua_type != "table":
            raise LuaConversionError(f"cannot encode {lua_type} to JSON")
        identity = self._identity(value)
        if identity in seen:
            raise LuaConversionError("cannot encode a table twice (gopher-json refuses recursively nested "
                                     "or shared tables): copy it before putting it in a second place")
        seen.add(identity)
        items = list(value.items())
        if not items:
            return []
        keys = [key for key, _ in items]
        if all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in keys):
            if sorted(keys) != list(range(1, len(keys) + 1)):
                raise LuaConversionError(f"cannot encode sparse array (keys {sorted(keys)[:8]})")
            ordered = dict(items)
            return [self._encode(ordered[i], seen) for i in range(1, len(keys) + 1)]
        if all(isinstance(k, str) for k in keys):
            return {key: self._encode(item, seen) for key, item in items}
        raise LuaConversionError("cannot encode mixed or invalid key types")

    def from_lua(self, value: Any, *, struct: bool, prune: bool = True) -> Any:
        """ConvertLuaResultInto(value, &target); ``struct`` when the Go target is a struct."""
        if self._is_table(value) and prune:
            self._prune_empty(value)
        data = self._encode(value, set())
        if struct and isinstance(data, list):
            if data:
                raise LuaConversionError("can not unmarshal a JSON array into a struct")
            data = {}
        return data

    # kube library stand-in (luavm/kube.go)

    def _kube_accurate_pod_requirements(self, *args):
        self.kube_calls.append("accuratePodRequirements")
        if len(args) != 1:
            raise LuaScriptError("getPodRequirements only accepts one argument")
        template = self._pod_template_arg(args[0])
        spec = template.get("spec") or {}
        requirements: dict[str, Any] = {}
        node_claim = _node_claim(spec)
        resource_request = pod_resource_request(spec)
        if node_claim is None and resource_request is None:
            return None  # GenerateReplicaRequirements returns nil: the script gets nil
        if node_claim is not None:
            requirements["nodeClaim"] = node_claim
        if resource_request is not None:
            requirements["resourceRequest"] = resource_request
        if self.resource_quota_estimate:
            requirements["namespace"] = (template.get("metadata") or {}).get("namespace") or None
            requirements["priorityClassName"] = spec.get("priorityClassName") or None
        return self.to_lua(requirements)

    def _kube_get_pod_dependencies(self, *args):
        self.kube_calls.append("getPodDependencies")
        if len(args) != 2:
            raise LuaScriptError("getPodDependencies only accepts two argument")
        template = self._pod_template_arg(args[0])
        namespace = args[1]
        if namespace is None:
            namespace = "default"
        elif not isinstance(namespace, (str, int, float)):
            raise LuaScriptError("bad argument #2 to getPodDependencies (string expected)")
        dependencies = pod_dependencies(template.get("spec") or {}, str(namespace))
        return self.to_lua(dependencies) if dependencies else None  # a nil slice encodes as null

    def _kube_resource_add(self, *args):
        self.kube_calls.append("resourceAdd")
        total = Fraction(0)
        for arg in args:
            if arg is None:
                continue
            if not isinstance(arg, str):
                raise LuaScriptError("bad argument to resourceAdd (string expected)")
            total += parse_quantity(arg)
        return format_decimal_si(total)

    def _kube_get_resource_quantity(self, *args):
        self.kube_calls.append("getResourceQuantity")
        if len(args) != 1:
            raise LuaScriptError("getResourceQuantity only accepts one argument")
        if args[0] is None:
            return 0
        if not isinstance(args[0], str):
            raise LuaScriptError("bad argument #1 to getResourceQuantity (string expected)")
        return float(parse_quantity(args[0]))

    def _pod_template_arg(self, value: Any) -> dict[str, Any]:
        if not self._is_table(value):
            raise LuaScriptError("bad argument #1 (table expected)")
        template = self.from_lua(value, struct=True)  # mutates the table like Karmada does
        errors = _go_struct_schema_errors(template, "podtemplatespec-v1.json")
        if errors:
            raise LuaScriptError("fail to convert lua value to PodTemplateSpec: " + "; ".join(errors[:3]))
        spec = template.get("spec") or {}
        for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            for part in ("requests", "limits"):
                for name, raw in ((container.get("resources") or {}).get(part) or {}).items():
                    try:
                        parse_quantity(raw)
                    except QuantityError as e:
                        raise LuaScriptError(f"fail to convert lua value to PodTemplateSpec: {name}: {e}") from e
        return template

    # running scripts

    def call(self, source: str, fn_name: str, *args: Any, chunkname: str = "script",
             budget_s: float = KARMADA_CALL_LIMIT_S) -> LuaCall:
        lua_args = [self.to_lua(arg) if isinstance(arg, (dict, list)) else arg for arg in args]
        start = time.perf_counter()
        ok, first, second, assigned = self._run(source, chunkname, fn_name, budget_s, len(lua_args), *lua_args)
        seconds = time.perf_counter() - start
        if not ok:
            raise LuaScriptError(f"{fn_name}: {first}")
        names = [assigned[i] for i in range(1, len(assigned) + 1)] if assigned is not None else []
        return LuaCall((first, second), seconds, names)

    def defines(self, source: str, fn_name: str) -> str | None:
        """None when the chunk compiles, runs in the sandbox and defines the global function
        ``fn_name`` (without calling it); else why not."""
        probe = f"{source}\nfunction WanProbe__() return type({fn_name}) end\n"
        try:
            result = self.call(probe, "WanProbe__")
        except LuaScriptError as e:
            return f"{fn_name}: {str(e).removeprefix('WanProbe__: ')}"
        kind = result.values[0]
        return None if kind == "function" else f"{fn_name} is a {kind}, not a function"


def _node_claim(spec: dict[str, Any]) -> dict[str, Any] | None:
    """GenerateNodeClaimByPodSpec, after a Go round trip of the fields."""
    node_selector = spec.get("nodeSelector")
    tolerations = [_toleration(t) for t in spec.get("tolerations") or []]
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if node_selector is None and affinity is None and not tolerations:
        return None
    claim: dict[str, Any] = {}
    if affinity is not None:
        claim["hardNodeAffinity"] = affinity
    if node_selector:
        claim["nodeSelector"] = dict(node_selector)
    if tolerations:
        claim["tolerations"] = tolerations
    return claim


def _toleration(raw: dict[str, Any]) -> dict[str, Any]:
    fields_ = ("key", "operator", "value", "effect", "tolerationSeconds")
    return {k: raw[k] for k in fields_ if raw.get(k) not in (None, "")}


def pod_dependencies(spec: dict[str, Any], namespace: str) -> list[dict[str, str]]:
    """helper.GetDependenciesFromPodTemplate: ConfigMaps, Secrets, the ServiceAccount (unless
    "default") and PVCs a pod references, in Karmada's order (kind by kind)."""
    config_maps, secrets, pvcs = set(), set(), set()
    for ref in spec.get("imagePullSecrets") or []:
        if ref.get("name"):
            secrets.add(ref["name"])
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or []),
                  *(spec.get("ephemeralContainers") or [])]
    for container in containers:
        for source in container.get("envFrom") or []:
            if (source.get("configMapRef") or {}).get("name"):
                config_maps.add(source["configMapRef"]["name"])
            if (source.get("secretRef") or {}).get("name"):
                secrets.add(source["secretRef"]["name"])
        for env in container.get("env") or []:
            value_from = env.get("valueFrom") or {}
            if (value_from.get("configMapKeyRef") or {}).get("name"):
                config_maps.add(value_from["configMapKeyRef"]["name"])
            if (value_from.get("secretKeyRef") or {}).get("name"):
                secrets.add(value_from["secretKeyRef"]["name"])
    for volume in spec.get("volumes") or []:
        if (volume.get("configMap") or {}).get("name"):
            config_maps.add(volume["configMap"]["name"])
        if (volume.get("secret") or {}).get("secretName"):
            secrets.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if (source.get("configMap") or {}).get("name"):
                config_maps.add(source["configMap"]["name"])
            if (source.get("secret") or {}).get("name"):
                secrets.add(source["secret"]["name"])
        for kind in ("azureFile",):
            if (volume.get(kind) or {}).get("secretName"):
                secrets.add(volume[kind]["secretName"])
        for kind in ("cephfs", "cinder", "flexVolume", "rbd", "scaleIO", "iscsi", "storageos"):
            if ((volume.get(kind) or {}).get("secretRef") or {}).get("name"):
                secrets.add(volume[kind]["secretRef"]["name"])
        if ((volume.get("csi") or {}).get("nodePublishSecretRef") or {}).get("name"):
            secrets.add(volume["csi"]["nodePublishSecretRef"]["name"])
        if (volume.get("persistentVolumeClaim") or {}).get("claimName"):
            pvcs.add(volume["persistentVolumeClaim"]["claimName"])
    service_accounts = set()
    if spec.get("serviceAccountName") not in (None, "", "default"):
        service_accounts.add(spec["serviceAccountName"])
    result = []
    # Go iterates sets in random order: we hand them out reverse-sorted so that nothing can lean
    # on an order Karmada does not promise.
    for kind, names in (("ConfigMap", config_maps), ("Secret", secrets), ("ServiceAccount", service_accounts),
                        ("PersistentVolumeClaim", pvcs)):
        for name in sorted(names, reverse=True):
            result.append({"apiVersion": "v1", "kind": kind, "namespace": namespace, "name": name})
    return result


# -- selectors, placement and claims ------------------------------------------------------------


def label_selector_matches(selector: dict[str, Any] | None, labels: dict[str, str] | None) -> bool:
    """metav1.LabelSelector semantics (an empty selector matches everything)."""
    labels = labels or {}
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != str(value):
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = [str(v) for v in expression.get("values") or []]
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def cluster_matches(affinity: dict[str, Any] | None, cluster: Cluster) -> bool:
    """util.ClusterMatches: exclude, labelSelector, fieldSelector and clusterNames, ANDed."""
    affinity = affinity or {}
    if cluster.name in (affinity.get("exclude") or []):
        return False
    if affinity.get("labelSelector") is not None and not label_selector_matches(affinity["labelSelector"],
                                                                               cluster.labels):
        return False
    for expression in (affinity.get("fieldSelector") or {}).get("matchExpressions") or []:
        have = cluster.fields.get(expression.get("key"), ())
        values = expression.get("values") or []
        if expression.get("operator") == "In" and not any(v in values for v in have):
            return False
        if expression.get("operator") == "NotIn" and any(v in values for v in have):
            return False
    names = affinity.get("clusterNames") or []
    return not names or cluster.name in names


def tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    """corev1.Toleration.ToleratesTaint."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("key") and toleration["key"] != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or "")


def untolerated(taints: Iterable[dict[str, Any]], tolerations: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The NoSchedule / NoExecute taints that no toleration covers (what blocks scheduling)."""
    return [t for t in taints if t.get("effect") in ("NoSchedule", "NoExecute")
            and not any(tolerates(tol, t) for tol in tolerations or [])]


def taint_text(taint: dict[str, Any]) -> str:
    value = f"={taint['value']}" if taint.get("value") else ""
    return f"{taint.get('key')}{value}:{taint.get('effect')}"


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
class World:
    """The shipped manifests as Karmada would see them in its API server."""

    manifests: list[Manifest]
    crds: CrdSchemas
    clusters: tuple[Cluster, ...] = CLUSTERS
    _lua: KarmadaLua | None = field(default=None, repr=False)
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

    @property
    def lua(self) -> KarmadaLua:
        if self._lua is None:
            self._lua = KarmadaLua()
        return self._lua

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


# -- overrides ------------------------------------------------------------------------------------


class OverrideError(ValueError):
    """Karmada would fail to apply the override (and the Work for that cluster is not created)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


def json_pointer(path: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise OverrideError(f"path {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise OverrideError(f"{path}: no such path in the object (stops at {part!r})")
    return node


def json_patch(doc: dict[str, Any], op: str, path: str, value: Any = None) -> None:
    """RFC 6902 add / remove / replace as evanphx/json-patch applies them."""
    parts = json_pointer(path)
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if op == "add":
        if isinstance(parent, dict):
            parent[last] = copy.deepcopy(value)
        elif isinstance(parent, list) and (last == "-" or (last.isdigit() and int(last) <= len(parent))):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(value))
        else:
            raise OverrideError(f"{path}: cannot add here")
    elif op in ("remove", "replace"):
        if isinstance(parent, dict) and last in parent:
            if op == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(value)
        elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            if op == "remove":
                parent.pop(int(last))
            else:
                parent[int(last)] = copy.deepcopy(value)
        else:
            raise OverrideError(f"{path}: {op} of a path that does not exist")
    else:
        raise OverrideError(f"unknown operator {op!r}")


@dataclass
class Image:
    """imageparser.Components: [hostname/]repository[:tag|@digest]."""

    hostname: str
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, image: str) -> Image:
        if not isinstance(image, str) or not image:
            raise OverrideError(f"not an image reference: {image!r}")
        first, slash, rest = image.partition("/")
        if slash and (any(c in first for c in ".:") or first == "localhost"):
            hostname, remainder = first, rest
        else:
            hostname, remainder = "", image
        remainder, _, digest = remainder.partition("@")
        name, colon, tag = remainder.rpartition(":")
        if not colon or "/" in tag:
            name, tag = remainder, ""
        return cls(hostname, name, tag, digest)

    def __str__(self) -> str:
        out = f"{self.hostname}/{self.repository}" if self.hostname else self.repository
        if self.digest:
            return f"{out}@{self.digest}"
        return f"{out}:{self.tag}" if self.tag else out

    @property
    def registry(self) -> str:
        return self.hostname or "docker.io"


NATIVE_POD_PATHS = {"Pod": ("spec",), "Deployment": ("spec", "template", "spec"),
                    "ReplicaSet": ("spec", "template", "spec"), "DaemonSet": ("spec", "template", "spec"),
                    "StatefulSet": ("spec", "template", "spec"), "Job": ("spec", "template", "spec")}


def _override_image(current: str, overrider: dict[str, Any]) -> str:
    image = Image.parse(current)
    component, operator, value = overrider.get("component"), overrider.get("operator"), overrider.get("value", "")
    attr = {"Registry": "hostname", "Repository": "repository", "Tag": "tag"}.get(component)
    if attr is None:
        raise OverrideError(f"unsupported image component {component!r}")
    if attr == "tag" and image.digest:
        image.digest = ""
    if operator == "add":
        setattr(image, attr, getattr(image, attr) + value)
    elif operator == "replace":
        setattr(image, attr, value)
    elif operator == "remove":
        setattr(image, attr, "")
    else:
        raise OverrideError(f"unsupported operator {operator!r}")
    return str(image)


def apply_overriders(doc: dict[str, Any], overriders: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Applies one rule's overriders in Karmada's order (image, command, args, labels,
    annotations, field, plaintext). Returns (path, note) for overriders that do nothing;
    raises OverrideError where Karmada would fail."""
    notes: list[tuple[str, str]] = []
    kind = doc.get("kind", "")
    for i, image in enumerate(overriders.get("imageOverrider") or []):
        path = f"{where}/imageOverrider/{i}"
        predicate = (image.get("predicate") or {}).get("path")
        if predicate:
            try:
                current = _resolve(doc, json_pointer(predicate), predicate)
                if not isinstance(current, str):
                    raise OverrideError(f"{predicate} is not a string (imageOverrider needs an image there)")
                json_patch(doc, "replace", predicate, _override_image(current, image))
            except OverrideError as e:
                raise OverrideError(str(e), f"{path}/predicate/path") from e
        elif kind in NATIVE_POD_PATHS:
            pod = doc
            for key in NATIVE_POD_PATHS[kind]:
                pod = (pod or {}).get(key) or {}
            for container in pod.get("containers") or []:
                container["image"] = _override_image(container.get("image", ""), image)
        else:
            notes.append((path, f"imageOverrider without predicate.path does nothing for a {kind}"))
    for name in ("commandOverrider", "argsOverrider"):
        if overriders.get(name) and kind not in NATIVE_POD_PATHS:
            notes.append((f"{where}/{name}", f"{name} does nothing for a {kind}"))
    for name, key in (("labelsOverrider", "labels"), ("annotationsOverrider", "annotations")):
        for i, overrider in enumerate(overriders.get(name) or []):
            metadata = doc.setdefault("metadata", {})
            operator = overrider.get("operator")
            for item_key, value in (overrider.get("value") or {}).items():
                existing = metadata.get(key) or {}
                if operator in ("remove", "replace") and item_key not in existing:
                    note = f"{operator} of {key[:-1]} {item_key!r}, which the {kind} does not have: Karmada skips it"
                    notes.append((f"{where}/{name}/{i}", note))
                    continue
                if operator == "remove":
                    del existing[item_key]
                elif operator in ("add", "replace"):
                    metadata.setdefault(key, {})[item_key] = value
                else:
                    raise OverrideError(f"unknown operator {operator!r}", f"{where}/{name}/{i}")
    if overriders.get("fieldOverrider"):
        notes.append((f"{where}/fieldOverrider", "fieldOverrider is not simulated by this validator"))
    for i, op in enumerate(overriders.get("plaintext") or []):
        try:
            json_patch(doc, op.get("operator"), op.get("path"), op.get("value"))
        except OverrideError as e:
            raise OverrideError(str(e), f"{where}/plaintext/{i}") from e
    return notes


def override_rules(world: World, obj: Manifest, cluster: Cluster) -> list[tuple[Manifest, str, dict[str, Any]]]:
    """(policy, path, overriders) that apply to ``obj`` in ``cluster``, in the order Karmada applies
    them: ClusterOverridePolicies, then OverridePolicies, each from the least to the most precise
    selection (ties by name), rules in order."""
    def key(policy: Manifest) -> tuple[int, int, str]:
        return (0 if policy.kind == "ClusterOverridePolicy" else 1, selection_precision(policy, obj), policy.name)

    out = []
    for policy in sorted((p for p in world.overrides if selection_precision(p, obj)), key=key):
        rules = policy.get("spec", "overrideRules")
        if rules is None and policy.get("spec", "overriders") is not None:  # deprecated form
            rules = [{"targetCluster": policy.get("spec", "targetCluster"), "overriders": policy.get("spec",
                                                                                                     "overriders")}]
            base = "/spec"
        else:
            base = "/spec/overrideRules"
        for i, rule in enumerate(rules or []):
            target = rule.get("targetCluster")
            if target is None or cluster_matches(target, cluster):
                path = f"{base}/{i}/overriders" if base.endswith("Rules") else "/spec/overriders"
                out.append((policy, path, rule.get("overriders") or {}))
    return out


def effective(world: World, obj: Manifest, cluster: Cluster) -> tuple[dict[str, Any], list[Problem]]:
    """The object as Karmada writes it into ``cluster``: the template with every matching
    override applied. Problems name the override that fails or does nothing."""
    doc = copy.deepcopy(obj.doc)
    problems = []
    for policy, path, overriders in override_rules(world, obj, cluster):
        try:
            for note_path, note in apply_overriders(doc, overriders, path):
                problems.append(Problem(policy, note_path, f"{describe(obj)} in {cluster.name}: {note}"))
        except OverrideError as e:
            problems.append(Problem(policy, e.where or path, f"{describe(obj)} in {cluster.name}: Karmada cannot "
                                                             f"apply this override: {e}"))
    return doc, problems


# -- static look at the Lua ---------------------------------------------------------------------


def _strip_lua_comments_and_strings(source: str) -> str:
    out, i, n = [], 0, len(source)
    while i < n:
        if source.startswith("--", i):
            long = re.match(r"--\[(=*)\[", source[i:i + 64])
            if long:
                end = source.find("]" + long.group(1) + "]", i)
                i = n if end < 0 else end + len(long.group(1)) + 2
            else:
                end = source.find("\n", i)
                i = n if end < 0 else end
            continue
        char = source[i]
        if char in "'\"":
            j = i + 1
            while j < n and source[j] != char:
                j += 2 if source[j] == "\\" else 1
            out.append('""')
            i = j + 1
            continue
        long = re.match(r"\[(=*)\[", source[i:i + 64])
        if long:
            end = source.find("]" + long.group(1) + "]", i)
            out.append('""')
            i = n if end < 0 else end + len(long.group(1)) + 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def lua_forbidden_references(source: str) -> list[str]:
    """Names a script uses that Karmada's sandbox does not offer (or that behave differently in
    gopher-lua), found in the code itself, not in comments or strings."""
    code = _strip_lua_comments_and_strings(source)
    found = []
    for name in FORBIDDEN_GLOBALS:
        # A read or call of the global, not a table field ({load = 1}, t.load).
        if re.search(rf"(?<![.:\w]){name}\b(?!\s*=[^=])", code):
            found.append(name)
    for name in FORBIDDEN_STRING_FUNCTIONS:
        if re.search(rf"\bstring\s*\.\s*{name}\b", code) or re.search(rf":\s*{name}\s*\(", code):
            found.append(f"string.{name}")
    for name in re.findall(r"(?<![.:\w])os\s*\.\s*(\w+)", code):
        if name not in ("time", "date"):
            found.append(f"os.{name}")
    return sorted(set(found))


# -- the checks -----------------------------------------------------------------------------------

S3_SECRET_ANNOTATION = "wan.serving/s3-credentials-secret"
DEFAULT_S3_SECRET = "wan-s3-credentials"
S3_ENDPOINT_ANNOTATION = "serving.kserve.io/s3-endpoint"
KSERVE_DEFAULT_S3_ENDPOINT = "s3.amazonaws.com"


def _world(manifests: list[Manifest], context: Context) -> World:
    """One World per validation run, shared by the checks (the Lua runtime is built once)."""
    cached = context.extra.get("karmada.world")
    if cached is None or cached[0] is not manifests:
        cached = (manifests, World(manifests, context.crds))
        context.extra["karmada.world"] = cached
    return cached[1]


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
    probe = Manifest(Path("."), 0, {"apiVersion": api_version, "kind": kind})
    if world.crds.knows(probe):
        return "Cluster" if world.crds.is_cluster_scoped(probe) else "Namespaced"
    group = api_version.rpartition("/")[0]
    if "." not in group or group.endswith(".k8s.io"):  # core groups: "", apps, batch, *.k8s.io
        return "Cluster" if (api_version, kind) in CLUSTER_SCOPED_CORE_KINDS else "Namespaced"
    return None


def check_policy_selectors(manifests: list[Manifest], context: Context) -> list[Problem]:
    """Every resourceSelector of every (Cluster)Propagation/OverridePolicy selects an object we ship,
    in a namespace the policy can see; no object is claimed by two equally ranked policies."""
    world = _world(manifests, context)
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


def check_policy_scope(manifests: list[Manifest], context: Context) -> list[Problem]:
    """PropagationPolicy/OverridePolicy select namespaced kinds, ClusterPropagationPolicy/
    ClusterOverridePolicy select cluster-scoped kinds (one policy kind per scope, so a namespaced
    object is never claimed from two scopes), and every selected kind is known."""
    world = _world(manifests, context)
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


def check_placements(manifests: list[Manifest], context: Context) -> list[Problem]:
    """What karmada-webhook would reject, and placements that can never be satisfied by our
    clusters: every cluster group matches at least one cluster, overflowAffinities come with
    capacity-aware Divided scheduling, application failover comes with propagateDeps and with
    a health interpreter, Divided scheduling comes with replicas."""
    world = _world(manifests, context)
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
            if not _is_qualified_name(name):
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
            crd_kind = world.crds.knows(Manifest(Path("."), 0, {"apiVersion": kind_key[0], "kind": kind_key[1]}))
            if not crd_kind:
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


def check_override_targets(manifests: list[Manifest], context: Context) -> list[Problem]:
    """Every override rule targets clusters we have, and clusters where the objects it overrides
    can actually be placed; every overridden object is placed by some policy."""
    world = _world(manifests, context)
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


def check_effective_objects(manifests: list[Manifest], context: Context) -> list[Problem]:
    """Applies the overrides of every placed object for every cluster it can land on, as Karmada
    would: overrides that fail (missing path, no image at the predicate path) or do nothing are
    reported, and the overridden object must still pass its schema."""
    from scripts.validate_manifests import validate_schemas

    world = _world(manifests, context)
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
    return _dedupe(problems)


def check_interpreters(manifests: list[Manifest], context: Context) -> list[Problem]:
    """Each ResourceInterpreterCustomization targets a kind we ship (once), the InferenceService one
    provides every customization Karmada needs, and every script compiles, defines its entry
    point in Karmada's sandbox and uses nothing the sandbox lacks."""
    world = _world(manifests, context)
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


@dataclass
class Interpretation:
    replicas: int | None = None
    requirement: dict[str, Any] | None = None
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (customization, message)


def interpret(world: World, obj: Manifest) -> Interpretation:
    """Runs GetReplicas and GetDependencies on a shipped object, as Karmada would."""
    key = (obj.path, obj.index)
    cache = world._interpretations
    if key in cache:
        return cache[key]
    result = Interpretation()
    lua = world.lua
    script = world.script(obj.api_version, obj.kind, "replicaResource")
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
    script = world.script(obj.api_version, obj.kind, "dependencyInterpretation")
    if script:
        try:
            call = lua.call(script, "GetDependencies", copy.deepcopy(obj.doc))
            dependencies = lua.from_lua(call.values[0], struct=False) if call.values[0] is not None else []
            if not isinstance(dependencies, list):
                raise LuaScriptError("GetDependencies must return a list")
            result.dependencies = dependencies
        except (LuaScriptError, LuaConversionError) as e:
            result.errors.append(("dependencyInterpretation", str(e)))
    cache[key] = result
    return result


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


def check_interpreted_services(manifests: list[Manifest], context: Context) -> list[Problem]:
    """Runs the interpreter on every InferenceService we ship: replicas >= 1 with valid GPU
    requirements, ReviseReplica results that pass the CRD schema for every share, and
    dependencies we ship that reach every cluster the service can land on."""
    import jsonschema

    from scripts.validate_manifests import validate_schemas

    world = _world(manifests, context)
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
        result = interpret(world, obj)
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


def _runtime_for(world: World, obj: Manifest, runtime: str | None) -> Manifest | None:
    if not runtime:
        return None
    return world.find(*SERVING_RUNTIME, obj.namespace, runtime) or world.find(*CLUSTER_SERVING_RUNTIME, None, runtime)


def _runtime_image(world: World, runtime: Manifest, cluster: Cluster) -> str | None:
    doc, _ = effective(world, runtime, cluster)
    containers = (doc.get("spec") or {}).get("containers") or []
    chosen = next((c for c in containers if c.get("name") == "kserve-container"), containers[0] if containers else {})
    return chosen.get("image")


def check_services_runnable(manifests: list[Manifest], context: Context) -> list[Problem]:
    """For every InferenceService and every cluster its placement may pick, after the overrides for
    that cluster: its runtime is there, its image comes from a registry the cluster can pull from,
    its models from storage the cluster can reach (the PVC is placed there, the S3 endpoint is
    reachable), its pods fit the cluster's GPU nodes (node selector, taints), and the
    scheduler-estimator, which only sees the template, can count those GPU nodes."""
    world = _world(manifests, context)
    problems: list[Problem] = []
    for obj in world.templates:
        if (obj.api_version, obj.kind) != INFERENCE_SERVICE:
            continue
        claim, _ = world.claim(obj)
        if claim is None or world.interpreter_for(*INFERENCE_SERVICE) is None:
            continue  # reported by check_interpreted_services
        requirement = interpret(world, obj).requirement or {}
        wants_gpu = any(is_extended_resource_name(n) for n in (requirement.get("resourceRequest") or {}))
        for name in sorted(world.choosable(claim)):
            cluster = world.cluster(name)
            doc, _ = effective(world, obj, cluster)
            problems.extend(_runnable_in(world, obj, doc, cluster, requirement, wants_gpu))
    return _dedupe(problems)


def _runnable_in(world: World, obj: Manifest, doc: dict[str, Any], cluster: Cluster,
                 requirement: dict[str, Any], wants_gpu: bool) -> list[Problem]:
    problems = []
    predictor = (doc.get("spec") or {}).get("predictor") or {}
    model = predictor.get("model") or {}
    where = f"{describe(obj)} in {cluster.name}"
    runtime = _runtime_for(world, obj, model.get("runtime"))
    if model.get("runtime") and runtime is None:
        problems.append(Problem(obj, "/spec/predictor/model/runtime",
                                f"runtime {model['runtime']!r}: no ServingRuntime in {obj.namespace} nor "
                                f"ClusterServingRuntime of that name is shipped"))
    elif runtime is not None and not world.reaches(runtime, cluster.name, carried_by=obj):
        problems.append(Problem(obj, "/spec/predictor/model/runtime",
                                f"{where}: runtime {describe(runtime)} is never placed in {cluster.name}"))
    image = model.get("image") or (_runtime_image(world, runtime, cluster) if runtime is not None else None)
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


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for problem in problems:
        key = (problem.manifest.label if problem.manifest else "", problem.where, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


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

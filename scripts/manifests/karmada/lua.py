"""A Lua 5.1 sandbox (lupa) that runs our ResourceInterpreterCustomization the way
karmada-controller-manager does, with the ``kube`` library Karmada preloads, and a static look at
the scripts for what the sandbox lacks.

Sources (Karmada v1.18, gopher-lua v1.1.1):
- Lua VM: ``pkg/resourceinterpreter/customized/declarative/luavm/{lua.go,kube.go,lua_convert.go}``,
  ``pkg/util/lifted/lua/*`` (sandbox), layeh.com/gopher-json (Lua <-> JSON).
- ``kube.accuratePodRequirements``: ``pkg/util/helper`` ``GenerateReplicaRequirements`` and
  ``pkg/util`` ``Resource.AddPodTemplateRequest`` (limits default requests, init containers are
  maxed, overhead added, canonical quantities).
- ``kube.getPodDependencies``: ``pkg/util/helper`` ``GetDependenciesFromPodTemplate``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Any

import jsonschema
from kubernetes_validate import utils as kubernetes_schemas
from lupa import lua51
from referencing import Registry, Resource

from scripts.manifests.kube import (
    QuantityError,
    format_binary_si,
    format_decimal_si,
    is_scalar_resource_name,
    parse_quantity,
)
from scripts.manifests.schemas import KUBERNETES_VERSION

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


# -- what one replica requests (util.Resource) ----------------------------------------------------


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
    version = [v for v in kubernetes_schemas.all_versions()
               if kubernetes_schemas.major_minor(v) <= KUBERNETES_VERSION][-1]
    folder = f"kubernetes-json-schema/v{version}-local"
    schema = kubernetes_schemas.schema_contents(f"{folder}/{schema_file}", version)
    definitions = kubernetes_schemas.schema_contents(f"{folder}/_definitions.json", version)
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

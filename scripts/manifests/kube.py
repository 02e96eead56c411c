"""Kubernetes and KServe semantics that several checks need, each written once: quantities
(exact, the full ``resource.Quantity`` grammar), Go durations, resource names, the serving
runtime an InferenceService uses, and the predictor pod KServe builds from the two (the
KServe checks, the Karmada checks and the security scan all read this one rendering).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

from scripts.manifests.core import Manifest

KSERVE_GROUP = "serving.kserve.io"
INFERENCE_SERVICE = ("serving.kserve.io/v1beta1", "InferenceService")
SERVING_RUNTIME = ("serving.kserve.io/v1alpha1", "ServingRuntime")
CLUSTER_SERVING_RUNTIME = ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
RUNTIME_KINDS = (SERVING_RUNTIME[1], CLUSTER_SERVING_RUNTIME[1])
# The runtime container KServe merges the predictor's model fields into.
CONTAINER_NAME = "kserve-container"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def as_int(value: Any) -> int | None:
    """An integer or a string of digits (how manifests write counts); bool is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        return int(value)
    return None


def duration_s(text: Any) -> float | None:
    """A Go duration (``1800s``, ``30m``, ``1h30m``) in seconds; None when it is not one."""
    text = str(text).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    factor = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * factor[u] for n, u in parts)


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


def is_qualified_name(name: str) -> bool:
    prefix, _, short = name.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix)):
        return False
    return 0 < len(short) <= 63 and bool(_QUALIFIED_NAME_RE.match(short))


def is_scalar_resource_name(name: str) -> bool:
    """lifted.IsScalarResourceName: extended resources (nvidia.com/gpu), hugepages, ..."""
    if name.startswith(("hugepages-", "attachable-volumes-")) or "kubernetes.io/" in name:
        return True
    native = "/" not in name
    return not native and not name.startswith("requests.") and is_qualified_name("requests." + name)


def is_extended_resource_name(name: str) -> bool:
    return "/" in name and "kubernetes.io/" not in name and is_scalar_resource_name(name)



def quantity(value: Any) -> Fraction | None:
    """``parse_quantity`` for checks that only compare: None when the value is not a quantity."""
    try:
        return parse_quantity(value)
    except QuantityError:
        return None


# -- the serving runtime and the predictor pod ----------------------------------------------------


def find_runtime(manifests: Iterable[Manifest], name: str, namespace: str | None) -> Manifest | None:
    """The runtime KServe resolves ``name`` to for a service in ``namespace``: a ServingRuntime
    of the service's namespace first, else the ClusterServingRuntime of that name."""
    manifests = list(manifests)
    for m in manifests:
        if (m.api_version, m.kind) == SERVING_RUNTIME and m.name == name and \
                (m.namespace or None) == (namespace or None):
            return m
    return next((m for m in manifests if (m.api_version, m.kind) == CLUSTER_SERVING_RUNTIME and m.name == name),
                None)


def runtime_of(manifests: Iterable[Manifest], isvc: Manifest) -> Manifest | None:
    name = isvc.get("spec", "predictor", "model", "runtime")
    return find_runtime(manifests, str(name), isvc.namespace) if name else None


# The fields of KServe's ModelSpec that are the container's (the rest says which model to load).
_CONTAINER_FIELDS = {
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name",
    "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy", "restartPolicyRules",
    "securityContext", "startupProbe", "stdin", "stdinOnce", "terminationMessagePath",
    "terminationMessagePolicy", "tty", "volumeDevices", "volumeMounts", "workingDir",
}
# The fields of the predictor (and of a runtime's spec) that are the pod's.
_POD_FIELDS = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig", "dnsPolicy",
    "enableServiceLinks", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname",
    "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead", "preemptionPolicy",
    "priority", "priorityClassName", "readinessGates", "resourceClaims", "runtimeClassName", "schedulerName",
    "schedulingGates", "securityContext", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
    "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes",
}
# Lists that Kubernetes' strategic merge merges item by item, by this key (others are replaced).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumeMounts": "mountPath",
               "volumes": "name", "ports": "containerPort", "imagePullSecrets": "name"}


def strategic_merge(base: Any, override: Any, key: str | None = None) -> Any:
    """``override`` over ``base`` as Kubernetes' strategic merge does it for pods: maps merged
    key by key, the lists in ``_MERGE_KEYS`` item by item, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for k, value in override.items():
            merged[k] = strategic_merge(base[k], value, k) if k in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key in _MERGE_KEYS:
        merge_key = _MERGE_KEYS[key]
        merged = copy.deepcopy(base)
        for item in override:
            at = next((i for i, existing in enumerate(merged) if isinstance(existing, dict) and isinstance(item, dict)
                       and existing.get(merge_key) == item.get(merge_key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = strategic_merge(merged[at], item)
        return merged
    return copy.deepcopy(override)


def render_predictor_pod(isvc: dict[str, Any], runtime: dict[str, Any] | None) -> dict[str, Any]:
    """The predictor pod KServe builds from an InferenceService (``spec.predictor.model``) and its
    serving runtime (None: unknown), as far as our manifests decide it. The containers KServe and
    Knative add themselves (storage-initializer, queue-proxy) are configured cluster-wide and not
    rendered."""
    meta = isvc.get("metadata") or {}
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    runtime_spec = (runtime or {}).get("spec") or {}
    model = predictor.get("model") or {}
    model_container = {k: v for k, v in model.items() if k in _CONTAINER_FIELDS}
    model_container["name"] = CONTAINER_NAME

    runtime_pod = {k: v for k, v in runtime_spec.items() if k in _POD_FIELDS}
    runtime_pod["containers"] = runtime_spec.get("containers") or []
    predictor_pod = {k: v for k, v in predictor.items() if k in _POD_FIELDS}
    predictor_pod["containers"] = [model_container, *(predictor.get("containers") or [])]
    spec = strategic_merge(runtime_pod, predictor_pod)

    labels = {**(meta.get("labels") or {}), **(runtime_spec.get("labels") or {}), **(predictor.get("labels") or {}),
              "serving.kserve.io/inferenceservice": meta.get("name"), "component": "predictor"}
    annotations = {**(runtime_spec.get("annotations") or {}), **(predictor.get("annotations") or {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{meta.get('name')}-predictor", "namespace": meta.get("namespace"),
                     "labels": labels, "annotations": annotations},
        "spec": spec,
    }


def named_container(containers: Iterable[Any], name: str = CONTAINER_NAME) -> tuple[int, dict[str, Any]] | None:
    """(index, container) of the container called ``name``."""
    return next(((i, c) for i, c in enumerate(containers or []) if isinstance(c, dict) and c.get("name") == name),
                None)


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e.get("name"): str(e.get("value", "")) for e in container.get("env") or [] if isinstance(e, dict)}


def pod_template(manifest: Manifest) -> tuple[str, dict[str, Any]] | None:
    """(path, template) of a workload's pod template; None for anything else."""
    if manifest.kind in WORKLOAD_KINDS and manifest.group == "apps":
        return "/spec/template", manifest.get("spec", "template", default={}) or {}
    if manifest.kind == "Job" and manifest.group == "batch":
        return "/spec/template", manifest.get("spec", "template", default={}) or {}
    return None


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[Manifest, str, dict[str, Any]]]:
    """(workload, path of its pod spec, pod spec) of every workload among ``manifests``."""
    for workload in manifests:
        found = pod_template(workload)
        if found is not None:
            base, template = found
            yield workload, f"{base}/spec", template.get("spec") or {}

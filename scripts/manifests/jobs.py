"""Cross-checks for the job service's manifests (jobs/deploy/): what the CRD schemas cannot say
about the API and worker Deployments, their CloudNativePG database, KEDA's autoscaling and the
job service's own configuration.

- Secrets: every Secret a workload or a TriggerAuthentication reads, by name and key, is one we
  ship or one a CloudNativePG Cluster of that namespace creates (``<cluster>-app``: username,
  password, host, port, dbname, uri, ...); a typo there is a pod stuck in CreateContainerConfigError.
- The API (``python -m jobs serve``): its probes and Prometheus annotation hit paths and the port
  it serves (the routes read from jobs/app.py, statically: the validator does not import the job
  service), liveness on /healthz and readiness on /readyz; a Service selects it.
- The worker (``python -m jobs worker``): no Service selects it (nothing calls a worker), and its
  metrics port is the one it is started with.
- KEDA: a ScaledObject scales a Deployment we ship, through a TriggerAuthentication we ship; a
  postgresql trigger has a query and a non-zero targetQueryValue, and takes its connection from
  the TriggerAuthentication (KEDA ignores a ``connection`` in plain metadata).
- The configuration (``JOBS_CONFIG``): it lies in a mounted ConfigMap we ship and parses; each
  model's ``model_config`` is a file of config/models/ (the image carries that folder at
  ``IMAGE_CONFIG_DIR``); an endpoint at an InferenceService's cluster-local address names one we
  ship, of the model's variant, asks no more in flight than the service runs at once
  (maxReplicas x containerConcurrency) and waits at least the service's timeout.
- Private only (when Karmada's policies are among the manifests): every object of the job
  service's namespace, its database first, is placed by a policy that can choose private
  clusters only; its Namespace skips Karmada's namespace sync (which would create it on every
  member) and is placed the same way. Job records, prompts and results stay in the data centre.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from scripts.manifests.context import Context
from scripts.manifests.core import Manifest, Problem, of_kind
from scripts.manifests.kube import INFERENCE_SERVICE, as_int, pod_specs

CNPG_CLUSTER = ("postgresql.cnpg.io/v1", "Cluster")
SCALED_OBJECT = ("keda.sh/v1alpha1", "ScaledObject")
TRIGGER_AUTHENTICATION = ("keda.sh/v1alpha1", "TriggerAuthentication")
# The keys of the Secret CloudNativePG writes for a Cluster's application user (v1.30).
CNPG_APP_SECRET_KEYS = {"username", "password", "host", "port", "dbname", "uri", "jdbc-uri", "pgpass",
                        "fqdn-uri", "fqdn-jdbc-uri"}
API_SOURCE = Path("jobs") / "app.py"
LIVENESS_PATH, READINESS_PATH, METRICS_PATH = "/healthz", "/readyz", "/metrics"
# Where the jobs image carries config/ (the Dockerfile's jobs target copies config/models/ there).
IMAGE_CONFIG_DIR = PurePosixPath("/opt/wan-jobs/config")
VARIANT_LABEL = "wan.serving/variant"
TIER_LABEL, PRIVATE_TIER = "wan.serving/tier", "private"
# Karmada's namespace sync creates every namespace on every member cluster unless it carries this.
SKIP_NAMESPACE_SYNC = "namespace.karmada.io/skip-auto-propagation"
_CLUSTER_LOCAL = re.compile(r"^(?P<name>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local$")


def jobs_command(container: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(subcommand, arguments) when the container runs ``python -m jobs <subcommand>``."""
    words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
    for i in range(len(words) - 2):
        if words[i + 1:i + 3] == ["-m", "jobs"] and "python" in words[i]:
            rest = words[i + 3:]
            return (rest[0] if rest else None), rest[1:]
    return None, []


def _option(args: list[str], name: str) -> str | None:
    for i, word in enumerate(args):
        if word == name and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _containers(manifests: list[Manifest]):
    """(workload, path of its pod spec, pod spec, container index, container) of every workload."""
    for workload, pod_path, pod in pod_specs(manifests):
        for kind in ("initContainers", "containers"):
            for index, container in enumerate(pod.get(kind) or []):
                if isinstance(container, dict):
                    yield workload, pod_path, pod, f"{kind}/{index}", container


def api_routes(repo_root: Path) -> set[str] | None:
    """The paths jobs/app.py routes (``@app.get("/healthz")`` ...), read without importing it;
    None when the file is missing."""
    try:
        tree = ast.parse((repo_root / API_SOURCE).read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    routes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr in ("get", "post", "put", "delete", "patch", "head")
                        and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                    routes.add(str(decorator.args[0].value))
    return routes


# -- secrets ------------------------------------------------------------------------------------


def _provided_secrets(manifests: list[Manifest]) -> dict[tuple[str | None, str], set[str] | None]:
    """(namespace, name) -> its keys (None: any key) of every Secret we ship or an operator creates."""
    provided: dict[tuple[str | None, str], set[str] | None] = {}
    for secret in of_kind(manifests, "Secret"):
        keys = set(secret.get("data", default={}) or {}) | set(secret.get("stringData", default={}) or {})
        provided[(secret.namespace, secret.name)] = keys or None  # keys added out of band (kubectl create)
    for cluster in manifests:
        if (cluster.api_version, cluster.kind) == CNPG_CLUSTER:
            provided[(cluster.namespace, f"{cluster.name}-app")] = CNPG_APP_SECRET_KEYS
            if cluster.get("spec", "enableSuperuserAccess"):
                provided[(cluster.namespace, f"{cluster.name}-superuser")] = CNPG_APP_SECRET_KEYS
    return provided


def _secret_problem(manifest: Manifest, where: str, name: Any, key: Any,
                    provided: dict[tuple[str | None, str], set[str] | None]) -> list[Problem]:
    if (manifest.namespace, name) not in provided:
        clusters = sorted(n.removesuffix("-app") for (ns, n) in provided if ns == manifest.namespace
                          and n.endswith("-app"))
        hint = f" (a CloudNativePG Cluster here creates {', '.join(c + '-app' for c in clusters)})" if clusters else ""
        return [Problem(manifest, where, f"reads Secret {name!r}, which neither we ship nor an operator creates in "
                                         f"namespace {manifest.namespace}{hint}")]
    keys = provided[(manifest.namespace, name)]
    if key is not None and keys is not None and key not in keys:
        return [Problem(manifest, where, f"Secret {name!r} has no key {key!r} (it has {', '.join(sorted(keys))})")]
    return []


def check_secret_references(context: Context) -> list[Problem]:
    manifests = context.manifests
    if not any((m.api_version, m.kind) in (CNPG_CLUSTER, TRIGGER_AUTHENTICATION) for m in manifests):
        return []  # the job service's layer is not among these manifests
    provided = _provided_secrets(manifests)
    problems = []
    for workload, pod_path, _, container_path, container in _containers(manifests):
        if workload.namespace is None or not any(ns == workload.namespace for ns, _ in provided):
            continue
        for i, env in enumerate(container.get("env") or []):
            ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef")
            if isinstance(ref, dict):
                problems += _secret_problem(workload, f"{pod_path}/{container_path}/env/{i}/valueFrom/secretKeyRef",
                                            ref.get("name"), ref.get("key"), provided)
    for auth in manifests:
        if (auth.api_version, auth.kind) != TRIGGER_AUTHENTICATION:
            continue
        for i, ref in enumerate(auth.get("spec", "secretTargetRef", default=[]) or []):
            problems += _secret_problem(auth, f"/spec/secretTargetRef/{i}", ref.get("name"), ref.get("key"), provided)
    return problems


# -- the API and the worker ---------------------------------------------------------------------


def _selected_by_service(workload: Manifest, manifests: list[Manifest]) -> list[Manifest]:
    labels = (workload.get("spec", "template", "metadata", "labels", default={}) or {})
    return [s for s in of_kind(manifests, "Service") if s.namespace == workload.namespace
            and (s.get("spec", "selector", default={}) or {})
            and all(labels.get(k) == v for k, v in (s.get("spec", "selector", default={}) or {}).items())]


def check_api_and_worker(context: Context) -> list[Problem]:
    manifests = context.manifests
    routes = None
    problems = []
    for workload, pod_path, _, container_path, container in _containers(manifests):
        command, args = jobs_command(container)
        where = f"{pod_path}/{container_path}"
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or [] if isinstance(p, dict)}
        annotations = workload.get("spec", "template", "metadata", "annotations", default={}) or {}
        if command == "serve":
            routes = api_routes(context.repo_root) if routes is None else routes
            port = as_int(_option(args, "--port")) or 8000
            if _option(args, "--host") in (None, "127.0.0.1", "localhost"):
                problems.append(Problem(workload, f"{where}/command", "the API listens on loopback only (jobs serve "
                                                                      "defaults to 127.0.0.1): add --host 0.0.0.0"))
            if port not in ports.values():
                problems.append(Problem(workload, f"{where}/ports", f"no containerPort {port}, the API's --port"))
            for probe, path in (("livenessProbe", LIVENESS_PATH), ("readinessProbe", READINESS_PATH)):
                get = (container.get(probe) or {}).get("httpGet")
                if not isinstance(get, dict):
                    problems.append(Problem(workload, f"{where}/{probe}",
                                            f"an httpGet {probe} on {path} is required (the API serves it)"))
                    continue
                if get.get("path") != path:
                    problems.append(Problem(workload, f"{where}/{probe}/httpGet/path",
                                            f"{probe} asks {get.get('path')!r}; it must be {path}"))
                if routes is not None and get.get("path") not in routes:
                    problems.append(Problem(workload, f"{where}/{probe}/httpGet/path",
                                            f"{get.get('path')!r} is not a route of {API_SOURCE}"))
                if ports.get(get.get("port"), get.get("port")) != port:
                    problems.append(Problem(workload, f"{where}/{probe}/httpGet/port",
                                            f"probe port {get.get('port')!r} is not the API's port {port}"))
            if annotations.get("prometheus.io/scrape") == "true" and (
                    as_int(annotations.get("prometheus.io/port")) != port
                    or annotations.get("prometheus.io/path", METRICS_PATH) != METRICS_PATH
                    or (routes is not None and METRICS_PATH not in routes)):
                problems.append(Problem(workload, "/spec/template/metadata/annotations",
                                        f"Prometheus must scrape {METRICS_PATH} on the API's port {port}"))
            if not _selected_by_service(workload, manifests):
                problems.append(Problem(workload, "/spec/template/metadata/labels", "no Service selects the API"))
        elif command == "worker":
            metrics_port = as_int(_option(args, "--metrics-port")) or 9100
            for service in _selected_by_service(workload, manifests):
                problems.append(Problem(service, "/spec/selector", f"selects the worker {workload.name}: nothing "
                                                                   "calls a worker; select the API's pods only"))
            if annotations.get("prometheus.io/scrape") == "true" and \
                    as_int(annotations.get("prometheus.io/port")) != metrics_port:
                problems.append(Problem(workload, "/spec/template/metadata/annotations",
                                        f"Prometheus must scrape the worker's --metrics-port {metrics_port}"))
            if metrics_port and metrics_port not in ports.values():
                problems.append(Problem(workload, f"{where}/ports", f"no containerPort {metrics_port}, the worker's "
                                                                    "--metrics-port"))
    return problems


# -- KEDA ------------------------------------------------------------------------------------------


def check_scaled_objects(context: Context) -> list[Problem]:
    manifests = context.manifests
    problems = []
    for scaled in manifests:
        if (scaled.api_version, scaled.kind) != SCALED_OBJECT:
            continue
        target = scaled.get("spec", "scaleTargetRef", default={}) or {}
        api_version, kind = target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")
        found = [m for m in manifests if (m.api_version, m.kind, m.name, m.namespace) ==
                 (api_version, kind, target.get("name"), scaled.namespace)]
        if not found:
            problems.append(Problem(scaled, "/spec/scaleTargetRef", f"scales {kind} {target.get('name')!r}, which we "
                                                                    f"do not ship in namespace {scaled.namespace}"))
        elif jobs_command((found[0].get("spec", "template", "spec", "containers", default=[]) or [{}])[0])[0] \
                == "serve":
            problems.append(Problem(scaled, "/spec/scaleTargetRef", "scales the API on the queue: the queue is the "
                                                                    "worker's work"))
        low, high = scaled.get("spec", "minReplicaCount", default=0), scaled.get("spec", "maxReplicaCount", default=100)
        if isinstance(low, int) and isinstance(high, int) and high < max(low, 1):
            problems.append(Problem(scaled, "/spec/maxReplicaCount", f"maxReplicaCount {high} is below "
                                                                     f"minReplicaCount {low}"))
        for i, trigger in enumerate(scaled.get("spec", "triggers", default=[]) or []):
            where = f"/spec/triggers/{i}"
            ref = (trigger.get("authenticationRef") or {}).get("name")
            auth = next((m for m in manifests if (m.api_version, m.kind) == TRIGGER_AUTHENTICATION
                         and m.name == ref and m.namespace == scaled.namespace), None)
            if ref and auth is None:
                problems.append(Problem(scaled, f"{where}/authenticationRef", f"TriggerAuthentication {ref!r} is not "
                                                                               f"shipped in {scaled.namespace}"))
            if trigger.get("type") != "postgresql":
                continue
            metadata = trigger.get("metadata") or {}
            if not str(metadata.get("query") or "").strip():
                problems.append(Problem(scaled, f"{where}/metadata", "a postgresql trigger needs a query"))
            try:
                target_value = float(metadata.get("targetQueryValue", 0))
            except ValueError:
                target_value = 0.0
            if target_value == 0:
                problems.append(Problem(scaled, f"{where}/metadata/targetQueryValue",
                                        "targetQueryValue must be a non-zero number (jobs per replica)"))
            if "connection" in metadata:
                problems.append(Problem(scaled, f"{where}/metadata/connection",
                                        "KEDA ignores a connection in plain metadata: give it through the "
                                        "TriggerAuthentication (parameter: connection) or connectionFromEnv"))
            parameters = {r.get("parameter") for r in (auth.get("spec", "secretTargetRef", default=[]) or [])} \
                if auth is not None else set()
            if not ({"connection"} & parameters or "connectionFromEnv" in metadata
                    or {"host", "userName", "dbName", "sslmode"} <= (parameters | set(metadata))):
                problems.append(Problem(scaled, where, "the postgresql trigger has no connection: set the parameter "
                                                       "connection in its TriggerAuthentication"))
    return problems


# -- the job service's configuration --------------------------------------------------------------


def _jobs_config(workload: Manifest, pod: dict[str, Any], container: dict[str, Any], manifests: list[Manifest],
                 where: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    env = {e.get("name"): e.get("value") for e in container.get("env") or [] if isinstance(e, dict)}
    path = env.get("JOBS_CONFIG")
    if not path:
        return None, [Problem(workload, f"{where}/env", "JOBS_CONFIG is not set: the job service would read the "
                                                        "config/jobs.yaml of its image (the local one)")]
    path = PurePosixPath(path)
    mount = next((m for m in container.get("volumeMounts") or [] if PurePosixPath(m.get("mountPath", "/")) ==
                  path.parent), None)
    volume = next((v for v in pod.get("volumes") or [] if mount and v.get("name") == mount.get("name")), None)
    name = ((volume or {}).get("configMap") or {}).get("name")
    config_map = next((m for m in of_kind(manifests, "ConfigMap") if m.name == name
                       and m.namespace == workload.namespace), None)
    if config_map is None:
        return None, [Problem(workload, f"{where}/env", f"JOBS_CONFIG {path} is in no mounted ConfigMap we ship")]
    text = (config_map.get("data", default={}) or {}).get(path.name)
    if text is None:
        return None, [Problem(config_map, "/data", f"no key {path.name!r}, the file JOBS_CONFIG names")]
    try:
        return yaml.safe_load(text), []
    except yaml.YAMLError as e:
        return None, [Problem(config_map, f"/data/{path.name}", f"not valid YAML: {e}")]


def check_jobs_config(context: Context) -> list[Problem]:
    manifests = context.manifests
    services = {(m.namespace, m.name): m for m in manifests if (m.api_version, m.kind) == INFERENCE_SERVICE}
    problems: list[Problem] = []
    seen: set[str] = set()
    for workload, pod_path, pod, container_path, container in _containers(manifests):
        if jobs_command(container)[0] is None:
            continue
        config, found = _jobs_config(workload, pod, container, manifests, f"{pod_path}/{container_path}")
        problems += found
        key = yaml.safe_dump(config)
        if config is None or key in seen:
            continue
        seen.add(key)
        config_map = next(m for m in of_kind(manifests, "ConfigMap") if m.namespace == workload.namespace
                          and any(yaml.safe_load(v) == config for v in (m.get("data", default={}) or {}).values()))
        for i, model in enumerate((config or {}).get("models") or []):
            where = f"/data/jobs.yaml models[{i}]"
            model_config = model.get("model_config")
            if model_config:
                inside = PurePosixPath(model_config)
                if not inside.is_relative_to(IMAGE_CONFIG_DIR) or not (
                        context.repo_root / "config" / inside.relative_to(IMAGE_CONFIG_DIR)).is_file():
                    problems.append(Problem(config_map, where, f"model_config {model_config} is not a file the image "
                                                               f"carries (config/ at {IMAGE_CONFIG_DIR})"))
            for j, endpoint in enumerate(model.get("endpoints") or []):
                problems += _endpoint_problems(config_map, f"{where}.endpoints[{j}]", model, endpoint, services)
    return problems


def _endpoint_problems(config_map: Manifest, where: str, model: dict[str, Any], endpoint: dict[str, Any],
                       services: dict[tuple[str | None, str], Manifest]) -> list[Problem]:
    host = urlsplit(str(endpoint.get("url", ""))).hostname or ""
    match = _CLUSTER_LOCAL.match(host)
    if not match:
        return []  # another cluster's ingress, or a plain URL: nothing here to compare it with
    isvc = services.get((match["namespace"], match["name"]))
    if isvc is None:
        return [Problem(config_map, where, f"{host} is no InferenceService we ship "
                                           f"(they are {', '.join(sorted(f'{n}.{ns}' for ns, n in services))})")]
    problems = []
    variant = (isvc.get("metadata", "labels", default={}) or {}).get(VARIANT_LABEL)
    if variant and variant != model.get("variant"):
        problems.append(Problem(config_map, where, f"model {model.get('name')!r} is variant {model.get('variant')}, "
                                                   f"but {isvc.name} serves {variant}"))
    predictor = isvc.get("spec", "predictor", default={}) or {}
    runs = (predictor.get("maxReplicas") or 1) * (predictor.get("containerConcurrency") or 1)
    if int(endpoint.get("capacity", 1)) > runs:
        problems.append(Problem(config_map, where, f"capacity {endpoint.get('capacity')} is more than {isvc.name} runs "
                                                   f"at once (maxReplicas x containerConcurrency = {runs}): the rest "
                                                   "would wait in Knative's queue, unseen by the worker"))
    timeout = predictor.get("timeout")
    if isinstance(timeout, int) and float(endpoint.get("timeout_s", 1200)) < timeout:
        problems.append(Problem(config_map, where, f"timeout_s {endpoint.get('timeout_s')} is shorter than "
                                                   f"{isvc.name}'s timeout {timeout} s: the worker would give up on "
                                                   "a generation the model still runs"))
    return problems


# -- placement: private clusters only -------------------------------------------------------------


def job_service_namespaces(manifests: list[Manifest]) -> set[str]:
    """The namespaces of the job service: where a CloudNativePG Cluster or a ``python -m jobs``
    workload is shipped."""
    namespaces = {m.namespace for m in manifests if (m.api_version, m.kind) == CNPG_CLUSTER and m.namespace}
    namespaces |= {workload.namespace for workload, _, _, _, container in _containers(manifests)
                   if workload.namespace and jobs_command(container)[0] is not None}
    return namespaces


def check_private_only(context: Context) -> list[Problem]:
    world = context.world
    if not world.policies:
        return []  # no Karmada layer among these manifests: nothing is placed anywhere
    namespaces = job_service_namespaces(context.manifests)
    problems = []
    for obj in world.templates:
        is_namespace = (obj.api_version, obj.kind) == ("v1", "Namespace")
        if not (obj.namespace in namespaces or (is_namespace and obj.name in namespaces)):
            continue
        if is_namespace and (obj.get("metadata", "labels", default={}) or {}).get(SKIP_NAMESPACE_SYNC) != "true":
            problems.append(Problem(obj, "/metadata/labels", f"the job service's namespace lacks "
                                                             f'{SKIP_NAMESPACE_SYNC}: "true": Karmada\'s namespace '
                                                             "sync would create it on every member cluster"))
        policy, _ = world.claim(obj)
        if policy is None:
            problems.append(Problem(obj, "/metadata", f"{obj.kind} {obj.name} of the job service is placed by no "
                                                      "policy: it would stay in Karmada's API server"))
            continue
        public = sorted(name for name in world.choosable(policy)
                        if (world.cluster(name).labels or {}).get(TIER_LABEL) != PRIVATE_TIER)
        if public:
            problems.append(Problem(policy, "/spec/placement", f"may place {obj.kind} {obj.name} of the job service "
                                                               f"on {', '.join(public)}, not a {PRIVATE_TIER} "
                                                               "cluster: the job service and its database stay in "
                                                               "the private clusters"))
    return problems


CHECKS = [check_secret_references, check_api_and_worker, check_scaled_objects, check_jobs_config, check_private_only]

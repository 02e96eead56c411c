"""Cross-checks for the KServe manifests: what the CRD schemas cannot say.

The TorchServe side comes from the repo, never from the network: ``config/kserve/config.properties``
(ports, auth) and, per InferenceService, ``config/models/<variant>.yaml`` (found through the
``wan.serving/variant`` label) rendered into the model_snapshot exactly as the store builder
writes it (``model_store.kserve_store``), so the timeouts checked here are the ones TorchServe
will apply. Checked:

- InferenceServices: the variant and its model config exist; Knative mode; the runtime exists,
  is enabled and supports the model format and protocol (v1 or v2); no TorchServe envelope in the
  model's env or the env the pod gets merged from the runtime (below);
  ``storageUri`` is well formed and points at this variant's store; S3 credentials are wired
  (ServiceAccount -> Secret with the s3 annotations); replicas, ``containerConcurrency`` and
  ``timeout`` agree with TorchServe's workers and responseTimeout; Knative's progress deadline
  covers startupTimeout; a GPU limit and a GPU node selector; the GPU limit is what TorchServe's
  workers use: maxWorkers x the ranks of one worker (``torchrun.nproc-per-node`` when the model
  config has ``parallelType`` tp, pp or pptp, else 1), and a worker of several ranks gets a
  memory-backed, bounded emptyDir at /dev/shm in the model container (NCCL's buffers; the
  container default of 64 MB is too small); CPU and memory limits (KServe would fill missing ones
  with its defaults, below our requests); a pinned image.
- Serving runtimes: the container, its single port, probes and metrics annotation agree with
  config.properties; the start command reads KServe's layout; protocols v1 and v2 only; no
  TorchServe envelope in the env.
- config/kserve/config.properties itself: what KServe relies on (no token auth with management
  kept inside the pod, Prometheus metrics, no hand-written model list) and what would break it:
  TorchServe's own KServe envelope (``service_envelope``), or ``enable_envvars_config``, which
  lets TS_* variables in the pod's env override the file.
- Secrets with S3 annotations, LocalModelCaches (source URI used by an InferenceService, node
  groups and their size), plain Deployments and Services (GPU, ports, probes, volumes,
  selectors, no TorchServe envelope in the env), and objects declared twice (only as a marked
  second apply: ``# validate: second-apply-of <file>`` in the later file's header).

TorchServe's KServe envelope stays off everywhere: the handler reads KServe's v1 body
(``{"instances": [...]}``) and v2 body (``{"inputs": [...]}``) itself and answers a malformed
one 400, naming the problem. TorchServe's envelope would parse the body before the handler
runs and turn any malformed one into 503 "Prediction failed", which clients retry. So its env
switch (``ENVELOPE_ENV``) in a runtime's, a predictor's or a plain Deployment's env is a problem
(even though TorchServe only reads it with ``enable_envvars_config``: it says the wrong thing,
and would take effect the day that setting is switched on).
"""

from __future__ import annotations

import base64
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from model_store.kserve_store import MODEL_NAME, MOUNT_PATH, StoreError, parse_s3_uri
from scripts.manifests.context import Context
from scripts.manifests.core import Manifest, Problem, of_kind
from scripts.manifests.kube import (
    CONTAINER_NAME,
    KSERVE_GROUP,
    RUNTIME_KINDS,
    as_int,
    duration_s,
    env_values,
    find_runtime,
    named_container,
    pod_specs,
    pod_template,
    quantity,
    render_predictor_pod,
)
from scripts.manifests.torchserve import KS_CONFIG, TorchServeConfig

VARIANT_LABEL = "wan.serving/variant"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
PROGRESS_DEADLINE = "serving.knative.dev/progress-deadline"
KNATIVE_DEFAULT_PROGRESS_DEADLINE_S = 600  # Knative's config-deployment default
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"
SHM_PATH = "/dev/shm"
# TorchServe's switch for its own KServe envelope, as an env variable (with enable_envvars_config)
# and as a config.properties key: both must stay unset, the handler reads the bodies itself.
ENVELOPE_ENV = "TS_SERVICE_ENVELOPE"
ENVELOPE_PROPERTY = "service_envelope"
ENVELOPE_WHY = ("the handler reads KServe v1/v2 bodies itself; TorchServe's envelope would parse them first "
                "and turn a malformed body into 503 \"Prediction failed\" (retried forever) instead of a 400 "
                "naming the problem")
PROTOCOLS = ("v1", "v2")  # protocolVersions the handler reads (HTTP, on TorchServe's inference port)
MODEL_FORMAT = "pytorch"
STORE_ARGS = (f"--model-store={MOUNT_PATH}/model-store", f"--ts-config={MOUNT_PATH}/config/config.properties")
LOCALMODEL_JOB_NAMESPACE = "kserve-localmodel-jobs"  # KServe's default localModel.jobNamespace
S3_ANNOTATIONS = ("serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region")
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
_SECOND_APPLY = re.compile(r"^#\s*validate:\s*second-apply-of\s+(\S+)\s*$", re.MULTILINE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_MANAGEMENT_URL = re.compile(r"127\.0\.0\.1:(\d+)/models/([A-Za-z0-9_.-]+)")


# -- shared lookups ---------------------------------------------------------------------


def _kserve(manifests: Iterable[Manifest], *kinds: str) -> list[Manifest]:
    return [m for m in manifests if m.group == KSERVE_GROUP and m.kind in kinds]


def _effective(isvc: Manifest, runtime: Manifest | None) -> dict[str, Any]:
    """What the predictor pod's model container gets (kube.render_predictor_pod: the runtime's
    kserve-container with the model's fields merged over it): env by name, resources, image, its
    mounts by path and the pod's volumes by name."""
    pod = render_predictor_pod(isvc.doc, runtime.doc if runtime is not None else None)["spec"]
    _, container = named_container(pod.get("containers"))
    return {"env": env_values(container), "resources": container.get("resources") or {},
            "image": container.get("image"),
            "volumeMounts": {m.get("mountPath"): m for m in container.get("volumeMounts") or [] if isinstance(m, dict)},
            "volumes": {v.get("name"): v for v in pod.get("volumes") or [] if isinstance(v, dict)}}


def _envelope_env_problems(manifest: Manifest, where: str, container: dict[str, Any]) -> list[Problem]:
    """ENVELOPE_ENV in a container's env (``where`` is the container's path)."""
    return [Problem(manifest, f"{where}/env/{i}", f"sets {ENVELOPE_ENV}: remove it; {ENVELOPE_WHY}")
            for i, e in enumerate(container.get("env") or []) if isinstance(e, dict) and e.get("name") == ENVELOPE_ENV]


def _probe_port_problems(manifest: Manifest, where: str, probe: Any, ports: dict[str | int, int],
                         inference_port: int | None, management_port: int | None) -> list[Problem]:
    """A probe must hit TorchServe's inference port, or (exec) its management URL inside the pod."""
    if not isinstance(probe, dict):
        return []
    problems = []
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if isinstance(probe.get(handler), dict) and "port" in probe[handler]:
            raw = probe[handler]["port"]
            port = ports.get(raw, raw if isinstance(raw, int) else None)
            if port != inference_port:
                problems.append(Problem(manifest, f"{where}/{handler}/port",
                                        f"probe port {raw} is not TorchServe's inference port {inference_port} "
                                        f"(inference_address in {KS_CONFIG})"))
    command = " ".join(str(c) for c in (probe.get("exec") or {}).get("command") or [])
    for port, model in _MANAGEMENT_URL.findall(command):
        if int(port) != management_port:
            problems.append(Problem(manifest, f"{where}/exec/command",
                                    f"the probe asks 127.0.0.1:{port}, TorchServe's management API is on "
                                    f"{management_port} (management_address in {KS_CONFIG})"))
        if model != MODEL_NAME:
            problems.append(Problem(manifest, f"{where}/exec/command",
                                    f"the probe asks for model {model!r}; the store's model is {MODEL_NAME!r}"))
    return problems


def _store_args_problems(manifest: Manifest, where: str, container: dict[str, Any]) -> list[Problem]:
    command = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    missing = [arg for arg in ("torchserve", "--foreground", *STORE_ARGS) if arg not in command]
    if not missing:
        return []
    return [Problem(manifest, where, f"the container must run torchserve --start --foreground with "
                                     f"{' '.join(STORE_ARGS)} (KServe's store layout); missing: {', '.join(missing)}")]


# -- config/kserve/config.properties ----------------------------------------------------


def check_torchserve_config(context: Context) -> list[Problem]:
    manifests = context.manifests
    if not _kserve(manifests, "InferenceService", *RUNTIME_KINDS):
        return []
    ts = context.torchserve
    if ts.template is None:
        return list(ts.problems)
    path, props = ts.config_path, ts.properties

    def problem(message: str) -> Problem:
        return Problem(None, "", message, file=path)

    problems = []
    for key in ("model_snapshot", "load_models", "models"):
        if key in props:
            problems.append(problem(f"sets {key}: the store builder generates the model list from "
                                    "config/models/<variant>.yaml; remove it here"))
    if props.get("enable_envvars_config", "").strip().lower() == "true":
        problems.append(problem("enable_envvars_config=true: TorchServe would take TS_* overrides of this file "
                                f"from the pod's env (KServe's stock TorchServe runtime sets {ENVELOPE_ENV}); "
                                "remove it"))
    if ENVELOPE_PROPERTY in props:
        problems.append(problem(f"sets {ENVELOPE_PROPERTY}: remove it; {ENVELOPE_WHY}"))
    if props.get("disable_token_authorization", "").lower() != "true":
        problems.append(problem("disable_token_authorization must be true: the key is random per pod and "
                                "/ping demands it, so KServe's readiness probe and every client would be refused"))
    if ts.port("inference_address") is None:
        problems.append(problem("inference_address needs an explicit port (the runtime's container port)"))
    elif ts.host("inference_address") in ("127.0.0.1", "localhost"):
        problems.append(problem("inference_address listens on loopback only: the Service (Standard mode) and "
                                "the plain Deployment reach the pod's IP"))
    if ts.port("management_address") is None or ts.host("management_address") != "127.0.0.1":
        problems.append(problem("management_address must be http://127.0.0.1:<port>: with token auth off it "
                                "must not be reachable from outside the pod"))
    if ts.port("metrics_address") is None:
        problems.append(problem("metrics_address needs an explicit port (the prometheus.kserve.io/port)"))
    if props.get("metrics_mode") != "prometheus":
        problems.append(problem("metrics_mode must be prometheus (KServe scrapes Prometheus text)"))
    return problems


# -- serving runtimes -------------------------------------------------------------------


def check_runtimes(context: Context) -> list[Problem]:
    manifests = context.manifests
    ts = context.torchserve
    inference, management, metrics = (ts.port(k) for k in ("inference_address", "management_address",
                                                            "metrics_address"))
    problems = []
    for runtime in _kserve(manifests, *RUNTIME_KINDS):
        found = named_container(runtime.get("spec", "containers", default=[]) or [])
        if found is None:
            problems.append(Problem(runtime, "/spec/containers",
                                    f"no container named {CONTAINER_NAME!r}: KServe merges the predictor's "
                                    "model container into the one with that name"))
            continue
        index, container = found
        where = f"/spec/containers/{index}"
        formats = [f.get("name") for f in runtime.get("spec", "supportedModelFormats", default=[]) or []]
        if MODEL_FORMAT not in formats:
            problems.append(Problem(runtime, "/spec/supportedModelFormats",
                                    f"does not support model format {MODEL_FORMAT!r} (supports {formats})"))
        for i, protocol in enumerate(runtime.get("spec", "protocolVersions", default=[]) or []):
            if protocol not in PROTOCOLS:
                problems.append(Problem(runtime, f"/spec/protocolVersions/{i}",
                                        f"protocol {protocol!r} is not served: the handler reads KServe's "
                                        f"{' and '.join(PROTOCOLS)} bodies, over HTTP on TorchServe's one port"))
        ports = [p for p in container.get("ports") or [] if isinstance(p, dict)]
        if len(ports) != 1 or ports[0].get("containerPort") != inference:
            found_ports = [p.get("containerPort") for p in ports]
            problems.append(Problem(runtime, f"{where}/ports",
                                    f"must declare exactly one port, TorchServe's inference port {inference} "
                                    f"(inference_address in {KS_CONFIG}); found {found_ports}"))
        named = {p.get("name"): p.get("containerPort") for p in ports if p.get("name")}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            problems += _probe_port_problems(runtime, f"{where}/{probe}", container.get(probe), named,
                                             inference, management)
        annotated = runtime.get("spec", "annotations", "prometheus.kserve.io/port")
        if annotated is not None and as_int(annotated) != metrics:
            problems.append(Problem(runtime, "/spec/annotations/prometheus.kserve.io~1port",
                                    f"metrics port {annotated} is not TorchServe's metrics port {metrics} "
                                    f"(metrics_address in {KS_CONFIG})"))
        problems += _envelope_env_problems(runtime, where, container)
        problems += _store_args_problems(runtime, f"{where}/args", container)
    return problems


# -- inference services -----------------------------------------------------------------


def _limit_problems(isvc: Manifest, model: dict[str, Any]) -> list[Problem]:
    """CPU and memory limits on the model itself: KServe's webhook fills a missing one from its
    inferenceservice-config (1 CPU and 2Gi by default) before the runtime's are merged, so a
    request above that default makes the pod invalid."""
    resources = model.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    where = "/spec/predictor/model/resources/limits"
    problems = []
    for name in ("cpu", "memory"):
        if name not in limits:
            problems.append(Problem(isvc, where, f"no {name} limit: KServe fills it from its inferenceservice-config "
                                                 "(1 CPU and 2Gi by default), whatever the runtime says, and a "
                                                 "request above it makes the pod invalid"))
        elif name in requests and (quantity(limits[name]) or 0) < (quantity(requests[name]) or 0):
            problems.append(Problem(isvc, where, f"{name} limit {limits[name]} is below the request {requests[name]}"))
    return problems


def _storage_problems(isvc: Manifest, variant: str | None) -> list[Problem]:
    where = "/spec/predictor/model/storageUri"
    uri = isvc.get("spec", "predictor", "model", "storageUri")
    if not uri:
        return [Problem(isvc, where, "storageUri is required: the model store (config/config.properties, "
                                     "model-store/) that KServe copies to /mnt/models")]
    uri = str(uri)
    if uri.startswith("s3://"):
        try:
            _, prefix = parse_s3_uri(uri)
        except StoreError as e:
            return [Problem(isvc, where, str(e))]
    elif uri.startswith("pvc://"):
        match = re.fullmatch(r"pvc://([a-z0-9]([-a-z0-9]*[a-z0-9])?)/(.*)", uri)
        if not match:
            return [Problem(isvc, where, f"{uri!r} is not a pvc://<claim>/<path> URI")]
        prefix = match.group(3).strip("/")
    else:
        return [Problem(isvc, where, f"{uri!r}: the model store must be s3://bucket/<variant> "
                                     "(or pvc://<claim>/<variant>)")]
    first = prefix.split("/")[0] if prefix else ""
    if not first:
        return [Problem(isvc, where, f"{uri!r} has no prefix: each variant's store lives under its own "
                                     "prefix (s3://bucket/<variant>)")]
    if variant and not (first == variant or first.startswith(variant + "-")):
        return [Problem(isvc, where, f"{uri!r} is not a {variant} store: the prefix must be {variant} or "
                                     f"{variant}-<release> (the store's handler.model_path is "
                                     f"{MOUNT_PATH}/weights/{variant})")]
    return []


def _credential_problems(isvc: Manifest, manifests: list[Manifest]) -> list[Problem]:
    uri = str(isvc.get("spec", "predictor", "model", "storageUri") or "")
    if not uri.startswith("s3://"):
        return []
    account = isvc.get("spec", "predictor", "serviceAccountName")
    where = "/spec/predictor/serviceAccountName"
    if not account:
        return [Problem(isvc, where, "an s3:// store needs serviceAccountName: the ServiceAccount whose Secret "
                                     "holds the S3 credentials and serving.kserve.io/s3-* annotations")]
    accounts = [m for m in of_kind(manifests, "ServiceAccount") if m.name == account and m.namespace == isvc.namespace]
    if not accounts:
        return [Problem(isvc, where, f"ServiceAccount {account!r} is not declared in namespace {isvc.namespace}")]
    listed = {s.get("name") for s in accounts[0].get("secrets", default=[]) or [] if isinstance(s, dict)}
    secrets = [m for m in of_kind(manifests, "Secret")
               if m.name in listed and m.namespace == isvc.namespace
               and "serving.kserve.io/s3-endpoint" in (m.get("metadata", "annotations", default={}) or {})]
    if not secrets:
        return [Problem(isvc, where, f"ServiceAccount {account!r} lists no Secret with serving.kserve.io/s3-* "
                                     f"annotations (listed: {sorted(listed) or 'none'}): the storage initializer "
                                     "would have no S3 endpoint or credentials")]
    return []


def check_inference_services(context: Context) -> list[Problem]:
    manifests = context.manifests
    ts = context.torchserve
    problems = []
    for isvc in _kserve(manifests, "InferenceService"):
        predictor = isvc.get("spec", "predictor", default={}) or {}
        model = predictor.get("model")
        variant = (isvc.get("metadata", "labels", default={}) or {}).get(VARIANT_LABEL)
        snapshot = None
        if not variant:
            problems.append(Problem(isvc, "/metadata/labels",
                                    f"label {VARIANT_LABEL} is required: it names config/models/<variant>.yaml, "
                                    "whose timeouts and workers this service must agree with"))
        else:
            try:
                snapshot = ts.snapshot(variant)
            except StoreError as e:
                problems.append(Problem(isvc, f"/metadata/labels/{VARIANT_LABEL.replace('/', '~1')}", str(e)))

        mode = (isvc.get("metadata", "annotations", default={}) or {}).get(DEPLOYMENT_MODE)
        if mode != "Knative":
            hint = " (the old name of Knative)" if mode == "Serverless" else ""
            problems.append(Problem(isvc, "/metadata/annotations",
                                    f"{DEPLOYMENT_MODE} must be Knative, got {mode!r}{hint}: only Knative mode "
                                    "scales to zero with the activator holding requests"))
        if not isinstance(model, dict):
            legacy = [k for k in ("pytorch", "containers") if k in predictor]
            problems.append(Problem(isvc, "/spec/predictor/model",
                                    "spec.predictor.model is required" + (
                                        f" (not {legacy[0]}: KServe's webhook rewrites the legacy form, so "
                                        "what members store differs from the template)" if legacy else "")))
            continue

        runtime = None
        runtime_name = model.get("runtime")
        if not runtime_name:
            problems.append(Problem(isvc, "/spec/predictor/model/runtime",
                                    "runtime is required (wan-torchserve): auto-selection could pick KServe's "
                                    "stock TorchServe, which cannot read this store"))
        else:
            runtime = find_runtime(manifests, runtime_name, isvc.namespace)
            if runtime is None:
                problems.append(Problem(isvc, "/spec/predictor/model/runtime",
                                        f"unknown runtime {runtime_name!r}: no ClusterServingRuntime, nor "
                                        f"ServingRuntime in namespace {isvc.namespace}, of that name"))
        protocol = model.get("protocolVersion") or "v1"
        format_name = (model.get("modelFormat") or {}).get("name")
        if format_name != MODEL_FORMAT:
            problems.append(Problem(isvc, "/spec/predictor/model/modelFormat/name",
                                    f"model format must be {MODEL_FORMAT!r}, got {format_name!r}"))
        if runtime is not None:
            if runtime.get("spec", "disabled") is True:
                problems.append(Problem(isvc, "/spec/predictor/model/runtime", f"runtime {runtime_name!r} is disabled"))
            formats = [f.get("name") for f in runtime.get("spec", "supportedModelFormats", default=[]) or []]
            if format_name and format_name not in formats:
                problems.append(Problem(isvc, "/spec/predictor/model/modelFormat/name",
                                        f"runtime {runtime_name!r} does not support model format {format_name!r}"))
            protocols = runtime.get("spec", "protocolVersions", default=None)
            if protocols is not None and protocol not in protocols:
                problems.append(Problem(isvc, "/spec/predictor/model/protocolVersion",
                                        f"runtime {runtime_name!r} does not serve protocol {protocol!r} "
                                        f"(serves {protocols})"))
        effective = _effective(isvc, runtime)
        if protocol not in PROTOCOLS:
            problems.append(Problem(isvc, "/spec/predictor/model/protocolVersion",
                                    f"protocol {protocol!r} is not served (the handler reads KServe's "
                                    f"{' and '.join(PROTOCOLS)} bodies over HTTP)"))
        own = _envelope_env_problems(isvc, "/spec/predictor/model", model)
        problems += own
        if not own and ENVELOPE_ENV in effective["env"]:
            problems.append(Problem(isvc, "/spec/predictor/model/env",
                                    f"the pod would get {ENVELOPE_ENV} from runtime {runtime_name!r} (KServe "
                                    f"merges its env into the model's): remove it there; {ENVELOPE_WHY}"))
        image = effective["image"]
        if image and "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(Problem(isvc, "/spec/predictor/model/image",
                                    f"image {image!r} is not pinned to a tag or digest"))

        problems += _limit_problems(isvc, model)
        problems += _storage_problems(isvc, variant)
        problems += _credential_problems(isvc, manifests)
        problems += _scaling_problems(isvc, predictor, snapshot)
        problems += _gpu_problems(isvc, predictor, effective)
        if snapshot is not None:
            problems += _rank_problems(isvc, effective, ts, variant, snapshot)
    return problems


def _scaling_problems(isvc: Manifest, predictor: dict[str, Any], snapshot: dict[str, Any] | None) -> list[Problem]:
    problems = []
    min_replicas, max_replicas = predictor.get("minReplicas"), predictor.get("maxReplicas")
    if min_replicas is None:
        problems.append(Problem(isvc, "/spec/predictor/minReplicas",
                                "minReplicas must be set (0 to scale to zero): KServe's default of 1 keeps a GPU "
                                "busy around the clock"))
    if max_replicas is None or max_replicas < max(1, min_replicas or 0):
        problems.append(Problem(isvc, "/spec/predictor/maxReplicas",
                                f"maxReplicas must be set and at least max(1, minReplicas), got {max_replicas}: "
                                "it bounds how many GPUs the service may take"))
    concurrency = predictor.get("containerConcurrency")
    capacity = snapshot["maxWorkers"] * snapshot["batchSize"] if snapshot else None
    if not concurrency:
        problems.append(Problem(isvc, "/spec/predictor/containerConcurrency",
                                "containerConcurrency must be set (1 for video: one generation per GPU); "
                                "unset, Knative sends a pod unlimited concurrent requests"))
    elif capacity is not None and concurrency > capacity:
        problems.append(Problem(isvc, "/spec/predictor/containerConcurrency",
                                f"containerConcurrency {concurrency} exceeds what TorchServe runs at once "
                                f"(maxWorkers x batchSize = {capacity} in {snapshot['source']}): requests would "
                                "wait inside the pod, unseen by the autoscaler"))
    timeout = predictor.get("timeout")
    if snapshot is not None:
        response_timeout, source = snapshot["responseTimeout"], snapshot["source"]
        if timeout is None:
            problems.append(Problem(isvc, "/spec/predictor/timeout",
                                    f"timeout must be set, at least TorchServe's responseTimeout "
                                    f"{response_timeout} s ({source}); Knative's default is 300 s"))
        elif timeout < response_timeout:
            problems.append(Problem(isvc, "/spec/predictor/timeout",
                                    f"timeout {timeout} s is shorter than TorchServe's responseTimeout "
                                    f"{response_timeout} s ({source}): Knative would cut requests that "
                                    "TorchServe is still generating"))
        deadline_raw = (predictor.get("annotations") or {}).get(PROGRESS_DEADLINE) or \
            (isvc.get("metadata", "annotations", default={}) or {}).get(PROGRESS_DEADLINE)
        deadline = duration_s(deadline_raw) if deadline_raw is not None else KNATIVE_DEFAULT_PROGRESS_DEADLINE_S
        where = "/spec/predictor/annotations"
        if deadline is None:
            problems.append(Problem(isvc, where,
                                    f"{PROGRESS_DEADLINE} {deadline_raw!r} is not a duration (e.g. 1800s)"))
        elif deadline < snapshot["startupTimeout"]:
            problems.append(Problem(isvc, where,
                                    f"Knative's progress deadline ({deadline:.0f} s"
                                    f"{'' if deadline_raw else ', the default'}) is shorter than TorchServe's "
                                    f"startupTimeout {snapshot['startupTimeout']} s ({source}): the revision "
                                    f"would fail while the model still loads; set {PROGRESS_DEADLINE}"))
    canary = predictor.get("canaryTrafficPercent")
    if canary is not None and not 0 <= canary <= 100:
        problems.append(Problem(isvc, "/spec/predictor/canaryTrafficPercent",
                                f"canaryTrafficPercent must be between 0 and 100, got {canary}"))
    return problems


def _gpu_problems(isvc: Manifest, predictor: dict[str, Any], effective: dict[str, Any]) -> list[Problem]:
    problems = []
    limits, requests = effective["resources"].get("limits", {}), effective["resources"].get("requests", {})
    gpus = as_int(limits.get(GPU_RESOURCE))
    if not gpus or gpus < 1:
        problems.append(Problem(isvc, "/spec/predictor/model/resources/limits",
                                f"no {GPU_RESOURCE} limit: the pod would be scheduled without a GPU and the "
                                "model would not load (deviceType gpu)"))
    elif GPU_RESOURCE in requests and as_int(requests[GPU_RESOURCE]) != gpus:
        problems.append(Problem(isvc, "/spec/predictor/model/resources/requests",
                                f"{GPU_RESOURCE} request {requests[GPU_RESOURCE]} differs from the limit {gpus} "
                                "(extended resources cannot be overcommitted)"))
    if str((predictor.get("nodeSelector") or {}).get(GPU_NODE_LABEL)) != "true":
        problems.append(Problem(isvc, "/spec/predictor/nodeSelector",
                                f"nodeSelector must require {GPU_NODE_LABEL}: \"true\" (GPU nodes)"))
    return problems


def _rank_problems(isvc: Manifest, effective: dict[str, Any], ts: TorchServeConfig, variant: str,
                   snapshot: dict[str, Any]) -> list[Problem]:
    """The pod's GPUs are the ones TorchServe's workers use, and a worker of several ranks has
    a /dev/shm NCCL can work in."""
    source = snapshot["source"]
    ranks, why = ts.ranks_per_worker(variant)
    where = "/spec/predictor/model/resources/limits"
    if ranks is None:
        return [Problem(isvc, f"/metadata/labels/{VARIANT_LABEL.replace('/', '~1')}", f"{source}: {why}")]
    problems = []
    gpus = as_int(effective["resources"].get("limits", {}).get(GPU_RESOURCE))
    expected = snapshot["maxWorkers"] * ranks
    if gpus and gpus != expected:
        problems.append(Problem(isvc, where,
                                f"{GPU_RESOURCE} limit {gpus}, but TorchServe runs maxWorkers {snapshot['maxWorkers']} "
                                f"worker(s) of {ranks} rank(s), one GPU per rank ({why}, {source}): the pod "
                                f"needs {expected}; " + ("ranks would find no GPU of their own" if gpus < expected
                                                         else "the other GPUs would sit idle")))
    device_ids = ts.device_ids(variant)
    if gpus and device_ids is not None:
        outside = [d for d in device_ids if as_int(d) is None or as_int(d) >= gpus]
        if outside:
            problems.append(Problem(isvc, where,
                                    f"deviceIds {device_ids} ({source}) name GPUs the pod does not have "
                                    f"(its {gpus} GPU(s) are 0..{gpus - 1} inside it)"))
    if ranks > 1:
        problems += _shm_problems(isvc, effective, ranks, source)
    return problems


def _shm_problems(isvc: Manifest, effective: dict[str, Any], ranks: int, source: str) -> list[Problem]:
    mount = effective["volumeMounts"].get(SHM_PATH)
    why = (f"one worker of {ranks} ranks ({source}) talks over NCCL, which keeps its buffers in {SHM_PATH}; "
           "the container runtime's default there is 64 MB, too small")
    if mount is None:
        return [Problem(isvc, "/spec/predictor/model/volumeMounts",
                        f"nothing is mounted at {SHM_PATH}: {why}. Mount an emptyDir with medium: Memory and a "
                        "sizeLimit there (spec.predictor.volumes + model.volumeMounts)")]
    volume = effective["volumes"].get(mount.get("name"))
    if volume is None:
        return [Problem(isvc, "/spec/predictor/volumes",
                        f"{SHM_PATH} mounts volume {mount.get('name')!r}, which neither the predictor nor the "
                        "runtime declares")]
    empty_dir = volume.get("emptyDir")
    if not isinstance(empty_dir, dict) or empty_dir.get("medium") != "Memory":
        return [Problem(isvc, "/spec/predictor/volumes",
                        f"volume {mount.get('name')!r} at {SHM_PATH} must be an emptyDir with medium: Memory "
                        f"(shared memory, not node disk): {why}")]
    if mount.get("readOnly"):
        return [Problem(isvc, "/spec/predictor/model/volumeMounts", f"{SHM_PATH} is mounted readOnly: {why}")]
    if quantity(empty_dir.get("sizeLimit")) is None:
        return [Problem(isvc, "/spec/predictor/volumes",
                        f"the memory-backed volume {mount.get('name')!r} at {SHM_PATH} needs a sizeLimit: "
                        "without one a runaway writer can fill the pod's whole memory limit")]
    return []


# -- secrets, caches --------------------------------------------------------------------


def check_s3_secrets(context: Context) -> list[Problem]:
    manifests = context.manifests
    problems = []
    for secret in of_kind(manifests, "Secret"):
        annotations = secret.get("metadata", "annotations", default={}) or {}
        for kind in ("stringData", "data"):
            for key, value in (secret.get(kind, default={}) or {}).items():
                text = str(value or "")
                if kind == "data":
                    try:
                        text = base64.b64decode(text).decode("utf-8", "replace")
                    except ValueError:
                        pass
                if _AWS_KEY_ID.search(text) or (key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") and text):
                    problems.append(Problem(secret, f"/{kind}/{key}",
                                            "a credential in a manifest: keep keys out of git (kserve/README.md "
                                            "creates the Secret with kubectl create secret)"))
        if not any(a in annotations for a in S3_ANNOTATIONS):
            continue
        for name in S3_ANNOTATIONS:
            if name not in annotations:
                problems.append(Problem(secret, "/metadata/annotations", f"{name} is missing"))
        endpoint = str(annotations.get(S3_ANNOTATIONS[0], ""))
        if endpoint and not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?", endpoint):
            problems.append(Problem(secret, "/metadata/annotations",
                                    f"s3-endpoint {endpoint!r} must be host[:port] without a scheme or path "
                                    "(KServe adds http(s):// from s3-usehttps)"))
        usehttps = annotations.get(S3_ANNOTATIONS[1])
        if usehttps is not None and str(usehttps) not in ("0", "1"):
            problems.append(Problem(secret, "/metadata/annotations",
                                    f"s3-usehttps must be \"0\" or \"1\", got {usehttps!r}"))
        keys = set(secret.get("data", default={}) or {}) | set(secret.get("stringData", default={}) or {})
        unknown = sorted(keys - S3_SECRET_KEYS)
        if unknown:
            problems.append(Problem(secret, "/data",
                                    f"unexpected keys {unknown}: KServe reads {sorted(S3_SECRET_KEYS)}"))
    return problems


def check_local_model_caches(context: Context) -> list[Problem]:
    manifests = context.manifests
    problems = []
    uris = {str(m.get("spec", "predictor", "model", "storageUri")) for m in _kserve(manifests, "InferenceService")}
    groups = {m.name: m for m in _kserve(manifests, "LocalModelNodeGroup")}
    for cache in _kserve(manifests, "LocalModelCache"):
        source = str(cache.get("spec", "sourceModelUri") or "")
        if source.startswith("s3://"):
            try:
                parse_s3_uri(source)
            except StoreError as e:
                problems.append(Problem(cache, "/spec/sourceModelUri", str(e)))
        if source not in uris:
            problems.append(Problem(cache, "/spec/sourceModelUri",
                                    f"{source!r} is no InferenceService's storageUri: KServe matches caches by "
                                    f"storageUri, so nothing would use this cache (storageUris: {sorted(uris)})"))
        size = quantity(cache.get("spec", "modelSize"))
        for i, name in enumerate(cache.get("spec", "nodeGroups", default=[]) or []):
            group = groups.get(name)
            if group is None:
                problems.append(Problem(cache, f"/spec/nodeGroups/{i}", f"unknown LocalModelNodeGroup {name!r}"))
                continue
            limit = quantity(group.get("spec", "storageLimit"))
            if size is not None and limit is not None and size > limit:
                problems.append(Problem(cache, "/spec/modelSize",
                                        f"modelSize {cache.get('spec', 'modelSize')} exceeds node group {name}'s "
                                        f"storageLimit {group.get('spec', 'storageLimit')}"))
        account = cache.get("spec", "serviceAccountName")
        if account and not any(m.name == account and m.namespace == LOCALMODEL_JOB_NAMESPACE
                               for m in of_kind(manifests, "ServiceAccount")):
            problems.append(Problem(cache, "/spec/serviceAccountName",
                                    f"ServiceAccount {account!r} is not declared in {LOCALMODEL_JOB_NAMESPACE}, "
                                    "where KServe runs the cache's download jobs"))
    return problems


# -- plain workloads --------------------------------------------------------------------


def _runs_torchserve(container: dict[str, Any]) -> bool:
    return "torchserve" in [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def check_plain_workloads(context: Context) -> list[Problem]:
    manifests = context.manifests
    ts = context.torchserve
    inference, management = ts.port("inference_address"), ts.port("management_address")
    problems = []
    claims = {(m.namespace, m.name) for m in of_kind(manifests, "PersistentVolumeClaim")}
    for workload, pod_path, pod in pod_specs(manifests):
        for i, volume in enumerate(pod.get("volumes") or []):
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and (workload.namespace, claim) not in claims:
                problems.append(Problem(workload, f"{pod_path}/volumes/{i}",
                                        f"PersistentVolumeClaim {claim!r} is not declared in namespace "
                                        f"{workload.namespace}"))
        for index, container in enumerate(pod.get("containers") or []):
            if not _runs_torchserve(container):
                continue
            where = f"{pod_path}/containers/{index}"
            ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or [] if p.get("name")}
            if inference not in [p.get("containerPort") for p in container.get("ports") or []]:
                problems.append(Problem(workload, f"{where}/ports",
                                        f"no containerPort {inference}, TorchServe's inference port "
                                        f"(inference_address in {KS_CONFIG})"))
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                problems += _probe_port_problems(workload, f"{where}/{probe}", container.get(probe), ports,
                                                 inference, management)
            problems += _store_args_problems(workload, f"{where}/args", container)
            problems += _envelope_env_problems(workload, where, container)
            if as_int(((container.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE)) in (None, 0):
                problems.append(Problem(workload, f"{where}/resources/limits",
                                        f"no {GPU_RESOURCE} limit: the model would not load (deviceType gpu)"))
            if str((pod.get("nodeSelector") or {}).get(GPU_NODE_LABEL)) != "true":
                problems.append(Problem(workload, f"{pod_path}/nodeSelector",
                                        f"nodeSelector must require {GPU_NODE_LABEL}: \"true\" (GPU nodes)"))
            if not any(m.get("mountPath") == str(MOUNT_PATH) for m in container.get("volumeMounts") or []):
                problems.append(Problem(workload, f"{where}/volumeMounts",
                                        f"nothing is mounted at {MOUNT_PATH}, where the model store must be"))
    problems += _service_problems(manifests)
    return problems


def _service_problems(manifests: list[Manifest]) -> list[Problem]:
    problems = []
    workloads = [(m, pod_template(m)) for m in manifests]
    workloads = [(m, t[1]) for m, t in workloads if t is not None]
    for service in of_kind(manifests, "Service"):
        selector = service.get("spec", "selector", default={}) or {}
        if not selector:
            continue
        selected = [(m, t) for m, t in workloads if m.namespace == service.namespace
                    and all(((t.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())]
        if not selected:
            problems.append(Problem(service, "/spec/selector",
                                    f"selects no pod template declared in namespace {service.namespace}"))
            continue
        for i, port in enumerate(service.get("spec", "ports", default=[]) or []):
            target = port.get("targetPort", port.get("port"))
            for workload, template in selected:
                containers = (template.get("spec") or {}).get("containers") or []
                declared = [p for c in containers for p in c.get("ports") or []]
                if not any(target in (p.get("name"), p.get("containerPort")) for p in declared):
                    problems.append(Problem(service, f"/spec/ports/{i}/targetPort",
                                            f"targetPort {target!r} is no container port of {workload.kind}/"
                                            f"{workload.name}"))
    return problems


# -- duplicates -------------------------------------------------------------------------


def _second_apply_of(path: Path) -> str | None:
    """The file named by ``# validate: second-apply-of <file>`` in a file's leading comments."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    header = []
    for line in lines:
        if line.strip() and not line.startswith("#"):
            break
        header.append(line)
    match = _SECOND_APPLY.search("\n".join(header))
    return match.group(1) if match else None


def check_duplicates(context: Context) -> list[Problem]:
    manifests = context.manifests
    """The same object twice is an error, unless every extra copy sits in a file marked as a
    second apply of the file that holds the original (a canary example, say)."""
    problems = []
    by_key: dict[tuple, list[Manifest]] = defaultdict(list)
    for m in manifests:
        if m.kind and m.name:
            by_key[(m.group, m.kind, m.namespace, m.name)].append(m)
    for (_, kind, _, name), found in by_key.items():
        marked = {id(m): _second_apply_of(m.path) for m in found}
        originals = [m for m in found if marked[id(m)] is None]
        for m in found:
            target = marked[id(m)]
            if target is None:
                continue
            target_path = (context.repo_root / target).resolve()
            if not any(o.path == target_path for o in originals):
                problems.append(Problem(m, "/metadata/name",
                                        f"marked as a second apply of {target}, which does not declare "
                                        f"{kind} {name!r} (or was not validated with it)"))
            elif kind == "InferenceService" and m.get("spec", "predictor", "canaryTrafficPercent") is None:
                problems.append(Problem(m, "/spec/predictor",
                                        "a second apply of an InferenceService without canaryTrafficPercent "
                                        "replaces the running revision for all traffic at once"))
        for extra in originals[1:]:
            problems.append(Problem(extra, "/metadata/name",
                                    f"{kind} {name!r} is also declared in {originals[0].label}: one would silently "
                                    "replace the other; if this is an intentional second apply (a canary), say "
                                    "so in the later file's header: '# validate: second-apply-of <file>'"))
    return problems


CHECKS = [
    check_torchserve_config,
    check_runtimes,
    check_inference_services,
    check_s3_secrets,
    check_local_model_caches,
    check_plain_workloads,
    check_duplicates,
]

"""Security defaults (README.md, "Security defaults"), each checked where it can fail:

- checkov on the Dockerfile, the configs, kserve/, karmada/, jobs/deploy/ and the predictor pods rendered from
  each InferenceService (scripts/manifests/security.py): no finding but the accepted ones, each with
  its reason at the source;
- the TorchServe configs: loopback-only addresses and token auth locally, management and gRPC
  inside the pod in KServe, model registration over the API off, no URL that could be fetched;
- the manifests expose the inference port only (metrics: one documented port, in no Service);
- a running server really listens on 127.0.0.1 only;
- no code path fetches remote URLs: the handler imports no HTTP client (and boto3 only in
  handler/storage.py); image URLs are refused by tests/test_images.py::test_urls_are_never_fetched;
- the image: no secrets, and everything it writes lands on the manifests' writable mounts.

Elsewhere, not repeated here: the numeric non-root USER and HF_HUB_OFFLINE=1
(tests/test_dockerfile.py), the inference key demanded even on /ping and registration over the
management API refused by a running server (tests/test_torchserve.py), no key file, no bytecode
and nothing in the working directory or the store from a server with the KServe config
(tests/test_kserve_store.py), no credentials in manifests and CPU/memory limits on every
InferenceService (scripts/manifests/kserve.py).
"""

from __future__ import annotations

import ast
import ipaddress
import os
import re
from pathlib import Path

import pytest
import yaml

from model_store.kserve_store import read_properties
from scripts.manifests import REPO_ROOT, load_manifests
from scripts.manifests import security as security_scan
from tests.harness.dockerfile import image_env, instructions, stages
from tests.harness.payloads import REMOTE_IMAGE_URLS

KSERVE = REPO_ROOT / "kserve"
RUNTIME_FILE = KSERVE / "clusterservingruntime-wan-torchserve.yaml"
PLAIN_DEPLOYMENT = KSERVE / "plain" / "deployment-ti2v-5b.yaml"
LOCAL_CONFIG = REPO_ROOT / "config" / "config.properties"
KSERVE_CONFIG = REPO_ROOT / "config" / "kserve" / "config.properties"
ISVC_FILES = ["kserve/inferenceservice-ti2v-5b.yaml", "kserve/inferenceservice-t2v-a14b.yaml",
              "kserve/inferenceservice-i2v-a14b.yaml", "kserve/inferenceservice-t2v-a14b-4gpu.yaml",
              "kserve/examples/canary-ti2v-5b.yaml"]

# Every finding checkov may report, by file, with the reason accepted at its source. Anything else
# fails the suite; a new acceptance is a deliberate change here and a reason there.
# The predictors: a release tag, IfNotPresent, uid 1000, Knative's path, and the job service's
# data-plane token as WAN_CANCEL_TOKEN (the handler reads it from the env) by secretKeyRef.
PREDICTOR_POD_ACCEPTED = {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_40", "CKV2_K8S_6", "CKV_K8S_35"}
# The job service's workloads (jobs/deploy/): a release tag, IfNotPresent, and the database URL
# from CloudNativePG's Secret as an env var (the job service reads JOBS_DATABASE_URL); the worker
# also has no probes (it serves nothing, and an HTTP probe would only reach its metrics thread).
# The Triton predictor (runtime wan-triton): the same, less the token (a closed stream cancels a
# Triton generation: no cancellation check, no Secret in its env).
TRITON_ISVCS = ["kserve/inferenceservice-ti2v-5b-triton.yaml", "kserve/examples/canary-ti2v-5b-to-triton.yaml"]
TRITON_POD_ACCEPTED = PREDICTOR_POD_ACCEPTED - {"CKV_K8S_35"}
JOBS_ACCEPTED = {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"}
JOBS_WORKLOADS = {"jobs/deploy/deployment-api.yaml": JOBS_ACCEPTED,
                  "jobs/deploy/deployment-worker.yaml": JOBS_ACCEPTED | {"CKV_K8S_8", "CKV_K8S_9"},
                  "jobs/deploy/job-migrate.yaml": JOBS_ACCEPTED}
ACCEPTED = {
    "Dockerfile": {"CKV_DOCKER_7"},
    "kserve/plain/deployment-ti2v-5b.yaml": {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_40"},
    **{f"rendered:{f}": PREDICTOR_POD_ACCEPTED for f in ISVC_FILES},
    **{f"rendered:{f}": TRITON_POD_ACCEPTED for f in TRITON_ISVCS},
    **JOBS_WORKLOADS,
}
# What the manifests fixed rather than accepted: checkov must have seen each pass on every workload.
HARDENING = {
    "CKV_K8S_20": "allowPrivilegeEscalation false",
    "CKV_K8S_22": "read-only root filesystem",
    "CKV_K8S_23": "not root",
    "CKV_K8S_28": "no NET_RAW",
    "CKV_K8S_37": "capabilities dropped",
    "CKV_K8S_31": "seccomp RuntimeDefault",
    "CKV_K8S_38": "no service account token",
    "CKV_K8S_29": "pod and container security context",
    "CKV_K8S_11": "CPU limit",
    "CKV_K8S_13": "memory limit",
    "CKV_K8S_8": "liveness probe",
    "CKV_K8S_9": "readiness probe",
    "CKV_K8S_14": "image tag",
}
WORKLOADS = {"kserve/plain/deployment-ti2v-5b.yaml", *(f"rendered:{f}" for f in ISVC_FILES + TRITON_ISVCS),
             *JOBS_WORKLOADS}
# Hardening that does not apply: a Job runs to completion (nothing to probe), the worker serves nothing.
NOT_APPLICABLE = {"jobs/deploy/deployment-worker.yaml": {"CKV_K8S_8", "CKV_K8S_9"},
                  "jobs/deploy/job-migrate.yaml": {"CKV_K8S_8", "CKV_K8S_9"}}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _runtime_container() -> dict:
    [runtime] = _docs(RUNTIME_FILE)
    [container] = runtime["spec"]["containers"]
    return container


# -- checkov ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan() -> security_scan.Scan:
    return security_scan.scan()


def test_checkov_is_the_pinned_version_from_its_own_venv(scan):
    pinned = re.search(r"^CHECKOV_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert ".venv-tools" in str(security_scan.checkov_executable()) or "WAN_CHECKOV" in os.environ
    assert scan.checkov_version == pinned


def test_checkov_finds_nothing_that_is_not_accepted(scan):
    assert scan.failed == [], "checkov findings (fix them, or accept one at its source with a reason):\n" + \
        "\n".join(map(str, scan.failed))


def test_every_accepted_finding_is_expected_and_explained_at_its_source(scan):
    found: dict[str, set[str]] = {}
    for result in scan.accepted:
        found.setdefault(result.file, set()).add(result.check_id)
    assert found == ACCEPTED
    assert security_scan.unexplained(scan.accepted) == []
    # The reasons really are where checkov reads them: the Dockerfile's comment, the annotations.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^# checkov:skip=CKV_DOCKER_7: \S.{20,}$", dockerfile, re.MULTILINE)
    [runtime] = _docs(RUNTIME_FILE)
    [deployment] = _docs(PLAIN_DEPLOYMENT)
    plain = ACCEPTED[str(PLAIN_DEPLOYMENT.relative_to(REPO_ROOT))]
    jobs = [(_docs(REPO_ROOT / f)[0]["metadata"]["annotations"], ids) for f, ids in JOBS_WORKLOADS.items()]
    for where, expected in ((runtime["spec"]["annotations"], PREDICTOR_POD_ACCEPTED),
                            (deployment["metadata"]["annotations"], plain), *jobs):
        skips = {k: v for k, v in where.items() if k.startswith("checkov.io/skip")}
        # checkov splits the value at "=": one, between the id and the reason.
        assert all(v.count("=") == 1 for v in skips.values()), skips
        assert {v.split("=")[0] for v in skips.values()} == expected


def test_checkov_saw_the_hardening_on_every_workload(scan):
    passed: dict[str, set[str]] = {}
    for result in scan.passed:
        passed.setdefault(result.file, set()).add(result.check_id)
    for workload in WORKLOADS:
        missing = {f"{c} ({why})" for c, why in HARDENING.items()
                   if c not in passed.get(workload, set()) | NOT_APPLICABLE.get(workload, set())}
        assert not missing, f"{workload}: checkov did not pass {sorted(missing)}"
    # The Dockerfile's checks ran too (HEALTHCHECK, a USER that is not root, ...).
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3", "CKV_DOCKER_8"} <= passed["Dockerfile"]
    for workload in ("kserve/plain/deployment-ti2v-5b.yaml", *JOBS_WORKLOADS):
        assert {"CKV2_K8S_6"} <= passed[workload], workload  # its NetworkPolicy


def test_checkov_checks_no_custom_resource_hence_the_rendered_pods(scan):
    """checkov runs its kubernetes checks on core kinds only: an InferenceService, a serving runtime
    or a Karmada policy gets none. If that changes, the rendering may become redundant."""
    checked_kinds = {r.resource.split(".")[0] for r in scan.passed + scan.failed + scan.accepted}
    assert checked_kinds & {"InferenceService", "ClusterServingRuntime", "ServingRuntime", "LocalModelCache",
                            "PropagationPolicy", "OverridePolicy", "ResourceInterpreterCustomization"} == set()
    assert {"Pod", "Deployment", "Service", "ServiceAccount", "Secret", "Dockerfile"} <= checked_kinds


def test_checkov_fails_a_predictor_pod_without_the_hardening(tmp_path):
    """The scan can fail: the runtime without its security settings gives findings on the pod."""
    [runtime] = _docs(RUNTIME_FILE)
    container = runtime["spec"]["containers"][0]
    del container["securityContext"], container["volumeMounts"], runtime["spec"]["volumes"]
    del container["resources"]["limits"]["cpu"]
    [isvc] = _docs(REPO_ROOT / ISVC_FILES[0])
    del isvc["spec"]["predictor"]["model"]["resources"]["limits"]["cpu"]  # it would hide the runtime's
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    (tmp_path / "isvc.yaml").write_text(yaml.safe_dump(isvc))
    manifests, _ = load_manifests([tmp_path / "runtime.yaml", tmp_path / "isvc.yaml"])
    rendered = security_scan.write_rendered_pods(manifests, tmp_path / "rendered", tmp_path)
    reports = security_scan.run_checkov(list(rendered), ["kubernetes"])
    failed = {r["check_id"] for report in reports for r in report.get("results", {}).get("failed_checks", [])}
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_11"} <= failed


def test_the_rendered_pod_is_kserves_merge_of_runtime_and_predictor():
    [runtime] = _docs(RUNTIME_FILE)
    runtime["spec"]["containers"][0]["env"] = [{"name": "AWS_ENDPOINT_URL", "value": "https://s3.wan.internal:9000"},
                                               {"name": "WAN_S3_BUCKET", "value": "defaults"}]
    [isvc] = _docs(REPO_ROOT / ISVC_FILES[1])
    isvc["spec"]["predictor"]["model"]["env"] = [{"name": "WAN_S3_BUCKET", "value": "results"}]
    isvc["spec"]["predictor"]["model"]["image"] = "registry.example/wan:9.9"
    pod = security_scan.render_predictor_pod(isvc, runtime)
    [container] = pod["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"] == "registry.example/wan:9.9"
    assert container["args"] == runtime["spec"]["containers"][0]["args"]
    assert container["env"] == [{"name": "AWS_ENDPOINT_URL", "value": "https://s3.wan.internal:9000"},
                                {"name": "WAN_S3_BUCKET", "value": "results"}]  # merged by name: the predictor's wins
    limits = container["resources"]["limits"]
    assert limits == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "1"}  # the predictor's, key by key
    assert container["securityContext"] == runtime["spec"]["containers"][0]["securityContext"]
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"tmp", "logs", "cache"}
    assert "storageUri" not in container and "modelFormat" not in container
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["serviceAccountName"] == "wan-s3"
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True}
    assert pod["metadata"]["annotations"]["prometheus.kserve.io/port"] == "8082"
    assert pod["metadata"]["labels"]["serving.kserve.io/inferenceservice"] == "wan-t2v-a14b"
    assert "minReplicas" not in pod["spec"] and "model" not in pod["spec"]


# -- the TorchServe configs ----------------------------------------------------------------

# URLs TorchServe must never register a model from (SSRF, CVE-2023-43654): allowed_urls must
# match none of them (TorchServe matches each comma-separated regex against the whole URL).
FETCHABLE = ["https://example.com/wan.mar", "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:8081/",
             "file:///etc/passwd", "file:///mnt/models/model-store/wan.mar", "s3://bucket/wan.mar",
             "ftp://example.com/wan.mar", "wan.mar"]


def _assert_registration_off(props: dict[str, str]) -> None:
    assert props.get("enable_model_api") == "false", "model register/delete over the API must stay off"
    patterns = [p for p in props.get("allowed_urls", "").split(",") if p]
    assert patterns, "allowed_urls must be set (TorchServe's default admits any http(s) and file URL)"
    assert not [(u, p) for u in FETCHABLE for p in patterns if re.fullmatch(p, u)]
    for key in ("load_models", "models", "model_store_url"):
        assert key not in props


def test_local_config_listens_on_loopback_only_with_token_auth_and_no_registration():
    props = read_properties(LOCAL_CONFIG.read_text())
    addresses = {k: v for k, v in props.items() if k.endswith("_address")}
    assert set(addresses) == {"inference_address", "management_address", "metrics_address",
                              "grpc_inference_address", "grpc_management_address"}
    for key, value in addresses.items():
        host = value.split("://", 1)[-1].rsplit(":", 1)[0] if "://" in value else value
        assert host == "127.0.0.1", f"{key}={value}: a workstation server listens on 127.0.0.1 only"
    assert props.get("disable_token_authorization", "false") == "false", "token authorization stays on locally"
    assert "enable_envvars_config" not in props  # no TS_* environment overrides of the above
    _assert_registration_off(props)


def _comment_above(text: str, line: str) -> str:
    lines = text.splitlines()
    at = lines.index(line)
    block = []
    for previous in reversed(lines[:at]):
        if not previous.startswith("#"):
            break
        block.insert(0, previous)
    return "\n".join(block)


def test_kserve_config_keeps_management_and_grpc_in_the_pod_and_says_why_auth_is_off():
    text = KSERVE_CONFIG.read_text()
    props = read_properties(text)
    for key in ("management_address", "grpc_inference_address", "grpc_management_address"):
        host = props[key].split("://", 1)[-1].rsplit(":", 1)[0] if "://" in props[key] else props[key]
        assert host == "127.0.0.1", f"{key}={props[key]}: it must not be reachable from outside the pod"
    # Metrics: on 127.0.0.1, or on the one port the runtime documents for Prometheus.
    metrics = props["metrics_address"]
    if "127.0.0.1" not in metrics:
        port = metrics.rsplit(":", 1)[1]
        [runtime] = _docs(RUNTIME_FILE)
        assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == port
        assert "Prometheus" in _comment_above(text, f"metrics_address={metrics}")
    # Token authorization off only with the reason next to it: KServe's probes, from inside the pod.
    assert props["disable_token_authorization"] == "true"
    why = _comment_above(text, "disable_token_authorization=true")
    assert "probe" in why and ("KServe" in why or "Knative" in why)
    assert "127.0.0.1" in why and "ingress" in why
    _assert_registration_off(props)


def test_kserve_manifests_expose_the_inference_port_only():
    props = read_properties(KSERVE_CONFIG.read_text())
    inference = int(props["inference_address"].rsplit(":", 1)[1])
    metrics = int(props["metrics_address"].rsplit(":", 1)[1])
    internal = {int(props["management_address"].rsplit(":", 1)[1]), int(props["grpc_inference_port"]),
                int(props["grpc_management_port"])}
    manifests, _ = load_manifests([KSERVE, REPO_ROOT / "karmada"])
    for m in manifests:
        if m.kind in ("ServingRuntime", "ClusterServingRuntime"):
            for container in m.get("spec", "containers", default=[]):
                # Triton's runtime: its HTTP port only (gRPC and metrics stay inside the pod).
                expected = 8080 if "tritonserver" in container.get("args", []) else inference
                assert [p["containerPort"] for p in container.get("ports", [])] == [expected], m.label
    [deployment] = _docs(PLAIN_DEPLOYMENT)
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The metrics port is declared for Prometheus' pod discovery, and documented there.
    assert set(named.values()) == {inference, metrics} and not set(named.values()) & internal
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    services = [m for m in manifests if m.kind == "Service"]
    assert services
    for service in services:
        targets = {named.get(p.get("targetPort"), p.get("targetPort")) for p in service.get("spec", "ports")}
        assert targets == {inference}, f"{service.label} exposes {targets}: the inference port only"
    [policy] = [m for m in manifests if m.kind == "NetworkPolicy"]
    allowed = {named.get(p["port"], p["port"]) for rule in policy.get("spec", "ingress") for p in rule["ports"]}
    assert allowed == {inference, metrics}
    assert all(rule.get("from") for rule in policy.get("spec", "ingress")), "every rule names who may connect"


# -- a running server ----------------------------------------------------------------------


def _listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (IPv4 and IPv6), from /proc."""
    found = set()
    for name in ("tcp", "tcp6"):
        table = Path("/proc/net") / name
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # Each 32-bit word is in the host's (little-endian) order.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed)
            found.add(str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip))
    return found


def test_the_running_server_listens_on_loopback_only(torchserve):
    props = read_properties(torchserve.layout.ts_config.read_text())
    ports = [int(props[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address", "metrics_address")]
    ports += [int(props["grpc_inference_port"]), int(props["grpc_management_port"])]
    for port in ports:
        assert _listening(port) == {"127.0.0.1"}, f"port {port} listens on {_listening(port) or 'nothing'}"


def test_listening_addresses_are_read_right():
    """The /proc reader itself: a socket on all interfaces is seen as such."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert _listening(s.getsockname()[1]) == {"0.0.0.0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert _listening(s.getsockname()[1]) == {"127.0.0.1"}


# -- no remote fetches ----------------------------------------------------------------------

# Modules (and their submodules) that open connections. urllib.parse only parses strings, and
# http's HTTPStatus is an enum: those stay allowed.
NETWORK_MODULES = {"urllib", "urllib3", "requests", "httpx", "aiohttp", "http.client", "http.server", "ftplib",
                   "pycurl", "websocket", "websockets", "socket", "smtplib", "xmlrpc", "fsspec", "huggingface_hub"}
OBJECT_STORE = {"boto3", "botocore", "s3transfer", "aiobotocore"}
HARMLESS = {"urllib.parse"}
STORAGE_MODULE = "handler/storage.py"
# Modules that call an address the operator configured, never one from a request: each with why.
# The request path (parse, generate, encode, store) still fetches nothing.
OPERATOR_ADDRESSED = {
    "handler/triton_health.py": "the liveness probe asks the pod's own Triton on 127.0.0.1",
    "handler/cancel.py": "the cancellation check asks the operator's WAN_CANCEL_URL (the job service), "
                         "with only a job id from the request, checked for its form",
}


def remote_access(source: str, filename: str) -> list[str]:
    """The network clients a module imports (statically or through importlib/__import__), except
    object storage in handler/storage.py."""
    allowed = OBJECT_STORE if filename == STORAGE_MODULE else set()
    if filename in OPERATOR_ADDRESSED:
        return []
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if called in ("import_module", "__import__"):
                names = [node.args[0].value]
        for name in names:
            if any(name == h or name.startswith(h + ".") for h in HARMLESS):
                continue
            top = name.split(".")[0]
            if any(name == m or name.startswith(m + ".") for m in NETWORK_MODULES) or \
                    (top in OBJECT_STORE and top not in allowed):
                found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_handler_imports_no_network_client_and_boto3_only_for_storage():
    files = sorted((REPO_ROOT / "handler").glob("*.py"))
    assert len(files) >= 8
    found = [hit for f in files for hit in remote_access(f.read_text(), str(f.relative_to(REPO_ROOT)))]
    assert found == [], "the handler must not fetch anything: " + ", ".join(found)
    # And storage does use boto3, and each operator-addressed module does open connections: the
    # allowances are not dead.
    for module in OPERATOR_ADDRESSED:
        source = (REPO_ROOT / module).read_text()
        assert remote_access(source, "handler/service.py"), f"{module} opens no connection: drop its allowance"
    storage = (REPO_ROOT / STORAGE_MODULE).read_text()
    assert "import boto3" in storage and remote_access(storage, "handler/service.py")


@pytest.mark.parametrize(("source", "flagged"), [
    ("import requests", True),
    ("from urllib.request import urlopen", True),
    ("import urllib.request as u", True),
    ("from http import client", True),
    ("from http import HTTPStatus", False),
    ("import httpx, json", True),
    ("import importlib\nimportlib.import_module('aiohttp')", True),
    ("__import__('urllib3')", True),
    ("import boto3", True),
    ("from botocore.config import Config", True),
    ("from urllib.parse import urlsplit", False),
    ("import json, base64", False),
    ("from .request import parse", False),
])
def test_the_import_check_flags_what_it_forbids(source, flagged):
    assert bool(remote_access(source, "handler/service.py")) is flagged
    assert remote_access("import boto3\nfrom botocore.config import Config", STORAGE_MODULE) == []


def test_image_urls_are_refused_by_the_request_tests():
    """The handler's other way to fetch, an image given as a URL, is tested in test_images.py
    (test_urls_are_never_fetched, over these URLs)."""
    schemes = {value.strip().split(":", 1)[0].lower() for value in REMOTE_IMAGE_URLS}
    assert {"http", "https", "ftp", "file", "s3"} <= schemes


# -- the image ------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|ghp_[0-9A-Za-z]{36}|hf_[0-9A-Za-z]{30,}")


def test_the_image_carries_no_secrets():
    text = (REPO_ROOT / "Dockerfile").read_text()
    for keyword, rest in instructions(text):
        if keyword in ("ARG", "ENV"):
            for name in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                assert not SECRET_NAME.search(name), f"{keyword} {name}: build args and ENV are visible in the image"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.aws|\.netrc|\.ssh|id_rsa|\.pem\b|\.env\b|key_file", rest), f"{keyword} {rest}"
    assert not SECRET_VALUE.search(text)


def test_everything_the_image_writes_lands_on_a_writable_mount():
    env = image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    writable = ["TMPDIR", "TEMP", "LOG_LOCATION", "METRICS_LOCATION", "XDG_CACHE_HOME", "HF_HOME",
                "TORCHINDUCTOR_CACHE_DIR", "TRITON_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"]
    [deployment] = _docs(PLAIN_DEPLOYMENT)
    pods = [("runtime", _runtime_container(), _docs(RUNTIME_FILE)[0]["spec"]["volumes"]),
            ("plain", deployment["spec"]["template"]["spec"]["containers"][0],
             deployment["spec"]["template"]["spec"]["volumes"])]
    for where, container, volumes in pods:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        empty_dirs = {v["name"] for v in volumes if "emptyDir" in v}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]
                  if m["name"] in empty_dirs and not m.get("readOnly")}
        for key in writable:
            assert any(env[key] == path or env[key].startswith(path + "/") for path in mounts), \
                f"{where}: {key}={env[key]} is on the read-only root filesystem"
        # ... and no mount without a reason to exist.
        for path in mounts:
            assert any(env[key] == path or env[key].startswith(path + "/") for key in writable), path
        assert all(v["emptyDir"].get("sizeLimit") for v in volumes if "emptyDir" in v), where
    # The uid the image runs as is the one the manifests declare.
    [user] = [rest for keyword, rest in stages((REPO_ROOT / "Dockerfile").read_text())[-1] if keyword == "USER"]
    assert _runtime_container()["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])

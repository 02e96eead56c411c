"""The job service's manifests (jobs/deploy/ and karmada/placement/jobs-service.yaml) against the
real CRDs (CloudNativePG Cluster, KEDA ScaledObject and TriggerAuthentication: the ``crds``
fixture) and the validator's cross-checks (scripts/manifests/jobs.py): the shipped set passes,
and each mistake below, made on a copy of it, fails with the message it deserves."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.config import load_settings
from scripts.manifests import CHECKS, DEFAULT_PATHS, REPO_ROOT, Context, jobs, load_manifests, validate_manifests
from scripts.manifests.core import Manifest

JOBS_DEPLOY = REPO_ROOT / "jobs" / "deploy"


@pytest.fixture(scope="module")
def shipped() -> list[Manifest]:
    """Everything a platform engineer applies: kserve/, karmada/ and jobs/deploy/."""
    manifests, problems = load_manifests(DEFAULT_PATHS)
    assert not problems
    return manifests


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    [found] = [m for m in manifests if m.kind == kind and m.name == name]
    return found


def changed(manifests: list[Manifest], kind: str, name: str, change: Callable[[dict[str, Any]], Any]) -> list[Manifest]:
    """A copy of ``manifests`` where ``change`` edited the document of ``kind``/``name`` in place."""
    target = find(manifests, kind, name)
    out = []
    for m in manifests:
        if m is target:
            doc = copy.deepcopy(m.doc)
            change(doc)
            m = Manifest(m.path, m.index, doc)
        out.append(m)
    return out


def container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]["containers"][0]


def jobs_yaml(doc: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> None:
    config = yaml.safe_load(doc["data"]["jobs.yaml"])
    edit(config)
    doc["data"]["jobs.yaml"] = yaml.safe_dump(config)


def endpoint(config: dict[str, Any], model: str, name: str = "private") -> dict[str, Any]:
    [m] = [m for m in config["models"] if m["name"] == model]
    [e] = [e for e in m["endpoints"] if e["name"] == name]
    return e


def test_the_job_service_is_among_the_default_paths(shipped):
    # A skipped folder would pass every check below quietly.
    assert JOBS_DEPLOY in DEFAULT_PATHS
    kinds = {(m.api_version, m.kind) for m in shipped if m.path.is_relative_to(JOBS_DEPLOY)}
    assert {jobs.CNPG_CLUSTER, jobs.SCALED_OBJECT, jobs.TRIGGER_AUTHENTICATION, ("apps/v1", "Deployment"),
            ("batch/v1", "Job"), ("networking.k8s.io/v1", "NetworkPolicy")} <= kinds
    assert set(jobs.CHECKS) <= set(CHECKS)


def test_the_shipped_job_service_passes(shipped, crds):
    assert crds.knows(*jobs.CNPG_CLUSTER) and crds.knows(*jobs.SCALED_OBJECT)
    problems = validate_manifests(shipped, crds)
    assert problems == [], "\n".join(map(str, problems))


def test_the_configmap_is_what_the_job_service_loads(shipped, tmp_path):
    """The cluster's jobs.yaml through the job service's own loader (unknown keys refused, each
    model's limits read from its model config), with the image's config/ mapped onto ours."""
    text = find(shipped, "ConfigMap", "wan-jobs-config").doc["data"]["jobs.yaml"]
    text = text.replace(f"{jobs.IMAGE_CONFIG_DIR}/", f"{REPO_ROOT / 'config'}/")
    (tmp_path / "jobs.yaml").write_text(text)
    settings = load_settings(tmp_path / "jobs.yaml", run_dir=tmp_path, environ={})
    assert {m.spec.name for m in settings.models} == {"t2v-a14b", "ti2v-5b", "i2v-a14b"}
    for model in settings.models:
        # Private first: the worker fills it before it sends anything to the public cluster.
        assert [e.name for e in model.endpoints] == ["private", "public-spot"]


def test_the_database_and_the_service_stay_private(shipped, crds):
    """Every object of wan-jobs, and the namespace itself, is placed on wan-private only."""
    world = Context(shipped, crds).world
    objects = [m for m in world.templates if m.namespace == "wan-jobs" or (m.kind, m.name) == ("Namespace", "wan-jobs")]
    assert len(objects) >= 14
    for obj in objects:
        policy, ties = world.claim(obj)
        assert policy is not None and not ties, f"{obj.kind} {obj.name}"
        assert world.choosable(policy) == {"wan-private"}, f"{obj.kind} {obj.name}"


def _database_secret_ref(field: str, value: str):
    def change(doc):
        [env] = [e for e in container(doc)["env"] if e["name"] == "JOBS_DATABASE_URL"]
        env["valueFrom"]["secretKeyRef"][field] = value
    return change


def _readiness(doc):
    container(doc)["readinessProbe"]["httpGet"]["path"] = "/ready"


def _loopback(doc):
    container(doc)["command"] = ["python", "-m", "jobs", "serve", "--port", "8000"]


def _worker_metrics_port(doc):
    container(doc)["command"] = ["python", "-m", "jobs", "worker", "--metrics-port", "9200"]


def _service_selects_worker(doc):
    doc["spec"]["selector"]["app.kubernetes.io/component"] = "worker"


def _scale_the_api(doc):
    doc["spec"]["scaleTargetRef"]["name"] = "wan-jobs-api"


def _zero_target(doc):
    doc["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = "0"


def _plain_connection(doc):
    doc["spec"]["triggers"][0]["metadata"]["connection"] = "postgresql://app@wan-jobs-db-rw/app"


def _unknown_auth(doc):
    doc["spec"]["triggers"][0]["authenticationRef"]["name"] = "wan-jobs-database"


def _model_config(doc):
    jobs_yaml(doc, lambda c: c["models"][0].update(model_config="/opt/wan-jobs/config/models/t2v.yaml"))


def _unknown_service(doc):
    jobs_yaml(doc, lambda c: endpoint(c, "wan-ti2v-5b").update(url="http://wan-ti2v.wan.svc.cluster.local"))


def _other_variant(doc):
    jobs_yaml(doc, lambda c: endpoint(c, "wan-ti2v-5b").update(url="http://wan-t2v-a14b.wan.svc.cluster.local"))


def _too_much_capacity(doc):
    jobs_yaml(doc, lambda c: endpoint(c, "wan-ti2v-5b").update(capacity=64))


def _short_timeout(doc):
    jobs_yaml(doc, lambda c: endpoint(c, "wan-ti2v-5b").update(timeout_s=60))


def _no_config(doc):
    container(doc)["env"] = [e for e in container(doc)["env"] if e["name"] != "JOBS_CONFIG"]


def _schema_typo(doc):
    doc["spec"]["instance"] = doc["spec"].pop("instances")


def _keda_schema(doc):
    del doc["spec"]["triggers"][0]["type"]


def _any_cluster(doc):
    # No affinity and the spot taint tolerated: every cluster may be chosen (without the
    # toleration the spot cluster's taint alone would keep it out, which the check accepts).
    doc["spec"]["placement"] = {"clusterTolerations": [{"key": "wan.serving/spot", "operator": "Exists",
                                                        "effect": "NoSchedule"}],
                                "replicaScheduling": {"replicaSchedulingType": "Duplicated"}}


def _namespace_synced(doc):
    del doc["metadata"]["labels"]["namespace.karmada.io/skip-auto-propagation"]


# (kind, name, change, where, a piece of the message): one mistake each.
CASES = {
    "secret-name-typo": ("Deployment", "wan-jobs-api", _database_secret_ref("name", "wan-jobs-db-ap"),
                         "/spec/template/spec/containers/0/env/1/valueFrom/secretKeyRef",
                         "reads Secret 'wan-jobs-db-ap', which neither we ship nor an operator creates"),
    "secret-key-typo": ("Deployment", "wan-jobs-worker", _database_secret_ref("key", "url"),
                        "/spec/template/spec/containers/0/env/1/valueFrom/secretKeyRef",
                        "Secret 'wan-jobs-db-app' has no key 'url'"),
    "readiness-path": ("Deployment", "wan-jobs-api", _readiness,
                       "/spec/template/spec/containers/0/readinessProbe/httpGet/path",
                       "readinessProbe asks '/ready'; it must be /readyz"),
    "api-on-loopback": ("Deployment", "wan-jobs-api", _loopback, "/spec/template/spec/containers/0/command",
                        "the API listens on loopback only"),
    "worker-metrics-port": ("Deployment", "wan-jobs-worker", _worker_metrics_port,
                            "/spec/template/metadata/annotations", "the worker's --metrics-port 9200"),
    "service-selects-worker": ("Service", "wan-jobs-api", _service_selects_worker, "/spec/selector",
                               "selects the worker wan-jobs-worker"),
    "keda-scales-the-api": ("ScaledObject", "wan-jobs-worker", _scale_the_api, "/spec/scaleTargetRef",
                            "scales the API on the queue"),
    "keda-zero-target": ("ScaledObject", "wan-jobs-worker", _zero_target, "/spec/triggers/0/metadata/targetQueryValue",
                         "targetQueryValue must be a non-zero number"),
    "keda-plain-connection": ("ScaledObject", "wan-jobs-worker", _plain_connection,
                              "/spec/triggers/0/metadata/connection", "KEDA ignores a connection in plain metadata"),
    "keda-unknown-auth": ("ScaledObject", "wan-jobs-worker", _unknown_auth, "/spec/triggers/0/authenticationRef",
                          "TriggerAuthentication 'wan-jobs-database' is not shipped"),
    "model-config-missing": ("ConfigMap", "wan-jobs-config", _model_config, "/data/jobs.yaml models[0]",
                             "model_config /opt/wan-jobs/config/models/t2v.yaml is not a file the image carries"),
    "endpoint-unknown-service": ("ConfigMap", "wan-jobs-config", _unknown_service,
                                 "/data/jobs.yaml models[1].endpoints[0]",
                                 "wan-ti2v.wan.svc.cluster.local is no InferenceService we ship"),
    "endpoint-other-variant": ("ConfigMap", "wan-jobs-config", _other_variant, "/data/jobs.yaml models[1].endpoints[0]",
                               "model 'wan-ti2v-5b' is variant ti2v-5b, but wan-t2v-a14b serves t2v-a14b"),
    "endpoint-capacity": ("ConfigMap", "wan-jobs-config", _too_much_capacity, "/data/jobs.yaml models[1].endpoints[0]",
                          "capacity 64 is more than wan-ti2v-5b runs at once"),
    "endpoint-timeout": ("ConfigMap", "wan-jobs-config", _short_timeout, "/data/jobs.yaml models[1].endpoints[0]",
                         "timeout_s 60 is shorter than wan-ti2v-5b's timeout"),
    "no-jobs-config": ("Deployment", "wan-jobs-worker", _no_config, "/spec/template/spec/containers/0/env",
                       "JOBS_CONFIG is not set"),
    "cnpg-schema": ("Cluster", "wan-jobs-db", _schema_typo, "/spec",
                    "Additional properties are not allowed ('instance' was unexpected)"),
    "keda-schema": ("ScaledObject", "wan-jobs-worker", _keda_schema, "/spec/triggers/0", "'type' is a required property"),
    "placed-anywhere": ("PropagationPolicy", "wan-jobs-service", _any_cluster, "/spec/placement",
                        "may place Cluster wan-jobs-db of the job service on wan-public-spot, not a private cluster"),
    "namespace-synced": ("Namespace", "wan-jobs", _namespace_synced, "/metadata/labels",
                         "Karmada's namespace sync would create it on every member cluster"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_fails_with_a_clear_message(shipped, crds, case):
    kind, name, change, where, expected = CASES[case]
    problems = validate_manifests(changed(shipped, kind, name, change), crds)
    assert any(p.where == where and expected in p.message for p in problems), "\n".join(map(str, problems))


def test_the_namespace_placed_by_no_policy_is_named(shipped, crds):
    without = [m for m in shipped if not (m.kind == "ClusterPropagationPolicy" and m.name == "wan-jobs-namespace")]
    problems = validate_manifests(without, crds)
    assert any("Namespace wan-jobs of the job service is placed by no policy" in p.message for p in problems), \
        "\n".join(map(str, problems))


def test_without_karmada_nothing_is_said_of_placement(crds):
    """jobs/deploy/ alone is what a cluster without Karmada applies: nothing to place."""
    manifests, _ = load_manifests([REPO_ROOT / "kserve", JOBS_DEPLOY])
    problems = validate_manifests(manifests, crds)
    assert problems == [], "\n".join(map(str, problems))


def test_the_api_routes_are_read_from_the_source():
    routes = jobs.api_routes(REPO_ROOT)
    assert {jobs.LIVENESS_PATH, jobs.READINESS_PATH, jobs.METRICS_PATH, "/v1/videos"} <= routes
    assert jobs.api_routes(Path("/nonexistent")) is None

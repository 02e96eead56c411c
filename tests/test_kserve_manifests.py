"""The KServe manifests against the real CRDs (the ``crds`` fixture) and the validator's cross-checks:
every shipped manifest passes, each broken one fails with the message it deserves."""

from __future__ import annotations

import copy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model_store.kserve_store import VARIANTS, build_kserve_store, read_properties, variant_config_file
from scripts.manifests import DEFAULT_PATHS, REPO_ROOT, Context, kserve, load_crds, load_manifests, validate
from scripts.manifests.__main__ import main
from scripts.manifests.kube import duration_s, quantity
from scripts.manifests.torchserve import TORCHRUN_PARALLEL_TYPES

KSERVE = REPO_ROOT / "kserve"
BROKEN = Path(__file__).parent / "manifests_broken"
IMAGE = "registry.wan.internal/wan/wan-torchserve:0.1.0"
# The variants with an InferenceService in kserve/ (every variant has a model config and a store;
# the other multi-GPU configs are served by copying the 4-GPU service, kserve/README.md).
ISVC_VARIANTS = tuple(v for v in VARIANTS if (KSERVE / f"inferenceservice-{v}.yaml").is_file())

# file -> (where, a piece of the message) of the problem it must raise.
BROKEN_CASES = {
    "wrong-field.yaml": ("/spec/predictor/model",
                         "Additional properties are not allowed ('storageURI' was unexpected)"),
    "missing-gpu.yaml": ("/spec/predictor/model/resources/limits", "no nvidia.com/gpu limit"),
    "no-cpu-limit.yaml": ("/spec/predictor/model/resources/limits",
                          "no cpu limit: KServe fills it from its inferenceservice-config"),
    "timeout-shorter-than-torchserve.yaml": (
        "/spec/predictor/timeout",
        "timeout 600 s is shorter than TorchServe's responseTimeout 900 s (config/models/ti2v-5b.yaml)"),
    "unknown-runtime.yaml": ("/spec/predictor/model/runtime", "unknown runtime 'wan-torchserve-gpu'"),
    "bad-storage-uri.yaml": ("/spec/predictor/model/storageUri", "'Wan_Models' is not a valid S3 bucket name"),
    "storage-uri-of-another-variant.yaml": ("/spec/predictor/model/storageUri",
                                            "'s3://wan-models/t2v-a14b' is not a ti2v-5b store"),
    "no-gpu-node-selector.yaml": ("/spec/predictor/nodeSelector", 'must require nvidia.com/gpu.present: "true"'),
    "sets-torchserve-envelope.yaml": ("/spec/predictor/model/env/0",
                                      "sets TS_SERVICE_ENVELOPE: remove it; the handler reads KServe v1/v2 bodies"),
    "progress-deadline-shorter-than-startup.yaml": (
        "/spec/predictor/annotations",
        "progress deadline (300 s) is shorter than TorchServe's startupTimeout 600 s"),
    "serverless-mode-name.yaml": ("/metadata/annotations", "deploymentMode must be Knative, got 'Serverless'"),
    "concurrency-above-workers.yaml": ("/spec/predictor/containerConcurrency",
                                       "containerConcurrency 4 exceeds what TorchServe runs at once"),
    "runtime-port-mismatch.yaml": ("/spec/containers/0/ports",
                                   ("TorchServe's inference port 8085 (inference_address in "
                                    "config/kserve/config.properties); found [8080]")),
    "duplicate-without-marker.yaml": ("/metadata/name",
                                      "'wan-t2v-a14b' is also declared in kserve/inferenceservice-t2v-a14b.yaml"),
    "second-apply-without-canary.yaml": ("/spec/predictor", "without canaryTrafficPercent"),
    "localmodelcache-unused.yaml": ("/spec/sourceModelUri", "is no InferenceService's storageUri"),
    "secret-with-credentials.yaml": ("/stringData/AWS_ACCESS_KEY_ID", "a credential in a manifest"),
    "s3-endpoint-with-scheme.yaml": ("/metadata/annotations", "must be host[:port] without a scheme"),
    "service-wrong-target-port.yaml": ("/spec/ports/0/targetPort",
                                       "targetPort 8080 is no container port of Deployment/wan-ti2v-5b-plain"),
    "gpu-limit-below-ranks.yaml": (
        "/spec/predictor/model/resources/limits",
        ("nvidia.com/gpu limit 2, but TorchServe runs maxWorkers 1 worker(s) of 4 rank(s), one GPU per rank "
         "(parallelType tp, torchrun.nproc-per-node 4, config/models/t2v-a14b-4gpu.yaml): the pod needs 4")),
    "multi-gpu-without-dev-shm.yaml": ("/spec/predictor/model/volumeMounts",
                                       "nothing is mounted at /dev/shm: one worker of 4 ranks"),
}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _isvc(variant: str) -> dict:
    [doc] = _docs(KSERVE / f"inferenceservice-{variant}.yaml")
    return doc


def test_crds_are_there(crds):
    # Everything below validates against them; without them the suite must not pass quietly.
    assert crds.knows("serving.kserve.io/v1beta1", "InferenceService")


def test_every_shipped_manifest_passes(crds):
    manifests, problems = load_manifests([KSERVE])
    assert len(manifests) >= 14 and not problems
    problems = validate([KSERVE], crds)
    assert problems == [], "\n".join(map(str, problems))


def test_the_command_line_reports_zero_problems(crds, capsys):
    assert main(["--crds", str(crds.crd_dir), str(KSERVE)]) == 0
    assert ", 0 problems" in capsys.readouterr().err


def test_the_validator_imports_without_torch():
    """An operator's laptop or a CI job validates manifests without the serving stack."""
    code = ("import sys; sys.modules.update(torch=None, diffusers=None, transformers=None); "
            "import scripts.manifests, scripts.manifests.__main__, scripts.manifests.security")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def test_kserve_karmada_and_the_job_service_together_pass(crds):
    """What Karmada propagates is these objects: every folder, every registered check."""
    problems = validate(DEFAULT_PATHS, crds)
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_broken_manifest_fails_with_the_expected_message(crds, name):
    broken = BROKEN / name
    problems = validate([KSERVE, broken], crds)
    assert problems, f"{name} passed the validator"
    # Only the broken file is blamed, with file and path in every message.
    assert all(p.manifest is not None and p.manifest.path == broken.resolve() for p in problems), \
        "\n".join(map(str, problems))
    where, expected = BROKEN_CASES[name]
    assert any(p.where == where and expected in p.message for p in problems), "\n".join(map(str, problems))
    assert all(str(p).startswith(f"tests/manifests_broken/{name}[0] ") for p in problems)


def test_every_broken_fixture_has_an_expectation():
    assert {p.name for p in BROKEN.glob("*.yaml")} == set(BROKEN_CASES)


def test_missing_crds_fail_loudly(tmp_path, capsys):
    problems = validate([KSERVE], load_crds(tmp_path / "no-crds"), checks=[])
    messages = [str(p) for p in problems]
    assert any("no-crds does not exist" in m and "kubectl get crd NAME -o yaml" in m for m in messages)
    isvc = [m for m in messages if "InferenceService/wan-ti2v-5b" in m]
    assert isvc and "not served by the CRDs" in isvc[0] and "(the folder is missing)" in isvc[0]


def test_the_validator_never_opens_a_connection(crds, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the validator tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert validate([KSERVE], crds) == []
    assert validate([KSERVE, BROKEN / "timeout-shorter-than-torchserve.yaml"], crds)


def test_each_file_holds_one_object_under_a_header_comment():
    files = sorted(KSERVE.rglob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        text = path.read_text()
        assert text.startswith("# ") and len(text.split("\n", 1)[0]) > 20, f"{path}: no header comment"
        assert len(_docs(path)) == 1, f"{path}: one concern per file"


def test_the_names_karmada_relies_on():
    [runtime] = _docs(KSERVE / "clusterservingruntime-wan-torchserve.yaml")
    assert (runtime["kind"], runtime["metadata"]["name"]) == ("ClusterServingRuntime", "wan-torchserve")
    assert "namespace" not in runtime["metadata"]
    assert [f["name"] for f in runtime["spec"]["supportedModelFormats"]] == ["pytorch"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v1", "v2"}
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"] == IMAGE
    assert set(ISVC_VARIANTS) >= {"ti2v-5b", "t2v-a14b", "i2v-a14b", "t2v-a14b-4gpu"}
    for variant in ISVC_VARIANTS:
        isvc = _isvc(variant)
        meta, predictor = isvc["metadata"], isvc["spec"]["predictor"]
        assert (meta["name"], meta["namespace"]) == (f"wan-{variant}", "wan")
        assert meta["labels"]["app.kubernetes.io/name"] == "wan"
        assert meta["labels"]["wan.serving/variant"] == variant
        assert meta["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
        assert predictor["serviceAccountName"] == "wan-s3"
        assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] >= 1
        assert predictor["containerConcurrency"] == 1
        assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        model = predictor["model"]
        assert model["image"] == IMAGE and model["runtime"] == "wan-torchserve"
        assert model["storageUri"] == f"s3://wan-models/{variant}"
        assert model["modelFormat"] == {"name": "pytorch"}
        assert int(model["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    [account] = _docs(KSERVE / "s3-serviceaccount.yaml")
    assert (account["metadata"]["name"], account["metadata"]["namespace"]) == ("wan-s3", "wan")
    assert account["secrets"] == [{"name": "wan-s3-credentials"}]
    [secret] = _docs(KSERVE / "s3-secret.yaml")
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == ("wan-s3-credentials", "wan")
    assert set(secret["metadata"]["annotations"]) == set(kserve.S3_ANNOTATIONS)
    assert "data" not in secret and "stringData" not in secret  # no credentials in git
    [cache] = _docs(KSERVE / "examples/localmodel/localmodelcache-ti2v-5b.yaml")
    assert cache["metadata"]["name"] == "wan-ti2v-5b-cache"
    assert cache["spec"]["sourceModelUri"] == _isvc("ti2v-5b")["spec"]["predictor"]["model"]["storageUri"]
    names = {(d["kind"], d["metadata"]["name"]) for p in (KSERVE / "plain").glob("*.yaml") for d in _docs(p)}
    assert names == {("Deployment", "wan-ti2v-5b-plain"), ("Service", "wan-ti2v-5b-plain"),
                     ("NetworkPolicy", "wan-ti2v-5b-plain"), ("PersistentVolumeClaim", "wan-weights")}


@pytest.mark.parametrize("variant", ISVC_VARIANTS)
def test_timeouts_agree_with_the_store_the_builder_writes(tmp_path, variant):
    """What the InferenceService allows against what TorchServe will apply, read from a built store."""
    store = build_kserve_store(variant_config_file(variant), tmp_path)
    snapshot = store.snapshot["models"]["wan"]["1.0"]
    predictor = _isvc(variant)["spec"]["predictor"]
    assert predictor["timeout"] >= snapshot["responseTimeout"]
    deadline = duration_s(predictor["annotations"]["serving.knative.dev/progress-deadline"])
    assert deadline >= snapshot["startupTimeout"]
    assert predictor["containerConcurrency"] <= snapshot["maxWorkers"] * snapshot["batchSize"]


def test_canary_example_is_the_base_service_with_a_new_store_and_a_traffic_split(crds, tmp_path):
    [canary] = _docs(KSERVE / "examples/canary-ti2v-5b.yaml")
    assert "# validate: second-apply-of kserve/inferenceservice-ti2v-5b.yaml" in \
        (KSERVE / "examples/canary-ti2v-5b.yaml").read_text().split("apiVersion", 1)[0]
    base = copy.deepcopy(_isvc("ti2v-5b"))
    assert 0 < canary["spec"]["predictor"].pop("canaryTrafficPercent") < 100
    new_store = canary["spec"]["predictor"]["model"].pop("storageUri")
    assert new_store != base["spec"]["predictor"]["model"].pop("storageUri")
    assert canary == base
    # The validator accepts it only because of the marker: without it, a duplicate.
    assert kserve.check_duplicates(Context(load_manifests([KSERVE])[0], crds)) == []
    unmarked = tmp_path / "canary.yaml"
    unmarked.write_text((KSERVE / "examples/canary-ti2v-5b.yaml").read_text().replace("# validate:", "# "))
    [problem] = kserve.check_duplicates(
        Context(load_manifests([KSERVE / "inferenceservice-ti2v-5b.yaml", unmarked])[0], crds))
    assert problem.manifest.path == unmarked and "also declared in" in problem.message


def _context_with(tmp_path: Path, properties: str, crds) -> Context:
    """The kserve/ manifests checked against a copy of config/ whose config.properties is ``properties``."""
    (tmp_path / "config" / "kserve").mkdir(parents=True)
    shutil.copytree(REPO_ROOT / "config" / "models", tmp_path / "config" / "models")
    (tmp_path / "config" / "kserve" / "config.properties").write_text(properties)
    return Context(load_manifests([KSERVE])[0], crds, repo_root=tmp_path)


@pytest.mark.parametrize(("change", "expected"), [
    (("disable_token_authorization=true", "disable_token_authorization=false"),
     "disable_token_authorization must be true"),
    (("install_py_dep_per_model=false", "install_py_dep_per_model=false\nenable_envvars_config=true"),
     "enable_envvars_config=true: TorchServe would take TS_* overrides of this file from the pod's env"),
    (("install_py_dep_per_model=false", "install_py_dep_per_model=false\nservice_envelope=kservev2"),
     "sets service_envelope: remove it; the handler reads KServe v1/v2 bodies itself"),
    (("management_address=http://127.0.0.1:8081", "management_address=http://0.0.0.0:8081"),
     "management_address must be http://127.0.0.1:<port>"),
    (("metrics_mode=prometheus", "metrics_mode=log"), "metrics_mode must be prometheus"),
    (("install_py_dep_per_model=false", "install_py_dep_per_model=false\nload_models=all"), "sets load_models"),
])
def test_the_kserve_torchserve_config_is_checked_too(crds, tmp_path, change, expected):
    text = (REPO_ROOT / "config/kserve/config.properties").read_text()
    assert change[0] in text
    context = _context_with(tmp_path, text.replace(change[0], change[1]), crds)
    problems = kserve.check_torchserve_config(context)
    assert any(expected in p.message and p.file == tmp_path / "config/kserve/config.properties" for p in problems), \
        problems


def test_the_shipped_kserve_config_leaves_torchserves_envelope_and_env_overrides_off():
    props = read_properties((REPO_ROOT / "config/kserve/config.properties").read_text())
    assert "service_envelope" not in props and "enable_envvars_config" not in props  # TorchServe's default: off


def test_a_torchserve_envelope_anywhere_in_a_pods_env_is_a_problem(crds):
    """In the runtime (and so in every InferenceService's merged pod), in a predictor with a
    v1 or v2 protocol, in the plain Deployment: each is named where it is set."""
    manifests = load_manifests([KSERVE])[0]
    context = Context(manifests, crds)
    envelope = {"name": kserve.ENVELOPE_ENV, "value": "kserve"}
    [runtime] = [m for m in manifests if m.kind == "ClusterServingRuntime"]
    runtime.doc["spec"]["containers"][0]["env"] = [{"name": "WAN_S3_BUCKET", "value": "results"}, envelope]
    [deployment] = [m for m in manifests if m.kind == "Deployment"]
    deployment.doc["spec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(envelope)
    isvc = next(m for m in manifests if m.kind == "InferenceService" and m.name == "wan-t2v-a14b")
    model = isvc.doc["spec"]["predictor"]["model"]
    model["protocolVersion"], model["env"] = "v2", [{**envelope, "value": "kservev2"}]
    problems = [p for check in kserve.CHECKS for p in check(context)]
    blamed = {(p.manifest.kind, p.manifest.name, p.where) for p in problems if p.manifest is not None}
    assert ("ClusterServingRuntime", "wan-torchserve", "/spec/containers/0/env/1") in blamed
    assert ("InferenceService", "wan-t2v-a14b", "/spec/predictor/model/env/0") in blamed
    env = len(deployment.doc["spec"]["template"]["spec"]["containers"][0]["env"]) - 1
    assert ("Deployment", "wan-ti2v-5b-plain", f"/spec/template/spec/containers/0/env/{env}") in blamed
    # The other services set nothing themselves, but their pods would get the runtime's.
    inherited = [p for p in problems if p.manifest is not None and p.manifest.kind == "InferenceService"
                 and p.where == "/spec/predictor/model/env"]
    assert {p.manifest.name for p in inherited} == {m.name for m in manifests if m.kind == "InferenceService"} - {
        "wan-t2v-a14b"}
    assert all("from runtime 'wan-torchserve'" in p.message for p in inherited)
    assert all("503" in p.message and "400" in p.message for p in problems if p.manifest is not None
               and "TS_SERVICE_ENVELOPE" in p.message)
    # Protocols: v1 and v2 only, with no word of an envelope.
    model["protocolVersion"] = "grpc-v2"
    [problem] = [p for p in kserve.check_inference_services(context)
                 if p.manifest is isvc and p.where == "/spec/predictor/model/protocolVersion"
                 and "is not served" in p.message]
    assert "v1 and v2" in problem.message and "envelope" not in problem.message


def test_ports_follow_config_properties(crds, tmp_path):
    """Move TorchServe's inference port in the config: the runtime, its probes and the plain
    Deployment no longer match, and say so."""
    text = (REPO_ROOT / "config/kserve/config.properties").read_text()
    context = _context_with(tmp_path, text.replace("0.0.0.0:8085", "0.0.0.0:9085"), crds)
    problems = [str(p) for check in kserve.CHECKS for p in check(context)]
    assert any("ClusterServingRuntime/wan-torchserve at /spec/containers/0/ports" in p and "9085" in p
               for p in problems)
    assert any("wan-torchserve at /spec/containers/0/livenessProbe/httpGet/port" in p for p in problems)
    assert any("Deployment/wan-ti2v-5b-plain" in p and "no containerPort 9085" in p for p in problems)


# -- GPUs per pod: the ranks of one TorchServe worker ------------------------------------------


def _ranks_per_worker(variant: str) -> int:
    """What TorchServe starts per worker: torchrun's nproc-per-node for a torchrun parallelType."""
    config = yaml.safe_load(variant_config_file(variant).read_text())
    if config.get("parallelType") in TORCHRUN_PARALLEL_TYPES:
        return config["torchrun"]["nproc-per-node"]
    return 1


@pytest.mark.parametrize("variant", ISVC_VARIANTS)
def test_each_service_asks_for_the_gpus_its_worker_uses(variant):
    config = yaml.safe_load(variant_config_file(variant).read_text())
    model = _isvc(variant)["spec"]["predictor"]["model"]
    expected = config["maxWorkers"] * _ranks_per_worker(variant)
    resources = model["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == int(resources["requests"]["nvidia.com/gpu"]) == expected


def test_the_multi_gpu_configs_and_the_4_gpu_service():
    assert {v: _ranks_per_worker(v) for v in VARIANTS} == {
        "ti2v-5b": 1, "t2v-a14b": 1, "i2v-a14b": 1, "ti2v-5b-2gpu": 2, "t2v-a14b-4gpu": 4, "i2v-a14b-4gpu": 4}
    predictor = _isvc("t2v-a14b-4gpu")["spec"]["predictor"]
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # NCCL's /dev/shm: memory-backed, bounded, in the model container.
    [mount] = [m for m in predictor["model"]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    [volume] = [v for v in predictor["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= 2**30
    # ... and it counts against the memory limit, which leaves room for the ranks.
    limits = predictor["model"]["resources"]["limits"]
    assert quantity(limits["memory"]) >= 4 * quantity(volume["emptyDir"]["sizeLimit"])


def test_the_4_gpu_service_is_the_one_gpu_service_with_more_gpus():
    """Security, scaling and placement settings stay those of wan-t2v-a14b; only what the 4 GPUs
    change differs."""
    one, four = copy.deepcopy(_isvc("t2v-a14b")), copy.deepcopy(_isvc("t2v-a14b-4gpu"))
    for isvc in (one, four):
        isvc["metadata"].pop("name")
        isvc["metadata"]["labels"].pop("wan.serving/variant")
        predictor = isvc["spec"]["predictor"]
        for key in ("timeout", "volumes"):
            predictor.pop(key, None)
        for key in ("storageUri", "resources", "volumeMounts"):
            predictor["model"].pop(key, None)
    assert four == one
    # Timeouts follow the 4-GPU model config (checked against TorchServe's by the validator).
    assert _isvc("t2v-a14b-4gpu")["spec"]["predictor"]["timeout"] < _isvc("t2v-a14b")["spec"]["predictor"]["timeout"]


def _validate_changed(crds, tmp_path: Path, change) -> list:
    """The 4-GPU service under another name, changed by ``change``, validated with kserve/."""
    isvc = copy.deepcopy(_isvc("t2v-a14b-4gpu"))
    isvc["metadata"]["name"] = "wan-t2v-a14b-4gpu-changed"
    change(isvc["spec"]["predictor"])
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(isvc))
    problems = validate([KSERVE, path], crds)
    assert all(p.manifest is not None and p.manifest.path == path.resolve() for p in problems), \
        "\n".join(map(str, problems))
    return problems


def _set_gpus(count: str):
    def change(predictor):
        predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] = count
        predictor["model"]["resources"]["requests"]["nvidia.com/gpu"] = count
    return change


def _shm_volume(predictor) -> dict:
    return predictor["volumes"][0]["emptyDir"]


@pytest.mark.parametrize(("change", "where", "expected"), [
    (_set_gpus("2"), "/spec/predictor/model/resources/limits", "the pod needs 4; ranks would find no GPU"),
    (_set_gpus("8"), "/spec/predictor/model/resources/limits", "the pod needs 4; the other GPUs would sit idle"),
    (lambda p: p["model"].pop("volumeMounts"), "/spec/predictor/model/volumeMounts", "nothing is mounted at /dev/shm"),
    (lambda p: _shm_volume(p).pop("medium"), "/spec/predictor/volumes", "must be an emptyDir with medium: Memory"),
    (lambda p: _shm_volume(p).pop("sizeLimit"), "/spec/predictor/volumes", "needs a sizeLimit"),
    (lambda p: p["model"]["volumeMounts"][0].update(readOnly=True), "/spec/predictor/model/volumeMounts",
     "/dev/shm is mounted readOnly"),
    (lambda p: p.pop("volumes"), "/spec/predictor/volumes", "which neither the predictor nor the runtime declares"),
], ids=["2-gpus", "8-gpus", "no-mount", "disk-backed", "unbounded", "read-only", "no-volume"])
def test_the_validator_checks_gpus_and_dev_shm_of_a_multi_gpu_service(crds, tmp_path, change, where, expected):
    assert _validate_changed(crds, tmp_path, lambda predictor: None) == []
    problems = _validate_changed(crds, tmp_path, change)
    assert any(p.where == where and expected in p.message for p in problems), "\n".join(map(str, problems))


def test_a_one_gpu_service_with_more_gpus_is_refused(crds, tmp_path):
    isvc = copy.deepcopy(_isvc("t2v-a14b"))
    isvc["metadata"]["name"] = "wan-t2v-a14b-changed"
    _set_gpus("2")(isvc["spec"]["predictor"])
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(isvc))
    [problem] = validate([KSERVE, path], crds)
    assert problem.where == "/spec/predictor/model/resources/limits"
    assert "worker(s) of 1 rank(s)" in problem.message and "the other GPUs would sit idle" in problem.message


def test_a_parallel_config_without_a_process_count_is_named(crds, tmp_path):
    context = _context_with(tmp_path, (REPO_ROOT / "config/kserve/config.properties").read_text(), crds)
    path = tmp_path / "config" / "models" / "t2v-a14b-4gpu.yaml"
    config = yaml.safe_load(path.read_text())
    del config["torchrun"]
    path.write_text(yaml.safe_dump(config))
    problems = kserve.check_inference_services(context)
    assert [(p.manifest.name, p.message) for p in problems] == [
        ("wan-t2v-a14b-4gpu", ("config/models/t2v-a14b-4gpu.yaml: parallelType tp without a torchrun.nproc-per-node "
                               "(a positive integer): TorchServe would not know how many ranks to start"))]

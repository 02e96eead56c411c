"""karmada/ through the manifest validator: the real CRDs (../shared/crds) plus the Karmada
cross-checks of scripts/manifests/karmada/. The good tree passes; each broken fixture in
tests/manifests_broken_karmada/ (a manifest that replaces its good twin, with the messages it
must produce in `# expect:` lines) fails with a clear message."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from scripts.manifests import CHECKS, REPO_ROOT, CrdSchemas, Manifest, load_manifests, validate, validate_manifests
from scripts.manifests.karmada import checks as karmada_checks
from scripts.manifests.karmada import clusters as cl
from scripts.manifests.karmada import overrides as ov
from scripts.manifests.karmada.world import World
from scripts.manifests.kube import CLUSTER_SERVING_RUNTIME, INFERENCE_SERVICE

KARMADA = REPO_ROOT / "karmada"
KSERVE = REPO_ROOT / "kserve"
# The job service's objects, which karmada/placement/jobs-service.yaml places.
JOBS_DEPLOY = REPO_ROOT / "jobs" / "deploy"
BROKEN = REPO_ROOT / "tests" / "manifests_broken_karmada"

# The KServe objects our policies select, with the names fixed for both engineers: lets these tests
# check karmada/ on its own terms whatever state kserve/ is in.
STANDIN_KSERVE = """
apiVersion: v1
kind: Namespace
metadata:
  name: wan
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: wan-s3
  namespace: wan
  labels: {app.kubernetes.io/name: wan}
secrets:
  - name: wan-s3-credentials
---
apiVersion: v1
kind: Secret
metadata:
  name: wan-s3-credentials
  namespace: wan
  labels: {app.kubernetes.io/name: wan}
  annotations:
    serving.kserve.io/s3-endpoint: s3.wan.internal:9000
    serving.kserve.io/s3-usehttps: "1"
    serving.kserve.io/s3-region: us-east-1
type: Opaque
---
apiVersion: serving.kserve.io/v1alpha1
kind: ClusterServingRuntime
metadata:
  name: wan-torchserve
spec:
  supportedModelFormats:
    - name: pytorch
      autoSelect: false
  protocolVersions: [v1, v2]
  containers:
    - name: kserve-container
      image: registry.wan.internal/wan/wan-torchserve:0.1.0
      ports:
        - containerPort: 8085
          protocol: TCP
"""
ISVC_TEMPLATE = """
---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: wan-{variant}
  namespace: wan
  labels: {{app.kubernetes.io/name: wan, wan.serving/variant: {variant}}}
  annotations: {{serving.kserve.io/deploymentMode: Knative}}
spec:
  predictor:
    serviceAccountName: wan-s3
    minReplicas: 0
    maxReplicas: {max_replicas}
    containerConcurrency: 1
    nodeSelector: {{nvidia.com/gpu.present: "true"}}
    tolerations:
      - {{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}
    model:
      modelFormat: {{name: pytorch}}
      runtime: wan-torchserve
      storageUri: s3://wan-models/{variant}
      image: registry.wan.internal/wan/wan-torchserve:0.1.0
      resources:
        requests: {{cpu: "8", memory: 96Gi, nvidia.com/gpu: "1"}}
        limits: {{memory: 128Gi, nvidia.com/gpu: "1"}}
"""
VARIANTS = {"ti2v-5b": 4, "t2v-a14b": 2, "i2v-a14b": 2, "t2v-a14b-4gpu": 2}


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kserve-standin") / "kserve-standin.yaml"
    path.write_text(STANDIN_KSERVE + "".join(ISVC_TEMPLATE.format(variant=v, max_replicas=m)
                                             for v, m in VARIANTS.items()))
    return path


def run_checks(manifests: list[Manifest], crds: CrdSchemas) -> list:
    """Schemas, then the Karmada checks only (the stand-in KServe objects are not the real ones)."""
    return validate_manifests(manifests, crds, checks=karmada_checks.CHECKS)


def identity(m: Manifest) -> tuple[str, str, str, str]:
    return (m.api_version, m.kind, m.namespace or "", m.name)


def good_world(standin: Path, crds: CrdSchemas) -> World:
    manifests, load_problems = load_manifests([KARMADA, JOBS_DEPLOY, standin])
    assert not load_problems
    return World(manifests, crds)


# -- the good tree -----------------------------------------------------------------------------------


def test_karmada_checks_are_registered():
    assert all(check in CHECKS for check in karmada_checks.CHECKS)
    assert len(karmada_checks.CHECKS) >= 8


def test_karmada_with_the_kserve_objects_passes(standin, crds):
    manifests, load_problems = load_manifests([KARMADA, JOBS_DEPLOY, standin])
    assert not load_problems
    assert [str(p) for p in run_checks(manifests, crds)] == []
    kinds = {m.kind for m in manifests if m.path.is_relative_to(KARMADA)}
    assert {"PropagationPolicy", "ClusterPropagationPolicy", "OverridePolicy", "ClusterOverridePolicy",
            "ResourceInterpreterCustomization", "PersistentVolumeClaim"} <= kinds


def test_the_repository_passes_the_whole_validator(crds):
    """karmada/ with kserve/ and jobs/deploy/, every check (python -m scripts.manifests)."""
    manifests, _ = load_manifests([KSERVE])
    have = {m.name for m in manifests if m.kind == "InferenceService"}
    # The stand-in above names these services: kserve/ must ship every one the policies place.
    assert {f"wan-{v}" for v in VARIANTS} <= have, f"kserve/ lacks InferenceServices (has {sorted(have)})"
    assert [str(p) for p in validate([KARMADA, KSERVE, JOBS_DEPLOY], crds)] == []


def test_karmada_alone_names_what_is_missing(crds):
    manifests, _ = load_manifests([KARMADA])
    messages = [str(p) for p in run_checks(manifests, crds)]
    assert any("PropagationPolicy/wan-inferenceservices at /spec/resourceSelectors/0: selects nothing we ship"
               in m for m in messages)
    assert any("ResourceInterpreterCustomization/wan-kserve-inferenceservice at /spec/target: targets "
               "serving.kserve.io/v1beta1 InferenceService, which we do not ship" in m for m in messages)


def test_placement_private_first_then_public(standin, crds):
    world = good_world(standin, crds)
    policy = next(p for p in world.policies if p.name == "wan-inferenceservices")
    groups = [(name, sorted(c.name for c in world.group_clusters(policy, affinity)))
              for _, name, affinity in world.placement_groups(policy)]
    assert groups == [("private", ["wan-private"]), ("public-spot", ["wan-public-spot"])]
    for name in VARIANTS:
        obj = world.find(*INFERENCE_SERVICE, "wan", f"wan-{name}")
        assert world.claim(obj)[0] is policy
    pvc = world.find("v1", "PersistentVolumeClaim", "wan", "wan-model-store")
    assert world.choosable(world.claim(pvc)[0]) == {"wan-private"}
    runtime = world.find(*CLUSTER_SERVING_RUNTIME, None, "wan-torchserve")
    assert world.choosable(world.claim(runtime)[0]) == {"wan-private", "wan-public-spot"}


def _per_cluster(world, name: str) -> tuple[dict, dict]:
    """The InferenceService ``name`` as the private and the public cluster get it."""
    obj = world.find(*INFERENCE_SERVICE, "wan", name)
    private, problems = ov.effective(world, obj, world.cluster("wan-private"))
    assert problems == []
    public, problems = ov.effective(world, obj, world.cluster("wan-public-spot"))
    assert problems == []
    return private, public


def test_the_four_gpu_service_reads_its_own_store_in_each_cluster(standin, crds):
    private, public = _per_cluster(good_world(standin, crds), "wan-t2v-a14b-4gpu")
    assert private["spec"]["predictor"]["model"]["storageUri"] == "pvc://wan-model-store/t2v-a14b-4gpu"
    assert public["spec"]["predictor"]["model"]["storageUri"] == "s3://wan-models-eu-west-1/t2v-a14b-4gpu"


def test_per_cluster_objects_after_the_overrides(standin, crds):
    world = good_world(standin, crds)
    private, public = _per_cluster(world, "wan-t2v-a14b")
    assert private["spec"]["predictor"]["model"]["storageUri"] == "pvc://wan-model-store/t2v-a14b"
    assert private["spec"]["predictor"]["model"]["image"] == "registry.wan.internal/wan/wan-torchserve:0.1.0"
    assert private["spec"]["predictor"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    predictor = public["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == "s3://wan-models-eu-west-1/t2v-a14b"
    assert predictor["model"]["image"] == "123456789012.dkr.ecr.eu-west-1.amazonaws.com/wan/wan-torchserve:0.1.0"
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true", "karpenter.sh/capacity-type": "spot",
                                         "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    secret = world.find("v1", "Secret", "wan", "wan-s3-credentials")
    annotations = ov.effective(world, secret, world.cluster("wan-public-spot"))[0]["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == "s3.eu-west-1.amazonaws.com"
    assert annotations["serving.kserve.io/s3-region"] == "eu-west-1"
    template = world.find(*INFERENCE_SERVICE, "wan", "wan-t2v-a14b")
    assert template.doc["spec"]["predictor"]["model"]["storageUri"] == "s3://wan-models/t2v-a14b"  # untouched


# -- broken manifests ------------------------------------------------------------------------------


def broken_fixtures() -> list[Path]:
    return sorted(BROKEN.glob("*.yaml"))


@pytest.mark.parametrize("fixture", broken_fixtures(), ids=lambda p: p.stem)
def test_broken_manifests_fail_with_clear_messages(fixture, standin, crds):
    text = fixture.read_text()
    expects = re.findall(r"^# expect: (.+)$", text, re.MULTILINE)
    removes = {(api_version, kind, *ref.rpartition("/")[::2]) for api_version, kind, ref in
               re.findall(r"^# remove: (\S+) (\S+) (\S+)$", text, re.MULTILINE)}
    assert expects, f"{fixture.name} says nothing about what it must produce"
    good, _ = load_manifests([KARMADA, JOBS_DEPLOY, standin])
    broken, load_problems = load_manifests([fixture])
    assert not load_problems
    replaced = {identity(m) for m in broken} | removes
    assert replaced, "a fixture replaces or removes something"
    manifests = [m for m in good if identity(m) not in replaced] + broken
    problems = run_checks(manifests, crds)
    messages = "\n".join(str(p) for p in problems)
    for expect in expects:
        assert expect in messages, f"{fixture.name}: expected {expect!r} in:\n{messages}"
    # Clear messages: each names the file and document it is about, and where in it.
    for problem in problems:
        assert re.match(r"^\S+\.yaml\[\d+\] \w+/\S+", str(problem)), str(problem)


def test_every_fixture_replaces_a_good_manifest_or_adds_one(standin):
    good = {identity(m) for m in load_manifests([KARMADA, JOBS_DEPLOY, standin])[0]}
    replacing = 0
    for fixture in broken_fixtures():
        docs = load_manifests([fixture])[0]
        replacing += any(identity(m) in good for m in docs)
    assert replacing >= 15  # most fixtures break a real file of karmada/, not an invented one


# -- the model behind the checks ------------------------------------------------------------------------


def test_json_patch_follows_rfc6902():
    doc = {"spec": {"predictor": {"nodeSelector": {"a": "1"}, "tolerations": [{"key": "x"}]}}}
    ov.json_patch(doc, "add", "/spec/predictor/nodeSelector/karpenter.sh~1capacity-type", "spot")
    ov.json_patch(doc, "add", "/spec/predictor/tolerations/-", {"key": "y"})
    ov.json_patch(doc, "replace", "/spec/predictor/nodeSelector/a", "2")
    assert doc["spec"]["predictor"] == {"nodeSelector": {"a": "2", "karpenter.sh/capacity-type": "spot"},
                                        "tolerations": [{"key": "x"}, {"key": "y"}]}
    for op, path in (("replace", "/spec/predictor/missing"), ("remove", "/spec/nope"),
                     ("add", "/spec/absent/child"), ("add", "/spec/predictor/tolerations/7")):
        with pytest.raises(ov.OverrideError):
            ov.json_patch(copy.deepcopy(doc), op, path, 1)


@pytest.mark.parametrize(("image", "registry", "text"), [
    ("registry.wan.internal/wan/wan-torchserve:0.1.0", "registry.wan.internal", None),
    ("localhost:5000/wan:1", "localhost:5000", None),
    ("busybox", "docker.io", None),
    ("wan/wan-torchserve@sha256:abc", "docker.io", None),
])
def test_image_parsing(image, registry, text):
    parsed = ov.Image.parse(image)
    assert parsed.registry == registry
    assert str(parsed) == (text or image)


def test_image_override_replaces_the_registry_only():
    overrider = {"component": "Registry", "operator": "replace", "value": "ecr.example.com"}
    assert ov._override_image("registry.wan.internal/wan/wan-torchserve:0.1.0", overrider) == \
        "ecr.example.com/wan/wan-torchserve:0.1.0"
    assert ov._override_image("wan/wan:1", {"component": "Tag", "operator": "replace", "value": "2"}) == "wan/wan:2"


def test_cluster_selection_and_taints():
    private, public = cl.CLUSTERS
    assert cl.cluster_matches({"labelSelector": {"matchLabels": {"wan.serving/tier": "public"}}}, public)
    assert not cl.cluster_matches({"labelSelector": {"matchLabels": {"wan.serving/tier": "public"}}}, private)
    assert cl.cluster_matches({"fieldSelector": {"matchExpressions": [
        {"key": "provider", "operator": "In", "values": ["aws"]}]}}, public)
    assert not cl.cluster_matches({"clusterNames": ["wan-public-spot"], "exclude": ["wan-public-spot"]}, public)
    assert cl.untolerated(public.taints, []) == [cl.SPOT_CLUSTER_TAINT]
    assert cl.untolerated(public.taints, [{"key": "wan.serving/spot", "operator": "Exists"}]) == []
    assert cl.untolerated(public.taints, [{"key": "wan.serving/spot", "value": "false"}]) == [cl.SPOT_CLUSTER_TAINT]


def test_claims_follow_karmadas_precedence(standin, crds):
    manifests, _ = load_manifests([KARMADA, JOBS_DEPLOY, standin])
    by_name = Manifest(Path("x.yaml"), 0, {
        "apiVersion": "policy.karmada.io/v1alpha1", "kind": "PropagationPolicy",
        "metadata": {"name": "zz-by-name", "namespace": "wan"},
        "spec": {"resourceSelectors": [{"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                                        "name": "wan-ti2v-5b"}], "placement": {}}})
    world = World([*manifests, by_name], crds)
    ti2v = world.find(*INFERENCE_SERVICE, "wan", "wan-ti2v-5b")
    t2v = world.find(*INFERENCE_SERVICE, "wan", "wan-t2v-a14b")
    assert world.claim(ti2v)[0] is by_name  # by name beats by label selector
    assert world.claim(t2v)[0].name == "wan-inferenceservices"
    by_name.doc["spec"]["resourceSelectors"][0]["namespace"] = "other"
    assert world.claim(ti2v)[0].name == "wan-inferenceservices"


def test_readme_documents_the_clusters():
    readme = (KARMADA / "README.md").read_text()
    for cluster in cl.CLUSTERS:
        assert cluster.name in readme
        for key, value in cluster.labels.items():
            assert f"{key}={value}" in readme, f"README lacks the label {key}={value} of {cluster.name}"
        for taint in cluster.taints:
            assert cl.taint_text(taint) in readme
        for taint in cluster.gpu_node_taints:
            assert cl.taint_text(taint) in readme
        for key, value in cluster.gpu_node_labels.items():
            assert f"{key}={value}" in readme
        assert cluster.sync_mode in readme
        for registry in cluster.registries:
            assert registry in readme

"""The clusters Karmada places on, and how a selector or a taint sees them.

Karmada's Cluster objects (cluster.karmada.io/v1alpha1) have no CRD: karmada-aggregated-apiserver
serves them, so they cannot be schema-validated like the rest of karmada/. Their names, labels and
taints are fixed here, documented in karmada/README.md (a test keeps the two in step), and set by
the platform engineers with the commands in that README. The node-level facts (GPU node labels
and taints, reachable registries and S3 endpoints) let the checks answer "would this
InferenceService actually run there after the overrides?".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


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


# -- selectors and taints -------------------------------------------------------------------------


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

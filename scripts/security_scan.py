"""checkov over what we ship, offline: the Dockerfile, the TorchServe configs, kserve/ and karmada/,
and the predictor pods KServe builds from them. ``make security`` and tests/test_security.py run
exactly this.

checkov's kubernetes framework checks core kinds only (Pod, Deployment, Service, ServiceAccount,
...): it parses an InferenceService, a ClusterServingRuntime or a Karmada policy and runs no check
on it. The pod that matters most, the predictor pod KServe makes of each InferenceService and the
``wan-torchserve`` runtime, is therefore rendered here and checked as a Pod: the runtime's
``kserve-container`` with the predictor's model fields merged over it, the runtime's pod fields
with the predictor's over them, the runtime's and the predictor's annotations and labels, the way
KServe's strategic merge builds it. The containers KServe and Knative add themselves
(storage-initializer, queue-proxy) are theirs, configured cluster-wide, and not rendered.

Accepted findings are skipped where they arise, with checkov's own syntax and a reason:
``# checkov:skip=CKV_DOCKER_7: reason`` in the Dockerfile, ``checkov.io/skipN: "CKV_K8S_43=reason"``
in a workload's annotations (for the predictor pods: in the runtime's ``spec.annotations``, which
KServe copies onto them, so a scanner of the live cluster reads the same). Anything else fails.

    python -m scripts.security_scan        # exit 1 on a finding that is not accepted

checkov runs from its own virtual environment (``.venv-tools``, installed by ``make``), never the
project's: its many pinned dependencies would move ours. It is told not to reach its platform or
PyPI (``--skip-download``, BC_SKIP_MAPPING, CKV_SKIP_PACKAGE_UPDATE_CHECK).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scripts.validate_manifests import DEFAULT_PATHS, REPO_ROOT, Manifest, load_manifests

KSERVE_GROUP = "serving.kserve.io"
CONTAINER_NAME = "kserve-container"
# Scanned for secrets as well as by their own framework: the image and the server configs.
SECRET_SCAN_FILES = ("Dockerfile", "config/config.properties", "config/kserve/config.properties")
RENDERED_SUFFIX = ".predictor-pod.yaml"

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


class ScanError(RuntimeError):
    """checkov is missing or did not produce a report."""


@dataclass(frozen=True)
class Result:
    """One check on one resource, as checkov reported it."""

    check_id: str
    name: str
    resource: str
    file: str  # repo-relative, or "rendered:<source file>" for a rendered predictor pod
    lines: tuple[int, int]
    reason: str = ""  # an accepted finding's suppression comment

    def __str__(self) -> str:
        where = f"{self.file}:{self.lines[0]}-{self.lines[1]}"
        text = f"{self.check_id} {self.name}\n    {self.resource} ({where})"
        return text + (f"\n    accepted: {self.reason}" if self.reason else "")


@dataclass
class Scan:
    failed: list[Result] = field(default_factory=list)
    accepted: list[Result] = field(default_factory=list)
    passed: list[Result] = field(default_factory=list)
    resource_count: int = 0
    checkov_version: str = ""


# -- rendering the predictor pods ----------------------------------------------------------


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


def _find_runtime(manifests: list[Manifest], name: str, namespace: str | None) -> Manifest | None:
    for kind in ("ServingRuntime", "ClusterServingRuntime"):
        for m in manifests:
            if m.group == KSERVE_GROUP and m.kind == kind and m.name == name and \
                    (kind == "ClusterServingRuntime" or m.namespace == namespace):
                return m
    return None


def render_predictor_pod(isvc: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The predictor pod KServe builds from an InferenceService (``spec.predictor.model``) and its
    serving runtime, as far as our manifests decide it."""
    meta = isvc.get("metadata") or {}
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    runtime_spec = runtime.get("spec") or {}
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


def render_predictor_pods(manifests: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    """Every InferenceService with a known runtime, and its predictor pod."""
    pods = []
    for isvc in manifests:
        if isvc.group != KSERVE_GROUP or isvc.kind != "InferenceService":
            continue
        runtime_name = isvc.get("spec", "predictor", "model", "runtime")
        runtime = _find_runtime(manifests, str(runtime_name), isvc.namespace) if runtime_name else None
        if runtime is not None:
            pods.append((isvc, render_predictor_pod(isvc.doc, runtime.doc)))
    return pods


def write_rendered_pods(manifests: list[Manifest], folder: Path, repo_root: Path = REPO_ROOT) -> dict[Path, str]:
    """Write each rendered pod to ``folder``; return {written file: the InferenceService's file}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for isvc, pod in render_predictor_pods(manifests):
        source = _relative(isvc.path, repo_root)
        path = folder / (source.replace("/", "__").removesuffix(".yaml") + f"-{isvc.index}{RENDERED_SUFFIX}")
        header = f"# Rendered by scripts/security_scan.py from {source} and its serving runtime.\n"
        path.write_text(header + yaml.safe_dump(pod, sort_keys=False), encoding="utf-8")
        written[path.resolve()] = source
    return written


# -- running checkov -----------------------------------------------------------------------


def checkov_executable(repo_root: Path = REPO_ROOT) -> Path:
    """$WAN_CHECKOV, else .venv-tools/bin/checkov (installed by `make test` / `make security`)."""
    path = Path(os.environ.get("WAN_CHECKOV") or repo_root / ".venv-tools" / "bin" / "checkov")
    if not path.is_file():
        raise ScanError(f"checkov is not installed at {path}: `make tools` installs it into .venv-tools "
                        "(make test and make security do it first)")
    return path


def _relative(path: Path | str, repo_root: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(repo_root.resolve()))
    except ValueError:
        return str(path)


def run_checkov(files: Iterable[Path | str], frameworks: Iterable[str], repo_root: Path = REPO_ROOT) -> list[dict]:
    """checkov's JSON reports (one per framework) for these files; passed checks included."""
    command = [str(checkov_executable(repo_root)), "--framework", *frameworks, "--output", "json",
               "--skip-download", "--compact", "-f", *[str(f) for f in files]]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="TRUE", LOG_LEVEL="ERROR")
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode not in (0, 1):  # 1: some check failed
        raise ScanError(f"checkov exited {done.returncode}: {done.stderr[-2000:]}")
    try:
        reports = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise ScanError(f"checkov printed no JSON report ({e}): {done.stdout[:500]} {done.stderr[-2000:]}") from None
    return reports if isinstance(reports, list) else [reports]


def _results(reports: list[dict], rendered: dict[Path, str], repo_root: Path) -> Scan:
    scan = Scan()
    for report in reports:
        summary = report.get("summary") or report
        scan.resource_count += int(summary.get("resource_count", 0))
        scan.checkov_version = str(summary.get("checkov_version", scan.checkov_version))
        for kind, bucket in (("failed_checks", scan.failed), ("skipped_checks", scan.accepted),
                             ("passed_checks", scan.passed)):
            for r in (report.get("results") or {}).get(kind, []):
                absolute = Path(r.get("file_abs_path") or r.get("file_path", "")).resolve()
                file = f"rendered:{rendered[absolute]}" if absolute in rendered else _relative(absolute, repo_root)
                suppress = r.get("check_result", {}).get("suppress_comment", "") if kind == "skipped_checks" else ""
                lines = tuple(r.get("file_line_range") or (0, 0))
                bucket.append(Result(r["check_id"], r.get("check_name", ""), r.get("resource", ""), file,
                                     (int(lines[0]), int(lines[-1])), str(suppress).strip()))
    return scan


def scan(paths: Iterable[Path] = DEFAULT_PATHS, repo_root: Path = REPO_ROOT, workdir: Path | None = None) -> Scan:
    """checkov on the Dockerfile and configs (dockerfile, secrets) and on the manifests under
    ``paths`` plus their rendered predictor pods (kubernetes)."""
    manifests, problems = load_manifests(paths)
    if problems:
        raise ScanError("manifests that do not parse: " + "; ".join(map(str, problems)))
    files = sorted({m.path for m in manifests})
    with tempfile.TemporaryDirectory(prefix="wan-security-") as tmp:
        rendered = write_rendered_pods(manifests, Path(workdir or tmp) / "rendered", repo_root)
        reports = run_checkov([_relative(f, repo_root) for f in files] + [str(p) for p in rendered],
                              ["kubernetes"], repo_root)
        reports += run_checkov(SECRET_SCAN_FILES, ["dockerfile", "secrets"], repo_root)
        return _results(reports, rendered, repo_root)


def unexplained(accepted: Iterable[Result]) -> list[Result]:
    """Accepted findings whose reason is missing or says nothing."""
    return [r for r in accepted if len(r.reason) < 20 or r.reason == "No comment provided"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=list(DEFAULT_PATHS),
                        help="manifest files or folders (default: kserve/ and karmada/)")
    args = parser.parse_args(argv)
    try:
        result = scan(args.paths)
    except ScanError as e:
        print(f"security scan: {e}", file=sys.stderr)
        return 2
    for title, found in (("accepted", result.accepted), ("FAILED", result.failed)):
        for r in found:
            print(f"[{title}] {r}")
    bad = unexplained(result.accepted)
    for r in bad:
        print(f"[accepted without a reason] {r}")
    print(f"checkov {result.checkov_version}: {len(result.passed)} passed, {len(result.failed)} failed, {len(result.accepted)} accepted "
          f"({result.resource_count} resources)", file=sys.stderr)
    return 1 if result.failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())

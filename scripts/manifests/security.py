"""checkov over what we ship, offline: the Dockerfile, the TorchServe configs, kserve/ and karmada/,
and the predictor pods KServe builds from them (``kube.render_predictor_pod``, the rendering the
KServe and Karmada checks read too). ``make security`` and tests/test_security.py run
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

    python -m scripts.manifests.security        # exit 1 on a finding that is not accepted

checkov runs from its own virtual environment (``.venv-tools``, installed by ``make``), never the
project's: its many pinned dependencies would move ours. It is told not to reach its platform or
PyPI (``--skip-download``, BC_SKIP_MAPPING, CKV_SKIP_PACKAGE_UPDATE_CHECK).
"""

from __future__ import annotations

import argparse
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

from scripts.manifests.core import DEFAULT_PATHS, REPO_ROOT, Manifest, load_manifests
from scripts.manifests.kube import INFERENCE_SERVICE, render_predictor_pod, runtime_of

# Scanned for secrets as well as by their own framework: the image and the server configs.
SECRET_SCAN_FILES = ("Dockerfile", "config/config.properties", "config/kserve/config.properties")
RENDERED_SUFFIX = ".predictor-pod.yaml"

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


def render_predictor_pods(manifests: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    """Every InferenceService with a known runtime, and its predictor pod."""
    pods = []
    for isvc in manifests:
        if (isvc.api_version, isvc.kind) != INFERENCE_SERVICE:
            continue
        runtime = runtime_of(manifests, isvc)
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
        header = f"# Rendered by scripts/manifests/security.py from {source} and its serving runtime.\n"
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
                        help="manifest files or folders (default: kserve/, karmada/ and jobs/deploy/)")
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
    print(f"checkov {result.checkov_version}: {len(result.passed)} passed, {len(result.failed)} failed, "
          f"{len(result.accepted)} accepted "
          f"({result.resource_count} resources)", file=sys.stderr)
    return 1 if result.failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())

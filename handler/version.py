"""Which code is serving: the package version and, when known, the git commit.

Responses, the S3 sidecar record and the metrics carry it, so an operator can tell what made a
video and what a pod runs. The image sets ``WAN_GIT_COMMIT`` at build time (it has no .git); a
checkout (``make serve``, tests) asks git, with ``-dirty`` when the tree has uncommitted changes.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "wan-serving"  # setup.cfg's name
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CodeVersion:
    package: str
    commit: str | None  # None: neither WAN_GIT_COMMIT nor a git checkout

    def to_json(self) -> dict[str, str | None]:
        return {"package": self.package, "commit": self.commit}


@functools.cache
def code_version() -> CodeVersion:
    try:
        package = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a plain copy of the sources
        package = "unknown"
    return CodeVersion(package=package, commit=os.environ.get("WAN_GIT_COMMIT") or _git_commit())


def _git_commit() -> str | None:
    if not (_SOURCE_ROOT / ".git").exists():  # installed in site-packages: not ours to ask
        return None
    try:
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", *args], cwd=_SOURCE_ROOT, capture_output=True, text=True, timeout=10,
                                  check=False)

        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None

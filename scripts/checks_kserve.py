"""Cross-checks for the KServe manifests (see scripts.validate_manifests)."""

from __future__ import annotations

CHECKS: list = []

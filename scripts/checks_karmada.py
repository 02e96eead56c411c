"""Cross-checks for the Karmada manifests (see scripts.validate_manifests)."""

from __future__ import annotations

CHECKS: list = []

"""Karmada's overrides (``pkg/util/overridemanager``: image, labels/annotations, plaintext JSON
patch), applied the way Karmada applies them, to give the object each cluster gets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from scripts.manifests.core import Manifest, Problem
from scripts.manifests.karmada.clusters import Cluster, cluster_matches
from scripts.manifests.karmada.world import World, describe, selection_precision


class OverrideError(ValueError):
    """Karmada would fail to apply the override (and the Work for that cluster is not created)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


def json_pointer(path: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise OverrideError(f"path {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise OverrideError(f"{path}: no such path in the object (stops at {part!r})")
    return node


def json_patch(doc: dict[str, Any], op: str, path: str, value: Any = None) -> None:
    """RFC 6902 add / remove / replace as evanphx/json-patch applies them."""
    parts = json_pointer(path)
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if op == "add":
        if isinstance(parent, dict):
            parent[last] = copy.deepcopy(value)
        elif isinstance(parent, list) and (last == "-" or (last.isdigit() and int(last) <= len(parent))):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(value))
        else:
            raise OverrideError(f"{path}: cannot add here")
    elif op in ("remove", "replace"):
        if isinstance(parent, dict) and last in parent:
            if op == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(value)
        elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            if op == "remove":
                parent.pop(int(last))
            else:
                parent[int(last)] = copy.deepcopy(value)
        else:
            raise OverrideError(f"{path}: {op} of a path that does not exist")
    else:
        raise OverrideError(f"unknown operator {op!r}")


@dataclass
class Image:
    """imageparser.Components: [hostname/]repository[:tag|@digest]."""

    hostname: str
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, image: str) -> Image:
        if not isinstance(image, str) or not image:
            raise OverrideError(f"not an image reference: {image!r}")
        first, slash, rest = image.partition("/")
        if slash and (any(c in first for c in ".:") or first == "localhost"):
            hostname, remainder = first, rest
        else:
            hostname, remainder = "", image
        remainder, _, digest = remainder.partition("@")
        name, colon, tag = remainder.rpartition(":")
        if not colon or "/" in tag:
            name, tag = remainder, ""
        return cls(hostname, name, tag, digest)

    def __str__(self) -> str:
        out = f"{self.hostname}/{self.repository}" if self.hostname else self.repository
        if self.digest:
            return f"{out}@{self.digest}"
        return f"{out}:{self.tag}" if self.tag else out

    @property
    def registry(self) -> str:
        return self.hostname or "docker.io"


NATIVE_POD_PATHS = {"Pod": ("spec",), "Deployment": ("spec", "template", "spec"),
                    "ReplicaSet": ("spec", "template", "spec"), "DaemonSet": ("spec", "template", "spec"),
                    "StatefulSet": ("spec", "template", "spec"), "Job": ("spec", "template", "spec")}


def _override_image(current: str, overrider: dict[str, Any]) -> str:
    image = Image.parse(current)
    component, operator, value = overrider.get("component"), overrider.get("operator"), overrider.get("value", "")
    attr = {"Registry": "hostname", "Repository": "repository", "Tag": "tag"}.get(component)
    if attr is None:
        raise OverrideError(f"unsupported image component {component!r}")
    if attr == "tag" and image.digest:
        image.digest = ""
    if operator == "add":
        setattr(image, attr, getattr(image, attr) + value)
    elif operator == "replace":
        setattr(image, attr, value)
    elif operator == "remove":
        setattr(image, attr, "")
    else:
        raise OverrideError(f"unsupported operator {operator!r}")
    return str(image)


def apply_overriders(doc: dict[str, Any], overriders: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Applies one rule's overriders in Karmada's order (image, command, args, labels,
    annotations, field, plaintext). Returns (path, note) for overriders that do nothing;
    raises OverrideError where Karmada would fail."""
    notes: list[tuple[str, str]] = []
    kind = doc.get("kind", "")
    for i, image in enumerate(overriders.get("imageOverrider") or []):
        path = f"{where}/imageOverrider/{i}"
        predicate = (image.get("predicate") or {}).get("path")
        if predicate:
            try:
                current = _resolve(doc, json_pointer(predicate), predicate)
                if not isinstance(current, str):
                    raise OverrideError(f"{predicate} is not a string (imageOverrider needs an image there)")
                json_patch(doc, "replace", predicate, _override_image(current, image))
            except OverrideError as e:
                raise OverrideError(str(e), f"{path}/predicate/path") from e
        elif kind in NATIVE_POD_PATHS:
            pod = doc
            for key in NATIVE_POD_PATHS[kind]:
                pod = (pod or {}).get(key) or {}
            for container in pod.get("containers") or []:
                container["image"] = _override_image(container.get("image", ""), image)
        else:
            notes.append((path, f"imageOverrider without predicate.path does nothing for a {kind}"))
    for name in ("commandOverrider", "argsOverrider"):
        if overriders.get(name) and kind not in NATIVE_POD_PATHS:
            notes.append((f"{where}/{name}", f"{name} does nothing for a {kind}"))
    for name, key in (("labelsOverrider", "labels"), ("annotationsOverrider", "annotations")):
        for i, overrider in enumerate(overriders.get(name) or []):
            metadata = doc.setdefault("metadata", {})
            operator = overrider.get("operator")
            for item_key, value in (overrider.get("value") or {}).items():
                existing = metadata.get(key) or {}
                if operator in ("remove", "replace") and item_key not in existing:
                    note = f"{operator} of {key[:-1]} {item_key!r}, which the {kind} does not have: Karmada skips it"
                    notes.append((f"{where}/{name}/{i}", note))
                    continue
                if operator == "remove":
                    del existing[item_key]
                elif operator in ("add", "replace"):
                    metadata.setdefault(key, {})[item_key] = value
                else:
                    raise OverrideError(f"unknown operator {operator!r}", f"{where}/{name}/{i}")
    if overriders.get("fieldOverrider"):
        notes.append((f"{where}/fieldOverrider", "fieldOverrider is not simulated by this validator"))
    for i, op in enumerate(overriders.get("plaintext") or []):
        try:
            json_patch(doc, op.get("operator"), op.get("path"), op.get("value"))
        except OverrideError as e:
            raise OverrideError(str(e), f"{where}/plaintext/{i}") from e
    return notes


def override_rules(world: World, obj: Manifest, cluster: Cluster) -> list[tuple[Manifest, str, dict[str, Any]]]:
    """(policy, path, overriders) that apply to ``obj`` in ``cluster``, in the order Karmada applies
    them: ClusterOverridePolicies, then OverridePolicies, each from the least to the most precise
    selection (ties by name), rules in order."""
    def key(policy: Manifest) -> tuple[int, int, str]:
        return (0 if policy.kind == "ClusterOverridePolicy" else 1, selection_precision(policy, obj), policy.name)

    out = []
    for policy in sorted((p for p in world.overrides if selection_precision(p, obj)), key=key):
        rules = policy.get("spec", "overrideRules")
        if rules is None and policy.get("spec", "overriders") is not None:  # deprecated form
            rules = [{"targetCluster": policy.get("spec", "targetCluster"), "overriders": policy.get("spec",
                                                                                                     "overriders")}]
            base = "/spec"
        else:
            base = "/spec/overrideRules"
        for i, rule in enumerate(rules or []):
            target = rule.get("targetCluster")
            if target is None or cluster_matches(target, cluster):
                path = f"{base}/{i}/overriders" if base.endswith("Rules") else "/spec/overriders"
                out.append((policy, path, rule.get("overriders") or {}))
    return out


def effective(world: World, obj: Manifest, cluster: Cluster) -> tuple[dict[str, Any], list[Problem]]:
    """The object as Karmada writes it into ``cluster``: the template with every matching
    override applied. Problems name the override that fails or does nothing."""
    doc = copy.deepcopy(obj.doc)
    problems = []
    for policy, path, overriders in override_rules(world, obj, cluster):
        try:
            for note_path, note in apply_overriders(doc, overriders, path):
                problems.append(Problem(policy, note_path, f"{describe(obj)} in {cluster.name}: {note}"))
        except OverrideError as e:
            problems.append(Problem(policy, e.where or path, f"{describe(obj)} in {cluster.name}: Karmada cannot "
                                                             f"apply this override: {e}"))
    return doc, problems

"""The KServe model store: the folder behind an InferenceService's ``storageUri``, and its upload.

KServe's storage initializer copies everything under ``storageUri`` to ``/mnt/models``, and the
``wan-torchserve`` runtime starts ``torchserve --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties``. So one store holds::

    config/config.properties   config/kserve/config.properties + a model_snapshot generated
                               from the variant's config/models/<variant>.yaml
    config/metrics.yaml        the metrics TorchServe exports (config/metrics.yaml)
    model-store/wan/           the no-archive model folder: the entry file wan_handler.py,
                               model-config.yaml, MAR-INF/MANIFEST.json (no code: the image's
                               handler package serves; no weights)
    weights/<variant>/         the diffusers checkpoint that handler.model_path
                               (/mnt/models/weights/<variant>) points at

The model_snapshot is generated, never written by hand: TorchServe takes each model's workers
and timeouts from it and ignores model-config.yaml's responseTimeout / startupTimeout there
(falling back to 120 s when the snapshot lacks them), so both come from the same yaml here.
The manifest validator (scripts/manifests/kserve.py) renders the same snapshot to check the
InferenceService timeouts against it.

This module does not import torch or TorchServe; boto3 is imported only to upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from model_store.archive import build_archive

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "config" / "kserve" / "config.properties"
METRICS_CONFIG = REPO_ROOT / "config" / "metrics.yaml"
MODEL_CONFIG_DIR = REPO_ROOT / "config" / "models"
# One store per model config: the three variants on one GPU, and one worker spread over several
# GPUs (torchrun ranks; config/models/*-2gpu.yaml, *-4gpu.yaml).
VARIANTS = ("ti2v-5b", "t2v-a14b", "i2v-a14b", "ti2v-5b-2gpu", "t2v-a14b-4gpu", "i2v-a14b-4gpu")
MOUNT_PATH = PurePosixPath("/mnt/models")  # where KServe puts the store in the pod
MODEL_NAME = "wan"  # the TorchServe model name: /v1/models/wan:predict
MODEL_VERSION = "1.0"  # the archive's version; the snapshot is keyed by it
CONFIG_FILE = "config/config.properties"
METRICS_FILE = "config/metrics.yaml"
MODEL_STORE_DIR = "model-store"
# What TorchServe needs per model in model_snapshot (the first four are required by its
# snapshot loader; the timeouts fall back to 120 s when missing, which we never allow).
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")
# Lines the template must not carry: the builder owns them.
_GENERATED_KEYS = ("model_snapshot", "load_models", "models")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SKIPPED_NAMES = {"__pycache__", ".DS_Store"}


class StoreError(ValueError):
    """A model store that cannot be built, or a folder that is not one."""


# -- config.properties ------------------------------------------------------------------


def read_properties(text: str) -> dict[str, str]:
    """Parse Java properties the way TorchServe reads config.properties (the subset we write:
    ``key=value`` or ``key: value`` lines, ``#`` / ``!`` comments, backslash continuations)."""
    properties: dict[str, str] = {}
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip() if not logical else raw.lstrip()
        if not logical and (not line or line[0] in "#!"):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            logical.append(line[:-1])
            continue
        logical.append(line)
        entry, logical = "".join(logical), []
        match = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)$", entry)
        if match:
            properties[match.group(1)] = match.group(2).strip()
        else:
            properties[entry] = ""
    return properties


def variant_config_file(variant: str) -> Path:
    if variant not in VARIANTS:
        raise StoreError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return MODEL_CONFIG_DIR / f"{variant}.yaml"


def load_model_config(model_config_file: str | Path) -> dict[str, Any]:
    path = Path(model_config_file)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise StoreError(f"{path}: cannot read the model config: {e}") from None
    if not isinstance(config, dict):
        raise StoreError(f"{path}: a model config must be a mapping")
    return config


def model_snapshot(model_config: dict[str, Any], model_name: str = MODEL_NAME, version: str = MODEL_VERSION,
                   source: str = "model-config.yaml") -> dict[str, Any]:
    """TorchServe's model_snapshot for one no-archive model, from its model-config.yaml."""
    missing = [key for key in SNAPSHOT_KEYS if key not in model_config]
    if missing:
        raise StoreError(f"{source}: {', '.join(missing)} missing; the KServe model_snapshot needs "
                         f"{', '.join(SNAPSHOT_KEYS)} (TorchServe would fall back to 120 s timeouts)")
    entry: dict[str, Any] = {"defaultVersion": True, "marName": model_name}
    for key in SNAPSHOT_KEYS:
        value = model_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StoreError(f"{source}: {key} must be a non-negative integer, got {value!r}")
        entry[key] = value
    if entry["minWorkers"] > entry["maxWorkers"]:
        raise StoreError(f"{source}: minWorkers {entry['minWorkers']} > maxWorkers {entry['maxWorkers']}")
    return {"name": "startup.cfg", "modelCount": 1, "models": {model_name: {version: entry}}}


def render_config_properties(model_config: dict[str, Any], template_text: str | None = None,
                             model_name: str = MODEL_NAME, source: str = "model-config.yaml") -> str:
    """The store's config/config.properties: the template plus the generated model_snapshot."""
    text = TEMPLATE.read_text(encoding="utf-8") if template_text is None else template_text
    owned = [key for key in _GENERATED_KEYS if key in read_properties(text)]
    if owned:
        raise StoreError(f"the KServe config template sets {', '.join(owned)}; the store builder generates "
                         "the model list from the model config, remove it from the template")
    metrics_config = read_properties(text).get("metrics_config")
    if metrics_config != str(MOUNT_PATH / METRICS_FILE):
        raise StoreError(f"the KServe config template must set metrics_config={MOUNT_PATH / METRICS_FILE} (the "
                         f"store's copy of config/metrics.yaml), got {metrics_config!r}")
    snapshot = json.dumps(model_snapshot(model_config, model_name, source=source), separators=(",", ":"))
    if "\\" in snapshot:  # Java properties would read a backslash as an escape
        raise StoreError(f"{source}: the model snapshot may not contain backslashes")
    return (text.rstrip("\n") + "\n\n"
            + f"# Generated by model_store/kserve_store.py from {source}: workers and timeouts of\n"
            + "# each model (these, not model-config.yaml's, are what TorchServe applies).\n"
            + f"model_snapshot={snapshot}\n")


def snapshot_of(properties: dict[str, str]) -> dict[str, Any]:
    """The parsed model_snapshot of a config.properties (StoreError when absent or broken)."""
    if "model_snapshot" not in properties:
        raise StoreError("config.properties has no model_snapshot: TorchServe would load no model")
    try:
        snapshot = json.loads(properties["model_snapshot"])
        models = snapshot["models"]
        if not isinstance(models, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"config.properties: model_snapshot is not a TorchServe snapshot: {e}") from None
    return snapshot


# -- the store --------------------------------------------------------------------------


def weights_location(model_path: str, model_name: str = MODEL_NAME) -> PurePosixPath | None:
    """Where in the store handler.model_path points (relative to the store root), or None when
    it points outside it (weights elsewhere: a PVC, another mount)."""
    path = PurePosixPath(model_path)
    if path.is_absolute():
        try:
            relative = path.relative_to(MOUNT_PATH)
        except ValueError:
            return None
    else:
        # Relative paths are resolved against the model's folder by the handler.
        relative = PurePosixPath(MODEL_STORE_DIR, model_name, path)
    parts: list[str] = []
    for part in relative.parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts or parts[0] in (MODEL_STORE_DIR, "config"):
        return None
    return PurePosixPath(*parts)


@dataclass(frozen=True)
class KServeStore:
    root: Path
    model_name: str
    config_file: Path  # config/config.properties
    model_dir: Path  # model-store/<model_name>
    weights_dir: Path | None  # where handler.model_path points inside the store, if it does
    snapshot: dict[str, Any] = field(default_factory=dict)

    @property
    def model_store(self) -> Path:
        return self.root / MODEL_STORE_DIR


def build_kserve_store(model_config_file: str | Path, out_dir: str | Path, weights: str | Path | None = None,
                       link_weights: bool = False, model_name: str = MODEL_NAME,
                       template: str | Path = TEMPLATE) -> KServeStore:
    """Build (or rebuild) a store under ``out_dir``; with ``weights``, put the checkpoint where
    handler.model_path points (a copy, or a symlink with ``link_weights`` for a local upload)."""
    model_config_file = Path(model_config_file)
    config = load_model_config(model_config_file)
    model_path = str((config.get("handler") or {}).get("model_path") or "")
    if not model_path:
        raise StoreError(f"{model_config_file}: handler.model_path is not set")
    location = weights_location(model_path, model_name)
    if weights is not None:
        weights = Path(weights)
        if not (weights / "model_index.json").is_file():
            raise StoreError(f"{weights} is not a diffusers checkpoint (no model_index.json)")
        if location is None:
            raise StoreError(f"{model_config_file}: handler.model_path {model_path} is outside the store "
                             f"(not under {MOUNT_PATH}); cannot place the weights in it")
    properties = render_config_properties(config, Path(template).read_text(encoding="utf-8"), model_name,
                                          source=_display(model_config_file))

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The model folder and the config are rebuilt every time (seconds); weights are kept.
    shutil.rmtree(out / MODEL_STORE_DIR, ignore_errors=True)
    build_archive(model_name, model_config_file, out / MODEL_STORE_DIR, version=MODEL_VERSION)
    config_path = out / CONFIG_FILE
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(properties, encoding="utf-8")
    shutil.copyfile(METRICS_CONFIG, out / METRICS_FILE)

    weights_dir = out / location if location is not None else None
    if weights is not None and weights_dir is not None:
        _place_weights(weights.resolve(), weights_dir, link_weights)
    store = inspect_store(out)
    if store.model_name != model_name:  # cannot happen unless the template lied
        raise StoreError(f"{out}: built a store for {store.model_name}, expected {model_name}")
    return store


def _display(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def _place_weights(source: Path, target: Path, link: bool) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        target.symlink_to(source, target_is_directory=True)
        return
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*_SKIPPED_NAMES))
    # diffusers may save safetensors as 0600; the server runs as another user than the builder.
    for path in [target, *target.rglob("*")]:
        mode = path.stat().st_mode
        extra = stat.S_IRGRP | stat.S_IROTH | ((stat.S_IXGRP | stat.S_IXOTH) if path.is_dir() else 0)
        path.chmod(mode | extra)


def inspect_store(root: str | Path) -> KServeStore:
    """Check that a folder is a loadable store: config with a snapshot whose models exist."""
    root = Path(root)
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise StoreError(f"{root} is not a KServe model store: {CONFIG_FILE} is missing")
    snapshot = snapshot_of(read_properties(config_file.read_text(encoding="utf-8")))
    if not (root / METRICS_FILE).is_file():  # config.properties names it: TorchServe would not start
        raise StoreError(f"{root}: {METRICS_FILE} is missing (a store built before the metrics config; rebuild it)")
    models = snapshot["models"]
    if len(models) != 1:
        raise StoreError(f"{config_file}: expected exactly one model in model_snapshot, got {sorted(models)}")
    [(model_name, versions)] = models.items()
    model_dir = root / MODEL_STORE_DIR / model_name
    manifest = model_dir / "MAR-INF" / "MANIFEST.json"
    if not manifest.is_file():
        raise StoreError(f"{root}: {MODEL_STORE_DIR}/{model_name} is not a no-archive model folder "
                         "(no MAR-INF/MANIFEST.json)")
    version = json.loads(manifest.read_text())["model"].get("modelVersion")
    if version not in versions:
        raise StoreError(f"{config_file}: model_snapshot lists {model_name} versions {sorted(versions)}, "
                         f"the archive is version {version}")
    model_config = load_model_config(model_dir / "model-config.yaml")
    location = weights_location(str((model_config.get("handler") or {}).get("model_path") or ""), model_name)
    return KServeStore(root.resolve(), model_name, config_file, model_dir,
                       root.resolve() / location if location else None, snapshot)


# -- upload -----------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at the ends)."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri or "")
    if not match:
        raise StoreError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, prefix = match.group(1), match.group(2).strip("/")
    if not _S3_BUCKET.match(bucket) or ".." in bucket:
        raise StoreError(f"{uri!r}: {bucket!r} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
    if "//" in prefix or any(c.isspace() for c in prefix):
        raise StoreError(f"{uri!r}: the prefix has an empty segment or whitespace")
    return bucket, prefix


def _upload_order(relative: PurePosixPath) -> tuple[int, str]:
    # Weights first, the model folder next, config.properties last (after the metrics.yaml it
    # names): a store whose config.properties is present is complete as far as the runtime can tell.
    if relative.as_posix() == CONFIG_FILE:
        return (3, "")
    top = relative.parts[0]
    return ({"config": 2, MODEL_STORE_DIR: 1}.get(top, 0), relative.as_posix())


def store_files(root: str | Path) -> Iterator[tuple[PurePosixPath, Path]]:
    """(path relative to the store, file) for every file, following symlinked weights."""
    root = Path(root)
    found = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_NAMES)
        for name in filenames:
            if name in _SKIPPED_NAMES or name.endswith(".pyc"):
                continue
            path = Path(dirpath) / name
            found.append((PurePosixPath(path.relative_to(root).as_posix()), path))
    yield from sorted(found, key=lambda item: _upload_order(item[0]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)  # object keys
    skipped: list[str] = field(default_factory=list)  # unchanged (same size and sha256)
    deleted: list[str] = field(default_factory=list)  # under the prefix but not in the store
    bytes_uploaded: int = 0


def upload_model_store(store_dir: str | Path, s3_uri: str, client=None, skip_unchanged: bool = True,
                       delete: bool = False, log: Callable[[str], None] | None = None) -> UploadReport:
    """Upload a store to ``s3://bucket/prefix`` (the InferenceService's storageUri).

    Each object carries its sha256 as metadata; with ``skip_unchanged`` an object of the same
    size and digest is not sent again (re-uploading 60 GB of weights to change a timeout is not
    a deployment step anyone wants). With ``delete``, objects under the prefix that the store
    does not have are removed, so that the storage initializer copies exactly this store.
    Endpoint and credentials come from boto3's standard variables (AWS_ENDPOINT_URL, ...).
    """
    store = inspect_store(store_dir)
    bucket, prefix = parse_s3_uri(s3_uri)
    if client is None:
        import boto3

        client = boto3.client("s3")
    log = log or (lambda message: None)
    report = UploadReport()
    keys = set()
    for relative, path in store_files(store.root):
        key = f"{prefix}/{relative}" if prefix else str(relative)
        keys.add(key)
        size = path.stat().st_size
        digest = _sha256(path)
        if skip_unchanged and _remote_matches(client, bucket, key, size, digest):
            report.skipped.append(key)
            continue
        log(f"upload {relative} -> s3://{bucket}/{key} ({size} bytes)")
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
        report.uploaded.append(key)
        report.bytes_uploaded += size
    if delete:
        stale = [key for key in _list_keys(client, bucket, f"{prefix}/" if prefix else "") if key not in keys]
        for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
            batch = stale[start:start + 1000]
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
            for key in batch:
                log(f"delete s3://{bucket}/{key}")
        report.deleted = stale
    return report


def _remote_matches(client, bucket: str, key: str, size: int, digest: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == digest


def _list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


# -- command lines (scripts/build_kserve_store.py, scripts/upload_model_store.py) --------


def build_main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the KServe model store of a Wan2.2 variant (the folder "
                                                 "behind an InferenceService's storageUri).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=VARIANTS, help="use config/models/<variant>.yaml")
    which.add_argument("--model-config", type=Path, help="any model-config.yaml (e.g. config/models/tiny-ti2v.yaml)")
    parser.add_argument("--out", type=Path, help="output folder (default: build/kserve/<variant or config name>)")
    parser.add_argument("--weights", type=Path,
                        help="a diffusers checkpoint to put where handler.model_path points (weights/<variant>/); "
                             "without it the store has no weights (upload them once, they are kept)")
    parser.add_argument("--link-weights", action="store_true",
                        help="symlink the weights instead of copying them (the uploader follows the link)")
    args = parser.parse_args(argv)
    config = variant_config_file(args.variant) if args.variant else args.model_config
    out = args.out or REPO_ROOT / "build" / "kserve" / (args.variant or Path(config).stem)
    try:
        store = build_kserve_store(config, out, args.weights, args.link_weights)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None
    entry = store.snapshot["models"][store.model_name][MODEL_VERSION]
    weights = store.weights_dir.relative_to(store.root) if store.weights_dir else None
    has_weights = store.weights_dir is not None and (store.weights_dir / "model_index.json").is_file()
    print(f"model store: {store.root}\n"
          f"  {CONFIG_FILE}   model_snapshot: {store.model_name} workers {entry['minWorkers']}-"
          f"{entry['maxWorkers']}, responseTimeout {entry['responseTimeout']} s, "
          f"startupTimeout {entry['startupTimeout']} s\n"
          f"  {MODEL_STORE_DIR}/{store.model_name}/  handler + model-config.yaml (no-archive)\n"
          f"  {weights or '(weights outside the store)'}  "
          f"{'present' if has_weights else 'not in this build: upload them once, or pass --weights'}\n"
          f"next: python -m scripts.upload_model_store {store.root} s3://wan-models/{args.variant or '<prefix>'}")


def upload_main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Upload a KServe model store to S3 (boto3; endpoint and "
                                                 "credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")
    parser.add_argument("store", type=Path, help="a folder built by scripts.build_kserve_store")
    parser.add_argument("uri", help="s3://bucket/prefix: the InferenceService's storageUri")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--delete", action="store_true",
                        help="remove objects under the prefix that the store does not have (e.g. old weights)")
    parser.add_argument("--force", action="store_true", help="upload every file, even when unchanged")
    args = parser.parse_args(argv)
    import boto3

    client = boto3.client("s3", endpoint_url=args.endpoint_url) if args.endpoint_url else boto3.client("s3")
    try:
        report = upload_model_store(args.store, args.uri, client, skip_unchanged=not args.force,
                                    delete=args.delete, log=print)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(report.uploaded)} uploaded ({report.bytes_uploaded / 2**20:.1f} MiB), "
          f"{len(report.skipped)} unchanged, {len(report.deleted)} deleted under {args.uri}")

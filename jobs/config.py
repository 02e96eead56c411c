"""The job service's configuration: one object, read once at start.

``config/jobs.yaml`` names the models and their inference endpoints; the environment carries
what differs per deployment (database URL, limits, webhook allow-list). Unknown keys are refused
so that a typo in a deployment never falls back silently to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from handler.config import RequestLimits, RequestRules, load_request_rules
from handler.errors import ConfigError
from handler.variants import VARIANTS, GenerationDefaults, VariantSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "jobs.yaml"
DEFAULT_RUN_DIR = REPO_ROOT / ".run"
ENDPOINT_KINDS = ("torchserve", "triton")


class JobsConfigError(ValueError):
    """The job service's configuration is invalid; raised at start, never seen by a client."""


@dataclass(frozen=True)
class Endpoint:
    """One inference endpoint of a model: a TorchServe (or KServe InferenceService running it)
    or a Triton server."""

    name: str
    url: str
    kind: str = "torchserve"
    # The model's name on the endpoint (TorchServe's /predictions/<model>, Triton's model: from a
    # config file, a Triton endpoint defaults to its decoupled "wan_stream").
    model: str = "wan"
    # Requests in flight at most: the endpoint's workers, so the data plane never queues ours.
    capacity: int = 1
    # Lower first: the worker fills this endpoint before it sends anything to a higher one.
    priority: int = 0
    # TorchServe's key file (its inference key is read at each call), or an env var holding a token.
    key_file: str | None = None
    token_env: str | None = None
    # "inline": the video comes back in the answer and the job service keeps it; "url": the data
    # plane uploads it to object storage and the job keeps its s3_uri.
    output: str = "inline"
    # Seconds for a whole generation, from the first byte sent to the last one read.
    timeout_s: float = 1200.0
    # After a connection failure or a 5xx, skip this endpoint for that long.
    cooldown_s: float = 30.0

    def auth_headers(self) -> dict[str, str]:
        token = None
        if self.key_file:
            try:
                token = json.loads(Path(self.key_file).read_text())["inference"]["key"]
            except (OSError, ValueError, KeyError):
                token = None  # TorchServe not started yet: its 401 says so, and the job is retried
        elif self.token_env:
            token = os.environ.get(self.token_env)
        return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class ModelEntry:
    """A model the job service fronts: its request rules and where it runs."""

    name: str
    description: str
    spec: VariantSpec
    defaults: GenerationDefaults
    limits: RequestLimits
    endpoints: tuple[Endpoint, ...]
    # The handler's rules in full: its LoRA allow-list and profiles too (what parse_request checks).
    rules: RequestRules = field(default_factory=RequestRules)

    @property
    def capacity(self) -> int:
        return sum(endpoint.capacity for endpoint in self.endpoints)

    def describe(self) -> dict[str, Any]:
        """The model as GET /v1/models shows it: what it accepts and what it defaults to."""
        defaults = {f.name: getattr(self.defaults, f.name) for f in fields(self.defaults) if f.name != "flow_shift"}
        return {
            "id": self.name,
            "object": "model",
            "owned_by": "wan-serving",
            "description": self.description,
            "variant": self.spec.name,
            "image_input": self.spec.image_input.value,
            "two_experts": self.spec.two_experts,
            "size_multiple": self.spec.size_multiple,
            "native_sizes": [f"{w}x{h}" for w, h in self.spec.native_sizes],
            "defaults": defaults,
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(self.limits)},
            # What a job may pick by name: the speed presets and the adapters of the allow-list.
            "profiles": {name: profile.to_json() for name, profile in self.rules.profiles.items()},
            "lora": [{"name": a.name, "max_scale": a.max_scale} for a in self.rules.lora.adapters.values()],
            "max_lora_per_request": self.rules.lora.max_per_request if self.rules.lora.adapters else 0,
        }


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise JobsConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise JobsConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the API and the worker need to know, from config/jobs.yaml and the environment."""

    models: tuple[ModelEntry, ...]
    # None: the embedded PostgreSQL (pgserver) under run_dir/postgres.
    database_url: str | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    # Queued + running jobs per user (JOBS_MAX_ACTIVE_PER_USER).
    max_active_per_user: int = 8
    # host or host:port entries (JOBS_WEBHOOK_ALLOWED_HOSTS); empty: no webhooks at all.
    webhook_allowed_hosts: tuple[str, ...] = ()
    # Data-plane attempts per job (connection loss and 503 are retried with the same seed).
    max_attempts: int = 5
    # Idempotency keys are honoured for this long.
    idempotency_ttl_s: int = 24 * 3600
    # A worker whose heartbeat is older than this is dead; its jobs are taken up again.
    stalled_after_s: float = 30.0
    # Where finished videos and posters are kept when the data plane returns them inline
    # (None: run_dir/results; in Kubernetes, a volume: JOBS_RESULTS_DIR).
    results_dir: Path | None = None
    # The data plane's credential for asking whether a running job is still wanted (the
    # TorchServe handler's cancellation check, GET /internal/v1/videos/{id}/wanted):
    # JOBS_DATA_PLANE_TOKEN, else the file run_dir/data_plane_token (made by `jobs local start`).
    # None: that route is off.
    data_plane_token: str | None = None

    def model(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def default_model(self) -> ModelEntry:
        return self.models[0]

    @property
    def results_path(self) -> Path:
        return self.results_dir or self.run_dir / "results"

    @property
    def worker_concurrency(self) -> int:
        return sum(model.capacity for model in self.models)


def _endpoint(raw: Any, where: str, base: Path) -> Endpoint:
    if not isinstance(raw, dict):
        raise JobsConfigError(f"{where} must be a mapping")
    known = {f.name for f in fields(Endpoint)}
    unknown = set(raw) - known
    if unknown:
        raise JobsConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in {where}; known: {', '.join(sorted(known))}")
    for required in ("name", "url"):
        if not isinstance(raw.get(required), str) or not raw[required]:
            raise JobsConfigError(f"{where}.{required} is required")
    values = dict(raw)
    if values.get("kind", "torchserve") not in ENDPOINT_KINDS:
        raise JobsConfigError(f"{where}.kind must be one of {', '.join(ENDPOINT_KINDS)}")
    if values.get("kind") == "triton":
        # generate_stream streams progress and can be cancelled only on the decoupled model
        # (DESIGN.md, "Triton data plane"); the plain "wan" would answer once, at the end.
        values.setdefault("model", "wan_stream")
    if values.get("output", "inline") not in ("inline", "url"):
        raise JobsConfigError(f"{where}.output must be inline or url")
    for name in ("capacity", "priority"):
        if name in values and (not isinstance(values[name], int) or isinstance(values[name], bool)):
            raise JobsConfigError(f"{where}.{name} must be an integer")
    if values.get("capacity", 1) < 1:
        raise JobsConfigError(f"{where}.capacity must be at least 1")
    for name in ("timeout_s", "cooldown_s"):
        if name in values:
            if not isinstance(values[name], (int, float)) or isinstance(values[name], bool) or values[name] <= 0:
                raise JobsConfigError(f"{where}.{name} must be a positive number of seconds")
            values[name] = float(values[name])
    if values.get("key_file"):
        values["key_file"] = str((base / values["key_file"]).resolve())
    values["url"] = values["url"].rstrip("/")
    return Endpoint(**values)


def _model(raw: Any, where: str, base: Path) -> ModelEntry:
    if not isinstance(raw, dict):
        raise JobsConfigError(f"{where} must be a mapping")
    known = {"name", "description", "variant", "model_config", "endpoints"}
    unknown = set(raw) - known
    if unknown:
        raise JobsConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in {where}; known: {', '.join(sorted(known))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise JobsConfigError(f"{where}.name is required")
    spec = VARIANTS.get(raw.get("variant"))
    if spec is None:
        raise JobsConfigError(f"{where}.variant must be one of {', '.join(VARIANTS)}")
    model_yaml: dict[str, Any] = {}
    if raw.get("model_config"):
        path = base / raw["model_config"]
        try:
            model_yaml = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise JobsConfigError(f"{where}.model_config: cannot read {path}: {e}") from None
    # The handler's own request rules from the model's config: the same limits and defaults it
    # applies (read without torch, and the weights need not exist here).
    try:
        rules = load_request_rules(model_yaml)
    except ConfigError as e:
        raise JobsConfigError(f"{where}.model_config: {e}") from None
    endpoints = raw.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        raise JobsConfigError(f"{where}.endpoints must list at least one endpoint")
    parsed = tuple(_endpoint(e, f"{where}.endpoints[{i}]", base) for i, e in enumerate(endpoints))
    if len({e.name for e in parsed}) != len(parsed):
        raise JobsConfigError(f"{where}.endpoints: names must be unique")
    return ModelEntry(
        name=name,
        description=str(raw.get("description") or ""),
        spec=spec,
        defaults=rules.defaults_for(spec.defaults),
        limits=rules.limits,
        endpoints=tuple(sorted(parsed, key=lambda e: e.priority)),
        rules=rules,
    )


DATA_PLANE_TOKEN_FILE = "data_plane_token"


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def load_settings(config_path: str | Path | None = None, run_dir: str | Path | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Settings from config/jobs.yaml (or ``JOBS_CONFIG``) and the environment."""
    env = os.environ if environ is None else environ
    path = Path(config_path or env.get("JOBS_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise JobsConfigError(f"cannot read the job service's config {path}: {e}") from None
    if not isinstance(raw, dict) or set(raw) - {"models"}:
        raise JobsConfigError(f"{path}: expected a mapping with one key, models")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise JobsConfigError(f"{path}: models must list at least one model")
    entries = tuple(_model(m, f"models[{i}]", path.parent) for i, m in enumerate(models))
    if len({m.name for m in entries}) != len(entries):
        raise JobsConfigError(f"{path}: model names must be unique")
    hosts = tuple(h.strip().lower() for h in env.get("JOBS_WEBHOOK_ALLOWED_HOSTS", "").split(",") if h.strip())
    run = Path(run_dir or env.get("JOBS_RUN_DIR") or DEFAULT_RUN_DIR)
    results = env.get("JOBS_RESULTS_DIR")
    return Settings(
        models=entries,
        database_url=env.get("JOBS_DATABASE_URL") or None,
        run_dir=run,
        max_active_per_user=_env_int("JOBS_MAX_ACTIVE_PER_USER", 8),
        webhook_allowed_hosts=hosts,
        max_attempts=_env_int("JOBS_MAX_ATTEMPTS", 5),
        stalled_after_s=float(_env_int("JOBS_STALLED_AFTER_S", 30)),
        results_dir=Path(results) if results else None,
        data_plane_token=env.get("JOBS_DATA_PLANE_TOKEN") or _read_token(run / DATA_PLANE_TOKEN_FILE),
    )


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields changed (tests and the CLI)."""
    return replace(settings, **changes)

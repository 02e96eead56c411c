"""Run the local Triton server: the ``tritonserver`` of the ``nvidia-pytriton`` wheel, on the tiny model.

``python -m scripts.serve start|stop|status --server triton`` (``make serve-triton``) calls it. The
server runs from its own venv, ``.venv-triton`` (the Makefile makes it): the Python backend's stub
uses numpy's 1.x C API, so that venv holds numpy<2 and the wheel, and a ``.pth`` file puts the
project venv's packages (torch, diffusers, the handler) behind them (``link_project_venv``).
Facts this relies on: ../shared/notes/triton.md.

HTTP 8090, gRPC 8091, metrics 8092 by default (Triton's own 8000-8002 would collide with the job
service). Files go to ``.run/triton/``: the model repository, the log and the pid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from model_store.triton_repo import PLAIN_MODEL, STREAM_MODEL, build_repository

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_VENV = REPO_ROOT / ".venv-triton"
PTH_FILE = "wan_project_venv.pth"


@dataclass(frozen=True)
class TritonLayout:
    """Where one local Triton keeps its files, and where it listens."""

    run_dir: Path = REPO_ROOT / ".run" / "triton"
    model_config: Path = REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml"
    weights: Path = REPO_ROOT / "weights" / "tiny-ti2v-5b"
    http_port: int = 8090
    grpc_port: int = 8091
    metrics_port: int = 8092
    max_batch_size: int | None = None  # None: the model config's triton.max_batch_size
    venv: Path = TRITON_VENV

    @property
    def repository(self) -> Path:
        return self.run_dir / "models"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tritonserver.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "tritonserver.log"


def _site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def _triton_root(venv: Path) -> Path:
    return _site_packages(venv) / "pytriton" / "tritonserver"


def link_project_venv(venv: Path = TRITON_VENV) -> None:
    """Make ``venv`` the stub's environment: its numpy<2 first, then the project venv's packages
    (``site.addsitedir`` so the project's own .pth files, the editable install's among them, run);
    and the stub for this Python in ``backends/python/`` (at the same depth as in the wheel, so its
    RPATH to ``nvidia_pytriton.libs`` still resolves)."""
    project = Path(sysconfig.get_paths()["purelib"])
    # This checkout first: the stub ignores PYTHONPATH, and an editable install of a shared venv may
    # point at another checkout; the handler served must be the one whose repository was built.
    (_site_packages(venv) / PTH_FILE).write_text(
        f"import site, sys; site.addsitedir({str(project)!r}); sys.path.insert(0, {str(REPO_ROOT)!r})\n")
    root = _triton_root(venv)
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    shutil.copy2(stub, root / "backends" / "python" / "triton_python_backend_stub")


def server_env(layout: TritonLayout) -> dict[str, str]:
    """The server's environment: the Triton venv first on PATH (the stub adopts the venv of the
    ``python3`` it finds), and the base interpreter's libpython first on the loader's path (else
    the stub may load the system's, of another patch release)."""
    env = {name: value for name, value in os.environ.items()
           if not name.upper().endswith("_PROXY") and not name.startswith(("WAN_S3_", "AWS_"))}
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env.update(
        PATH=f"{layout.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        LD_LIBRARY_PATH=os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p),
        HF_HUB_OFFLINE="1",
    )
    return env


def command(layout: TritonLayout) -> list[str]:
    root = _triton_root(layout.venv)
    return [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={layout.repository}",
        f"--backend-directory={root / 'backends'}",
        "--http-address=127.0.0.1", f"--http-port={layout.http_port}",
        "--grpc-address=127.0.0.1", f"--grpc-port={layout.grpc_port}",
        "--metrics-address=127.0.0.1", f"--metrics-port={layout.metrics_port}",
        "--allow-gpu-metrics=false",
        # A model that fails to load stops the server instead of serving without it.
        "--exit-on-error=true",
        "--exit-timeout-secs=30",
    ]


def _get(url: str, timeout: float = 2.0) -> requests.Response | None:
    with requests.Session() as session:
        session.trust_env = False  # our own local server: never through a proxy
        try:
            return session.get(url, timeout=timeout)
        except requests.RequestException:
            return None


def models_ready(layout: TritonLayout) -> bool:
    """Both models ready (Triton's own /v2/health/ready stays 200 after a stub died: see
    ``scripts.triton_health`` for what the pod reports)."""
    for model in (STREAM_MODEL, PLAIN_MODEL):
        response = _get(f"{layout.http_url}/v2/models/{model}/ready")
        if response is None or response.status_code != 200:
            return False
    return True


def running_pid(layout: TritonLayout) -> int | None:
    try:
        pid = int(layout.pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def ensure_repository(layout: TritonLayout) -> Path:
    from model_store.tiny_model import build_tiny_checkpoint, is_built

    if not is_built(layout.weights):
        print(f"building the tiny TI2V-5B checkpoint in {layout.weights} ...", flush=True)
        build_tiny_checkpoint("ti2v-5b", layout.weights)
    return build_repository(layout.model_config, layout.repository, str(layout.weights.resolve()),
                            layout.max_batch_size)


def start(layout: TritonLayout = TritonLayout(), timeout_s: float = 180.0) -> subprocess.Popen | None:
    """Start tritonserver in the background and wait until both models are ready."""
    if running_pid(layout) is not None and models_ready(layout):
        print("Triton is already running.")
        report(layout)
        return None
    if not (_triton_root(layout.venv) / "bin" / "tritonserver").is_file():
        raise SystemExit(f"{layout.venv} has no tritonserver: `make .venv-triton/.installed` makes it")
    if not (_site_packages(layout.venv) / PTH_FILE).is_file():
        link_project_venv(layout.venv)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    ensure_repository(layout)
    started = time.monotonic()
    with open(layout.log_file, "ab") as log:
        process = subprocess.Popen(command(layout), cwd=layout.run_dir, env=server_env(layout), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    layout.pid_file.write_text(str(process.pid))
    while time.monotonic() < started + timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"tritonserver exited ({process.returncode}); see {layout.log_file}")
        if models_ready(layout):
            print(f"Triton is ready ({time.monotonic() - started:.1f} s from start).")
            report(layout)
            return process
        time.sleep(0.5)
    stop(layout)
    raise SystemExit(f"Triton did not become ready in {timeout_s:.0f} s; see {layout.log_file}")


def stop(layout: TritonLayout = TritonLayout(), timeout_s: float = 60.0) -> None:
    pid = running_pid(layout)
    if pid is None:
        print("Triton is not running.")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running_pid(layout) is not None:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break  # our own child, now reaped
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        if running_pid(layout) is not None:
            os.kill(pid, signal.SIGKILL)
    layout.pid_file.unlink(missing_ok=True)
    print("Triton stopped.")


def report(layout: TritonLayout) -> None:
    print(
        f"  HTTP:     {layout.http_url}/v2/models/{PLAIN_MODEL}/infer  (KServe v2 / tritonclient.http)\n"
        f"  stream:   {layout.http_url}/v2/models/{STREAM_MODEL}/generate_stream  (progress, then the result)\n"
        f"  gRPC:     {layout.grpc_url}  (tritonclient.grpc; streams to {STREAM_MODEL})\n"
        f"  metrics:  http://127.0.0.1:{layout.metrics_port}/metrics\n"
        f"  log:      {layout.log_file}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status", "build", "link-venv"))
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for ready")
    parser.add_argument("--venv", type=Path, default=TRITON_VENV, help="the Triton venv (link-venv)")
    args = parser.parse_args(argv)
    layout = TritonLayout(venv=args.venv)
    if args.action == "start":
        start(layout, args.timeout)
    elif args.action == "stop":
        stop(layout)
    elif args.action == "build":
        print(ensure_repository(layout))
    elif args.action == "link-venv":
        link_project_venv(args.venv)
    else:
        from handler.triton_health import check

        pid = running_pid(layout)
        problem = check(layout.http_url, server_pid=pid) if pid is not None else "not running"
        print(problem or "running")
        if problem is None:
            report(layout)
        raise SystemExit(0 if problem is None else 1)


if __name__ == "__main__":
    main()

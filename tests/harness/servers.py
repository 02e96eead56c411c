"""Real servers for tests and the campaign: ONE TorchServe wrapper (``Server``) on free 127.0.0.1
ports, started from the repo's configuration by ``scripts.serve``, and ONE moto launcher
(``MotoServer``) with the one S3 environment a server writing to it gets (``moto_env``).

Every HTTP client here is proxy-free (``scripts.serve.local_session``) and every server gets none of
the caller's storage or proxy variables, only those given: nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

from scripts.serve import REPO_ROOT, ServerLayout, free_ports, isolated_layout, local_session, read_key, start, stop
from tests.harness.payloads import SMALL

TINY_CONFIG = REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml"
REQUEST_TIMEOUT_S = 120.0
START_TIMEOUT_S = 240.0


class Server:
    """One real TorchServe process on free 127.0.0.1 ports, with the repo's configuration."""

    def __init__(self, layout: ServerLayout, startup_s: float = 0.0):
        self.layout = layout
        self.startup_s = startup_s

    @property
    def predictions_url(self) -> str:
        return f"{self.layout.inference_url}/predictions/{self.layout.model_name}"

    def key(self, kind: str = "inference") -> str:
        return read_key(self.layout.key_file, kind)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def post(self, body: Any = None, *, data: bytes | str | None = None, content_type: str | None = "application/json",
             timeout: float = REQUEST_TIMEOUT_S, session: requests.Session | None = None, **kwargs) -> requests.Response:
        """POST a JSON body (``body``) or raw ``data`` with the given content type (None: no header),
        through ``session`` (a load client's own) or a proxy-free one of its own."""
        headers = self.headers()
        if body is not None:
            data = json.dumps(body)
        if content_type is not None and data is not None:
            headers["Content-Type"] = content_type
        if session is not None:
            return session.post(self.predictions_url, data=data, headers=headers, timeout=timeout, **kwargs)
        # A session per call, as requests.post does (thread-safe; a streamed response outlives it).
        with local_session() as own:
            return own.post(self.predictions_url, data=data, headers=headers, timeout=timeout, **kwargs)

    def predict(self, body: Any, **kwargs) -> requests.Response:
        """A JSON object, or bytes / text sent as they are with a JSON content type."""
        if isinstance(body, (bytes, str)):
            return self.post(data=body, **kwargs)
        return self.post(body, **kwargs)

    def describe(self) -> dict[str, Any]:
        with local_session() as session:
            response = session.get(f"{self.layout.management_url}/models/{self.layout.model_name}",
                                   headers=self.headers("management"), timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def workers(self) -> list[dict[str, Any]]:
        return self.describe()["workers"]

    def worker_pids(self) -> list[int]:
        return sorted(int(w["pid"]) for w in self.workers() if w.get("pid") is not None)

    def ready_pid(self) -> int | None:
        """The PID of the (single) READY worker, or None."""
        ready = [int(w["pid"]) for w in self.workers() if w.get("status") == "READY" and w.get("pid") is not None]
        return ready[0] if len(ready) == 1 else None

    def wait_ready(self, timeout_s: float = 120.0, not_pid: int | None = None) -> tuple[int | None, float]:
        """Wait for a READY worker (one other than ``not_pid``); return its PID and the wait."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                pid = self.ready_pid()
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pid = None
            if pid is not None and pid != not_pid:
                return pid, time.monotonic() - started
            time.sleep(0.25)
        return None, time.monotonic() - started

    def frontend_pid(self) -> int | None:
        try:
            return int((self.layout.run_dir / "tmp" / ".model_server.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def start_server(root: Path, weights_dir: Path, extra_env: dict[str, str] | None = None,
                 model_config: Path | None = None) -> Server:
    """Same settings as make serve (or ``model_config``), on free ports so tests never collide with
    a running server; no storage or proxy variables from the caller's environment, only ``extra_env``'s."""
    layout = isolated_layout(root, weights_dir=weights_dir, **({"model_config": model_config} if model_config else {}))
    startup_s = start(layout, timeout_s=START_TIMEOUT_S, extra_env=extra_env, isolated=True)
    return Server(layout, startup_s)


def stop_server(server: Server) -> None:
    stop(server.layout)


@contextlib.contextmanager
def running(root: Path, config: Path, weights_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """A fresh server for one scenario, stopped however the scenario ends."""
    layout = isolated_layout(root, model_config=config, weights_dir=weights_dir)
    server = Server(layout)
    try:
        server.startup_s = start(layout, timeout_s=START_TIMEOUT_S, extra_env=extra_env, isolated=True)
        yield server
    finally:
        stop(layout)


def proc_kib(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM, VmSize) in KiB, None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (and its waited-for children), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wait_busy(pid: int, cpu_s: float = 0.5, timeout_s: float = 60.0) -> float | None:
    """Wait until process ``pid`` has used ``cpu_s`` more CPU seconds than now: the observable sign
    that a request reached it and it is working (an idle worker uses almost none). Returns the
    wait, or None when it did not happen within ``timeout_s`` (or the process is gone)."""
    started, base = time.monotonic(), cpu_seconds(pid)
    while base is not None and time.monotonic() - started < timeout_s:
        now = cpu_seconds(pid)
        if now is None:
            return None
        if now - base >= cpu_s:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"), so a later VmHWM is this window's peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- model configs for the scenarios ---------------------------------------------------------------


def model_config(path: Path, top: dict[str, Any] | None = None, handler: dict[str, Any] | None = None) -> Path:
    """tiny-ti2v.yaml with overrides (top-level keys; handler keys merged one level deep)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.update(top or {})
    for key, value in (handler or {}).items():
        section = config["handler"].get(key)
        config["handler"][key] = {**section, **value} if isinstance(section, dict) and isinstance(value, dict) else value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def service_config(path: Path, queue_size: int = 4) -> Path:
    """The shipped tiny model (limits, timeouts) on one worker with a small queue."""
    return model_config(path, {"minWorkers": 1, "maxWorkers": 1, "jobQueueSize": queue_size})


# Every request the fuzzer gets accepted is SMALL at most, so thousands of bodies take minutes;
# the parser and its rules are the same, only the numbers are smaller.
FUZZ_LIMITS = {"max_side_px": 128, "max_pixels": 128 * 128, "max_num_frames": 9, "max_inference_steps": 2}


def fuzz_config(path: Path) -> Path:
    return model_config(path, {"minWorkers": 1, "maxWorkers": 1},
                        {"defaults": dict(SMALL), "limits": dict(FUZZ_LIMITS)})


# A responseTimeout small enough that TorchServe would kill the worker during a long request,
# a deadline far below it, and limits that allow a request of many seconds of denoising.
DEADLINE_RESPONSE_TIMEOUT_S = 10
DEADLINE_S = 2.0


# The handler section of the deadline scenario: a deadline far below responseTimeout, and limits
# that allow a request of many seconds.
DEADLINE_HANDLER = {"deadline_s": DEADLINE_S,
                    "limits": {"max_side_px": 640, "max_pixels": 640 * 640, "max_num_frames": 161,
                               "max_inference_steps": 50}}


def deadline_config(path: Path) -> Path:
    return model_config(path, {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": DEADLINE_RESPONSE_TIMEOUT_S},
                        DEADLINE_HANDLER)




# -- moto: a real S3 protocol endpoint ---------------------------------------------------------------


def moto_env(endpoint: str, bucket: str | None = None) -> dict[str, str]:
    """All the storage settings a server (or a test) writing to a moto endpoint gets. The servers
    drop the caller's (AWS_ENDPOINT_URL_S3 would win over AWS_ENDPOINT_URL; a profile or config
    file could name other credentials or endpoints), so these are the only ones it has."""
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}
    return {**env, "WAN_S3_BUCKET": bucket} if bucket else env


class MotoServer:
    """moto in server mode: a real S3 protocol endpoint on 127.0.0.1, stoppable mid-test."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_ports(1)[0]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it and wait until it listens (fails if it exits first or not within ``timeout_s``)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                             "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited ({self.process.returncode}) before listening on "
                                   f"{self.endpoint}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"moto_server did not listen on {self.endpoint} within {timeout_s:.0f} s; "
                                       f"see {self.log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def env(self, bucket: str | None = None) -> dict[str, str]:
        return moto_env(self.endpoint, bucket)

    def client(self):
        """A boto3 S3 client straight to this server (no proxy of the caller's: proxies={} is "none")."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing", config=Config(proxies={}))


@contextlib.contextmanager
def moto_s3(log_path: Path, bucket: str = "wan-fuzz") -> Iterator[dict[str, str]]:
    """A moto server with one bucket for the length of the block; yields its S3 environment."""
    server = MotoServer(log_path)
    try:
        server.start()
        server.client().create_bucket(Bucket=bucket)
        yield server.env(bucket)
    finally:
        server.stop()

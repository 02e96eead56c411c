"""A live job service for tests: its own PostgreSQL (pgserver) and the API and the worker as real
processes (``python -m jobs ...``) on free 127.0.0.1 ports, so that tests can kill -9 either of
them; in front of a real TorchServe on the tiny model (tests/conftest.py's jobs_* fixtures)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from scripts.serve import REPO_ROOT, free_ports

# The smallest request the tiny model answers in a fraction of a second.
TINY_JOB = {"size": "64x64", "num_frames": 5, "num_inference_steps": 2}
# A job that keeps the tiny model busy for a few seconds (to find it queued or running).
SLOW_JOB = {"size": "256x256", "num_frames": 33, "num_inference_steps": 20}


class Postgres:
    """A PostgreSQL of its own under ``root`` (pgserver), stoppable and restartable mid-test."""

    def __init__(self, root: Path):
        self.root = root

    def start(self) -> str:
        import pgserver

        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.url = pgserver.get_server(str(self.root), cleanup_mode=None).get_uri()
        return self.url

    def stop(self) -> None:
        from jobs.db import stop_embedded

        stop_embedded(self.root.parent, data_dir_name=self.root.name)

    def restart(self) -> None:
        self.stop()
        # get_server remembers the handle of a server it started in this process: start anew.
        import pgserver.postgres_server as server_module

        server_module.PostgresServer._instances.pop(self.root, None)
        self.start()


class JobService:
    """The API (and, unless separate, the worker) of one job service, as processes."""

    def __init__(self, root: Path, database: Postgres, config: dict, env: dict[str, str] | None = None,
                 separate_worker: bool = False):
        self.root = root
        self.database = database
        self.separate_worker = separate_worker
        self.config_path = root / "jobs.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        [self.port] = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
            "JOBS_CONFIG": str(self.config_path), "JOBS_DATABASE_URL": database.url, "JOBS_RUN_DIR": str(root),
            "JOBS_STALLED_AFTER_S": "5", **(env or {}),
        }
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def _spawn(self, *args: str, log: str) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "jobs", *args], cwd=REPO_ROOT, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT)

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO_ROOT, env=self.env, check=True,
                              capture_output=True, text=True, timeout=120).stdout

    def start(self) -> None:
        self.cli("migrate")
        self.start_api()
        if self.separate_worker:
            self.start_worker()

    def start_api(self) -> None:
        args = ["serve", "--port", str(self.port)] + ([] if self.separate_worker else ["--with-worker"])
        self.api = self._spawn(*args, log="api.log")
        wait_for(lambda: self.ready(), 60, f"the job service at {self.url} (see {self.root / 'api.log'})")

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", "--metrics-port", "0", log="worker.log")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _end(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def kill_api(self) -> None:
        self._end(self.api, signal.SIGKILL)

    def kill_worker(self) -> None:
        self._end(self.worker if self.separate_worker else self.api, signal.SIGKILL)

    def stop(self) -> None:
        self._end(self.api)
        self._end(self.worker)

    def new_key(self, user: str, admin: bool = False) -> dict:
        return json.loads(self.cli("keys", "create", "--user", user, *(["--admin"] if admin else [])))

    def client(self, key: str | dict, timeout: float = 60) -> httpx.Client:
        token = key["key"] if isinstance(key, dict) else key
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                            trust_env=False)

    def wait_done(self, client: httpx.Client, video_id: str, timeout_s: float = 120) -> dict:
        """Poll until the job is finished; return its video object."""
        video: dict = {}

        def finished() -> bool:
            nonlocal video
            video = client.get(f"/v1/videos/{video_id}").json()
            return video.get("status") in ("completed", "failed", "cancelled")

        wait_for(finished, timeout_s, f"job {video_id} to finish (last: {video.get('status')})", interval=0.2)
        return video


def wait_for(condition, timeout_s: float, what: str, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events answer."""
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if event and data:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def jobs_config(torchserve, **extra_models) -> dict:
    """config/jobs.yaml for a test: the model ``wan`` on the given TorchServe (capacity 1: one
    worker), plus ``extra_models`` (name -> list of endpoints)."""
    base = {"kind": "torchserve", "url": torchserve.layout.inference_url, "model": "wan", "capacity": 1,
            "key_file": str(torchserve.layout.key_file), "timeout_s": 120, "cooldown_s": 1}
    model_config = str(REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml")
    models = [{"name": "wan", "variant": "ti2v-5b", "model_config": model_config,
               "endpoints": [dict(base, name="local")]}]
    for name, endpoints in extra_models.items():
        models.append({"name": name, "variant": "ti2v-5b", "model_config": model_config,
                       "endpoints": [dict(base, **endpoint) for endpoint in endpoints]})
    return {"models": models}

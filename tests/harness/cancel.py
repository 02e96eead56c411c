"""How soon TorchServe is free after a running job is cancelled, with and without the handler's
cancellation check (handler/cancel.py): a real job service (pgserver, API + worker) in front of a
real TorchServe on the tiny model, one worker, capacity 1.

One run: a slow job (LONG_JOB) starts; once it has made ``cancel_after_steps`` steps a tiny job is queued
behind it and the slow one is cancelled through the Jobs API; we time, from the cancel, the tiny
job's first progress (TorchServe took it: the worker is free) and its completion. Without the check
TorchServe finishes the cancelled video first (the job service closed the connection, TorchServe
does not notice); with it the handler stops at the first step after its next question (<= 1 s).

    python -m tests.harness.cancel --repeat 3 --out benchmarks/results/cpu-tiny-cancel.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from scripts.serve import REPO_ROOT, free_ports, local_session
from tests.harness.jobs import SLOW_JOB, TINY_JOB, JobService, Postgres, jobs_config, wait_for
from tests.harness.servers import TINY_CONFIG, Server, start_server, stop_server

WANTED_ROUTE = "/internal/v1/videos/{job_id}/wanted"
# The tiny model's denoising is fast next to its VAE decode (CPU: 20 steps of 256x256x33 in about a
# third of the ~3 s): a cancel at step 2 is asked about (<= 1 s later) once the steps are over and
# only the decode is left. Real models spend most of a video in the steps; so does this job, on a
# tiny model whose step limit is raised for it (long_steps_config).
LONG_JOB = dict(SLOW_JOB, num_inference_steps=80)


def long_steps_config(root: Path, max_steps: int = 100) -> Path:
    """The tiny model's config/models/tiny-ti2v.yaml with room for many steps."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["handler"]["limits"]["max_inference_steps"] = max_steps
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny-ti2v-long.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cancel_env(port: int, token: str) -> dict[str, str]:
    """The TorchServe environment that points its handler at the job service on ``port``."""
    return {"WAN_CANCEL_URL": f"http://127.0.0.1:{port}{WANTED_ROUTE}", "WAN_CANCEL_TOKEN": token}


def cancelled_generations(server: Server) -> int:
    """The handler's count of generations that ended cancelled (TorchServe's metrics endpoint)."""
    with local_session() as session:
        text = session.get(f"{server.layout.metrics_url}/metrics", timeout=10).text
    return sum(int(float(m)) for m in re.findall(r'^wan_requests_total\{[^}]*outcome="cancelled"[^}]*\} (\S+)', text,
                                                   re.MULTILINE))


class Rig:
    """A job service and a TorchServe, with (``check``) or without the handler's cancellation check."""

    def __init__(self, root: Path, weights_dir: Path, check: bool):
        self.root = root
        self.check = check
        self.token = secrets.token_urlsafe(16)
        [self.port] = free_ports(1)
        self.database = Postgres(root / "pg" / "data")
        self.server: Server | None = None
        self.service: JobService | None = None
        self.weights_dir = weights_dir

    def __enter__(self) -> Rig:  # noqa: PYI034 - no typing_extensions in the test extras
        try:
            model_config = long_steps_config(self.root)
            self.server = start_server(self.root / "torchserve", self.weights_dir,
                                       extra_env=cancel_env(self.port, self.token) if self.check else None,
                                       model_config=model_config)
            self.database.start()
            (self.root / "jobs").mkdir(parents=True, exist_ok=True)
            config = jobs_config(self.server)
            config["models"][0]["model_config"] = str(model_config)  # the same limits at submission
            self.service = JobService(self.root / "jobs", self.database, config,
                                      env={"JOBS_DATA_PLANE_TOKEN": self.token}, port=self.port)
            self.service.start()
            self.key = self.service.new_key("bench")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.service is not None:
            self.service.stop()
        self.database.stop()
        if self.server is not None:
            stop_server(self.server)

    def cancel_once(self, slow_job: dict[str, Any], cancel_after_steps: int = 2, timeout_s: float = 300) -> dict:
        """One slow job cancelled mid-way and one tiny job behind it; seconds from the cancel."""
        with self.service.client(self.key) as client:
            slow = client.post("/v1/videos", json={"prompt": "slow", **slow_job}).json()
            steps = slow_job["num_inference_steps"]
            wait_for(lambda: client.get(f"/v1/videos/{slow['id']}").json().get("progress", 0)
                     >= 100 * cancel_after_steps // steps, timeout_s, f"job {slow['id']} to make progress",
                     interval=0.05)
            nxt = client.post("/v1/videos", json={"prompt": "next", **TINY_JOB}).json()
            cancelled_at = time.monotonic()
            assert client.post(f"/v1/videos/{slow['id']}/cancel").json()["status"] == "cancelled"
            first_progress_s = None
            while time.monotonic() - cancelled_at < timeout_s:
                video = client.get(f"/v1/videos/{nxt['id']}").json()
                if first_progress_s is None and (video.get("progress", 0) > 0 or video["status"] == "completed"):
                    first_progress_s = time.monotonic() - cancelled_at
                if video["status"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            done_s = time.monotonic() - cancelled_at
            assert video["status"] == "completed", video
        return {"next_job_started_after_cancel_s": round(first_progress_s, 3),
                "next_job_completed_after_cancel_s": round(done_s, 3)}


def slow_job_alone_s(rig: Rig, slow_job: dict[str, Any], timeout_s: float = 600) -> float:
    """How long the slow job takes uncancelled through the same stack (for scale)."""
    with rig.service.client(rig.key) as client:
        started = time.monotonic()
        video = client.post("/v1/videos", json={"prompt": "alone", **slow_job}).json()
        done = rig.service.wait_done(client, video["id"], timeout_s)
        assert done["status"] == "completed", done
        return round(time.monotonic() - started, 3)


def _tiny_weights(root: Path) -> Path:
    from model_store.tiny_model import build_tiny_checkpoint

    build_tiny_checkpoint("ti2v-5b", root / "tiny-ti2v-5b")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=LONG_JOB["num_inference_steps"])
    parser.add_argument("--cancel-after-steps", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    slow_job = dict(LONG_JOB, num_inference_steps=args.steps)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wan-cancel-") as tmp:
        weights = _tiny_weights(Path(tmp) / "weights")
        for check in (False, True):
            name = "with_check" if check else "without_check"
            with Rig(Path(tmp) / name, weights, check) as rig:
                alone = slow_job_alone_s(rig, slow_job)
                runs = [rig.cancel_once(slow_job, args.cancel_after_steps) for _ in range(args.repeat)]
                results[name] = {
                    "slow_job_alone_s": alone,
                    "runs": runs,
                    "median_next_job_started_after_cancel_s":
                        statistics.median(r["next_job_started_after_cancel_s"] for r in runs),
                    "handler_cancelled_generations": cancelled_generations(rig.server),
                }
            print(name, json.dumps(results[name]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    record = {
        "command": "python -m tests.harness.cancel " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": f"{platform.processor() or platform.machine()} ({_cores()} cores), CPU, tiny random-weight model",
        "slow_job": slow_job, "next_job": TINY_JOB, "cancel_after_steps": args.cancel_after_steps,
        "check": {"interval_s": 1.0, "timeout_s": 2.0},
        **results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()

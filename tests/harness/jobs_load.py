"""Load on the job service: N jobs from C concurrent clients (each its own user and API key)
against a live job service, PostgreSQL and TorchServe on the tiny model. It checks what the
Jobs API promises under load and records the figures:

- none lost: every accepted job ends completed, with its video;
- none run twice to completion: each job's record holds exactly one completed attempt;
- the queue drains: the queue depth (Prometheus and Procrastinate's own table) returns to 0.

    python -m tests.harness.jobs_load --jobs 200 --clients 20 --out reliability/results/jobs-load.json

starts its own TorchServe (tiny model), pgserver and job service under a temporary folder.
``tests/test_jobs_load.py`` runs a smaller load against the test fixtures with ``run_load``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psycopg

from tests.harness.jobs import TINY_JOB, JobService, Postgres, jobs_config, wait_for

FINISHED = ("completed", "failed", "cancelled")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else 0.0


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50": _percentile(values, 0.5), "p95": _percentile(values, 0.95), "max": round(max(values, default=0), 3),
            "mean": round(statistics.fmean(values), 3) if values else 0.0}


def _queue_depth(service: JobService) -> dict[str, float]:
    """Queue depth as Prometheus sees it and as Procrastinate's own table holds it."""
    text = httpx.get(f"{service.url}/metrics", timeout=10, trust_env=False).text
    prometheus = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("wan_jobs_queue_depth{"))
    with psycopg.connect(service.database.url, autocommit=True) as conn:
        waiting = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE queue_name LIKE 'videos.%%' "
                               "AND status IN ('todo', 'doing')").fetchone()[0]
    return {"prometheus": prometheus, "procrastinate_todo_or_doing": waiting}


def run_load(service: JobService, jobs: int, clients: int, job: dict | None = None,
             timeout_s: float = 900) -> dict:
    """Submit ``jobs`` jobs from ``clients`` threads (each its own user), wait for all, check
    the promises above. Returns the figures; raises AssertionError when a promise is broken."""
    job = job or TINY_JOB
    keys = [service.new_key(f"load-{i}") for i in range(clients)]
    per_client = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    accepted: list[list[str]] = [[] for _ in range(clients)]
    submit_s: list[float] = []
    refused: list[str] = []
    lock = threading.Lock()

    def client_thread(index: int) -> None:
        with service.client(keys[index], timeout=60) as client:
            for n in range(per_client[index]):
                started = time.monotonic()
                response = client.post("/v1/videos", json={"prompt": f"load {index}/{n}", **job, "seed": n},
                                       headers={"Idempotency-Key": f"load-{index}-{n}"})
                with lock:
                    submit_s.append(time.monotonic() - started)
                    if response.status_code == 200:
                        accepted[index].append(response.json()["id"])
                    else:
                        refused.append(f"{response.status_code} {response.text[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    submitted_in = time.monotonic() - started
    assert not refused, f"{len(refused)} submissions refused, the first: {refused[0]}"
    ids = [video_id for batch in accepted for video_id in batch]
    assert len(ids) == jobs == len(set(ids)), (len(ids), jobs)

    # Every job, through its owner's key (admin keys are not needed: isolation stays on).
    videos: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    for index, batch in enumerate(accepted):
        with service.client(keys[index]) as client:
            for video_id in batch:
                def finished(video_id: str = video_id, client: httpx.Client = client) -> bool:
                    videos[video_id] = client.get(f"/v1/videos/{video_id}").json()
                    return videos[video_id].get("status") in FINISHED
                wait_for(finished, max(1.0, deadline - time.monotonic()), f"job {video_id}", interval=0.2)
    drained_in = time.monotonic() - started
    wait_for(lambda: _queue_depth(service) == {"prometheus": 0, "procrastinate_todo_or_doing": 0}, 30,
             f"the queue to drain (last: {_queue_depth(service)})")

    statuses = {s: sum(v["status"] == s for v in videos.values()) for s in FINISHED}
    completed_twice = [v["id"] for v in videos.values()
                       if sum(a["outcome"] == "completed" for a in v["attempts"]) != 1]
    attempts = sum(len(v["attempts"]) for v in videos.values())
    waits = [v["started_at"] - v["created_at"] for v in videos.values() if v.get("started_at")]
    turnaround = [v["completed_at"] - v["created_at"] for v in videos.values() if v.get("completed_at")]
    # Each download is checked: an accepted job whose video cannot be fetched is a lost job.
    missing_video = []
    for index, batch in enumerate(accepted):
        with service.client(keys[index]) as client:
            for video_id in batch:
                content = client.get(f"/v1/videos/{video_id}/content")
                if content.status_code != 200 or content.content[4:8] != b"ftyp":
                    missing_video.append(video_id)
    assert statuses["completed"] == jobs, f"not all completed: {statuses}"
    assert not completed_twice, f"jobs whose record holds other than one completed attempt: {completed_twice[:5]}"
    assert not missing_video, f"completed without a downloadable video: {missing_video[:5]}"
    return {
        "jobs": jobs, "clients": clients, "job": job, "statuses": statuses, "attempts": attempts,
        "completed_twice": len(completed_twice), "videos_missing": len(missing_video),
        "queue_depth_after": _queue_depth(service),
        "submit_latency_s": _summary(submit_s), "submitted_in_s": round(submitted_in, 2),
        "wait_s": _summary(waits), "turnaround_s": _summary(turnaround),
        "all_done_in_s": round(drained_in, 2), "jobs_per_minute": round(60 * jobs / drained_in, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    from scripts.serve import isolated_layout, start, stop

    with tempfile.TemporaryDirectory(prefix="jobs-load-") as tmp:
        root = Path(tmp)
        # TorchServe as `make serve` runs it: the tiny model, one worker (the endpoint's capacity 1).
        layout = isolated_layout(root / "torchserve")
        start(layout, timeout_s=300, isolated=True)
        database = Postgres(root / "pg" / "data")
        database.start()
        (root / "jobs").mkdir()
        service = JobService(root / "jobs", database, jobs_config(SimpleNamespace(layout=layout)),
                             env={"JOBS_MAX_ACTIVE_PER_USER": str(args.jobs)})
        try:
            service.start()
            figures = run_load(service, args.jobs, args.clients)
        finally:
            service.stop()
            database.stop()
            stop(layout)
    record = {
        "command": "python -m tests.harness.jobs_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "torchserve_workers": 1, **figures,
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

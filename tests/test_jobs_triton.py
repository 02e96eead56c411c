"""The job service's round trip on a Triton endpoint: a live job service (pgserver, API + worker)
whose model runs on the session's real tritonserver (the decoupled ``wan_stream``): submit through
the Jobs API, progress events, the video, cancel stopping the Triton generation within a step."""

from __future__ import annotations

import re

import pytest

from handler.video import probe_mp4
from tests.harness.jobs import SLOW_JOB, TINY_JOB, JobService, Postgres, sse_events, wait_for

CANCELLED_AT = re.compile(r"cancelled by the client after step (\d+) of (\d+)")


@pytest.fixture(scope="module")
def triton_jobs(tmp_path_factory, triton):
    """The endpoint as an operator writes it in config/jobs.yaml: kind triton, no model named. Its
    own database: the session's job service (tests/test_jobs.py) serves the same model name, and
    its worker would take these jobs from the shared queue."""
    config = {"models": [{"name": "wan", "variant": "ti2v-5b", "model_config": str(triton.model_config),
                          "endpoints": [{"name": "triton", "kind": "triton", "url": triton.http_url,
                                         "capacity": 1, "timeout_s": 120, "cooldown_s": 1}]}]}
    root = tmp_path_factory.mktemp("jobs-triton")
    database = Postgres(root / "pg")
    database.start()
    service = JobService(root, database, config)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        database.stop()


def test_a_job_on_triton_streams_progress_and_completes(triton_jobs):
    key = triton_jobs.new_key("triton-user")
    with triton_jobs.client(key) as client:
        video = client.post("/v1/videos", json={"prompt": "a paper boat", "seed": 11, **TINY_JOB,
                                                "num_inference_steps": 3}).json()
        events = []
        with client.stream("GET", f"/v1/videos/{video['id']}/events", timeout=120) as stream:
            for name, data in sse_events(stream):
                events.append((name, data))
                if name in ("completed", "failed", "cancelled"):
                    break
        names = [name for name, _ in events]
        assert names[-1] == "completed", events[-1]
        steps = [data["step"] for name, data in events if name == "progress"]
        assert steps and steps == sorted(steps) and steps[-1] == 3 and events[-1][1]["progress"] == 100
        done = events[-1][1]
        assert done["seed"] == 11 and [a["endpoint"] for a in done["attempts"]] == ["triton"], done
        content = client.get(f"/v1/videos/{video['id']}/content")
        assert content.status_code == 200
        assert probe_mp4(content.content).num_frames == TINY_JOB["num_frames"]


def test_a_job_on_triton_that_breaks_a_rule_fails_at_submission(triton_jobs):
    key = triton_jobs.new_key("triton-strict")
    with triton_jobs.client(key) as client:
        refused = client.post("/v1/videos", json={"prompt": "x", "num_frames": 10})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "num_frames"


def test_cancel_of_a_running_triton_job_stops_its_generation_within_a_step(triton_jobs, triton):
    key = triton_jobs.new_key("triton-cancel")
    before = len(CANCELLED_AT.findall(triton.log_file.read_text(errors="replace")))
    with triton_jobs.client(key) as client:
        video = client.post("/v1/videos", json={"prompt": "long", **SLOW_JOB}).json()
        wait_for(lambda: (client.get(f"/v1/videos/{video['id']}").json().get("step") or 0) >= 1, 120,
                 f"job {video['id']} to start on Triton", interval=0.05)
        cancelled = client.post(f"/v1/videos/{video['id']}/cancel").json()
        step_at_cancel = client.get(f"/v1/videos/{video['id']}").json().get("step") or 0
        assert cancelled["status"] == "cancelled"
    found: list[tuple[str, str]] = []

    def stopped() -> bool:
        nonlocal found
        found = CANCELLED_AT.findall(triton.log_file.read_text(errors="replace"))
        return len(found) > before

    wait_for(stopped, 60, "Triton to log the cancelled generation")
    step, total = (int(n) for n in found[-1])
    # The worker closes the stream at the next progress line it reads and Triton stops after the
    # step running then: a step or two past the one the job record had, more on a starved machine
    # (the worker reads the lines late), never the whole video.
    assert total == SLOW_JOB["num_inference_steps"] and step_at_cancel <= step < total, (step, step_at_cancel)

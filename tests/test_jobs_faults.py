"""Faults of the job service, with real processes: kill -9 of the worker and of the API mid-job,
a restart of PostgreSQL mid-job. Afterwards every accepted job is completed or failed with a
reason, none is stuck, and its record says what happened (the issue's rule: results and records
are never lost)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import pytest

from tests.harness.jobs import SLOW_JOB, TINY_JOB, JobService, jobs_config, own_job_service, wait_for

FINISHED = ("completed", "failed", "cancelled")


@pytest.fixture
def fault_service(tmp_path, jobs_torchserve):
    """A job service of the test's own (its own Postgres), API and worker as separate processes,
    so that either can be killed."""
    with own_job_service(tmp_path, jobs_config(jobs_torchserve), separate_worker=True,
                         env={"JOBS_MAX_ACTIVE_PER_USER": "20"}) as service:
        yield service


def _submit(client: httpx.Client, count: int, job: dict) -> list[str]:
    ids = []
    for i in range(count):
        response = client.post("/v1/videos", json={"prompt": f"fault {i}", **job})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


def _running_with_a_step(client: httpx.Client, video_id: str) -> bool:
    video = client.get(f"/v1/videos/{video_id}").json()
    return video["status"] == "in_progress" and (video["step"] or 0) >= 1


@contextlib.contextmanager
def _one_running_two_queued(service: JobService) -> Iterator[tuple[httpx.Client, list[str]]]:
    """A client and the ids of three jobs: a slow one running (a step done), two small ones queued
    behind it; the moment each fault strikes."""
    with service.client(service.new_key("faults")) as client:
        ids = _submit(client, 1, SLOW_JOB) + _submit(client, 2, TINY_JOB)
        wait_for(lambda: _running_with_a_step(client, ids[0]), 90, "the first job to run")
        yield client, ids


def _all_finished(service: JobService, client: httpx.Client, ids: list[str], timeout_s: float) -> list[dict]:
    for video_id in ids:
        service.wait_done(client, video_id, timeout_s)
    return [client.get(f"/v1/videos/{video_id}").json() for video_id in ids]


def _assert_sound(videos: list[dict], client: httpx.Client) -> None:
    for video in videos:
        assert video["status"] in FINISHED, video
        if video["status"] == "completed":
            assert client.get(f"/v1/videos/{video['id']}/content").content[4:8] == b"ftyp"
            assert video["attempts"][-1]["outcome"] == "completed"
        else:
            assert video["error"]["message"], video
        assert all(a["ended_at"] is not None for a in video["attempts"]), video["attempts"]


def test_worker_killed_mid_job_is_taken_up_again(fault_service):
    with _one_running_two_queued(fault_service) as (client, ids):
        fault_service.kill_worker()
        # Nothing runs while no worker lives: the job stays in progress, the others queued.
        assert client.get(f"/v1/videos/{ids[1]}").json()["status"] == "queued"
        fault_service.start_worker()
        videos = _all_finished(fault_service, client, ids, 180)
        assert [v["status"] for v in videos] == ["completed"] * 3, [v.get("error") for v in videos]
        _assert_sound(videos, client)
        first = videos[0]["attempts"]
        # The killed worker's attempt is closed as interrupted, the second one completed it.
        assert [a["outcome"] for a in first] == ["interrupted", "completed"], first
        assert "worker running it stopped" in first[0]["reason"]
        assert first[0]["worker"] != first[1]["worker"]
        for video in videos[1:]:
            assert [a["outcome"] for a in video["attempts"]] == ["completed"]


def test_api_killed_mid_job_loses_nothing(fault_service):
    with _one_running_two_queued(fault_service) as (client, ids):
        fault_service.kill_api()
        with pytest.raises(httpx.TransportError):
            client.get(f"/v1/videos/{ids[0]}")
        # The worker goes on without the API; a new API sees the same records.
        fault_service.start_api()
        videos = _all_finished(fault_service, client, ids, 180)
        assert [v["status"] for v in videos] == ["completed"] * 3, [v.get("error") for v in videos]
        _assert_sound(videos, client)
        assert all(len(v["attempts"]) == 1 for v in videos)
        assert client.get("/v1/videos", params={"limit": 10}).json()["data"][0]["id"] == ids[-1]


def test_postgres_restarted_mid_job(fault_service):
    with _one_running_two_queued(fault_service) as (client, ids):
        fault_service.database.stop()
        # The API says it is not ready (its database is gone) rather than answering wrongly.
        wait_for(lambda: httpx.get(f"{fault_service.url}/readyz", timeout=10, trust_env=False).status_code == 503,
                 30, "/readyz to say the database is down")
        fault_service.database.restart()
        wait_for(fault_service.ready, 60, "/readyz after the restart")
        videos = _all_finished(fault_service, client, ids, 240)
        _assert_sound(videos, client)
        assert [v["status"] for v in videos] == ["completed"] * 3, [v.get("error") for v in videos]
        # The running job's result was kept although its database went away under it.
        assert videos[0]["attempts"][-1]["outcome"] == "completed"
        # New work is accepted and done after the restart.
        [later] = _submit(client, 1, TINY_JOB)
        assert fault_service.wait_done(client, later, 60)["status"] == "completed"


def test_a_live_workers_long_job_is_not_taken_up_again(tmp_path, jobs_torchserve):
    """No fault: a job that runs past JOBS_STALLED_AFTER_S on a live worker keeps its
    one attempt. (With the heartbeat written as seldom as the threshold, the stalled-job check saw
    a live worker as stopped and took its running job up again.)"""
    with own_job_service(tmp_path, jobs_config(jobs_torchserve), separate_worker=True,
                         env={"JOBS_STALLED_AFTER_S": "3"}) as service, \
            service.client(service.new_key("patient")) as client:
        # Some 5 s of the tiny model on a loaded 2-core machine: past the threshold, the heartbeat
        # rewritten several times meanwhile.
        [video_id] = _submit(client, 1, dict(SLOW_JOB, num_frames=65))
        video = service.wait_done(client, video_id, 180)
        assert video["status"] == "completed", video
        assert [a["outcome"] for a in video["attempts"]] == ["completed"], video["attempts"]
        worker_log = (service.root / "worker.log").read_text()
        assert "taking up job" not in worker_log, worker_log[-2000:]
        assert "Task exception was never retrieved" not in worker_log, worker_log[-2000:]

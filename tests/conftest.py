"""Shared fixtures: tiny real checkpoints, in-process services, and real TorchServe servers."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from model_store.tiny_model import LAYOUTS, build_tiny_checkpoint
from scripts.serve import ServerLayout, free_ports, isolated_layout, read_key, start, stop

# Small enough that a whole generation takes a fraction of a second on a CI core. Not smaller:
# at 64x64 libx264 encodes the same frames differently from run to run (seen with PyAV 18).
SMALL = {"width": 128, "height": 128, "num_frames": 9, "num_inference_steps": 2}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {layout: build_tiny_checkpoint(layout, root / f"tiny-{layout}") for layout in LAYOUTS}


@pytest.fixture(scope="session")
def services(tiny_checkpoints):
    """One in-process WanService per tiny layout, with small request defaults."""
    from handler.service import WanService

    return {
        layout: WanService.from_model_config(
            {"maxWorkers": 1, "handler": {"model_path": str(path), "defaults": dict(SMALL)}},
            path.parent,
        )
        for layout, path in tiny_checkpoints.items()
    }


def png_base64(width: int = 96, height: int = 64, color=(200, 30, 30), data_url: bool = False) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}" if data_url else encoded


class Server:
    """A real TorchServe process on free 127.0.0.1 ports, with the repo's configuration."""

    def __init__(self, layout: ServerLayout):
        self.layout = layout
        self.startup_s = 0.0

    @property
    def predictions_url(self) -> str:
        return f"{self.layout.inference_url}/predictions/{self.layout.model_name}"

    def key(self, kind: str = "inference") -> str:
        return read_key(self.layout.key_file, kind)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def predict(self, body, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        if isinstance(body, (bytes, str)):
            return requests.post(self.predictions_url, data=body, timeout=kwargs.pop("timeout"),
                                 headers={**self.headers(), "Content-Type": "application/json"}, **kwargs)
        return requests.post(self.predictions_url, json=body, headers=self.headers(), **kwargs)

    def describe(self) -> dict:
        response = requests.get(f"{self.layout.management_url}/models/{self.layout.model_name}",
                                headers=self.headers("management"), timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def worker_pids(self) -> list[int]:
        return sorted(int(w["pid"]) for w in self.describe()["workers"] if w.get("pid") is not None)


def start_server(root: Path, weights_dir: Path, extra_env: dict | None = None) -> Server:
    """Same settings as make serve, on free ports so tests never collide with a running server;
    no storage or proxy variables from the caller's environment, only ``extra_env``'s."""
    server = Server(isolated_layout(root, weights_dir=weights_dir))
    server.startup_s = start(server.layout, timeout_s=240, extra_env=extra_env, isolated=True)
    return server


@pytest.fixture(scope="session")
def server_weights(tiny_checkpoints) -> Path:
    # ServerLayout expects <weights_dir>/tiny-ti2v-5b: the session's tiny checkpoints are there.
    return tiny_checkpoints["ti2v-5b"].parent


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, server_weights):
    server = start_server(tmp_path_factory.mktemp("torchserve"), server_weights)
    yield server
    stop(server.layout)


@pytest.fixture(autouse=True, scope="session")
def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"


class MotoServer:
    """moto in server mode: a real S3 protocol endpoint on 127.0.0.1, stoppable mid-test."""

    def __init__(self, port: int, log_path: Path):
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(self.endpoint, timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not start on {self.endpoint}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def env(self) -> dict[str, str]:
        """boto3's standard variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        env = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    [port] = free_ports(1)
    server = MotoServer(port, tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


# The job service's fixtures (a live API + worker over pgserver and a TorchServe of their own).
from tests.jobs_support import jobs_postgres, jobs_service, jobs_torchserve  # noqa: E402,F401

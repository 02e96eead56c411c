"""Fixtures only: tiny real checkpoints, in-process services, real TorchServe and moto servers (from
tests/harness/servers.py, which the campaign uses too), and the upstream CRD schemas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_store.tiny_model import LAYOUTS, build_tiny_checkpoint
from tests.harness.jobs import JobService, Postgres, jobs_config
from tests.harness.payloads import SMALL
from tests.harness.servers import MotoServer, start_server, stop_server


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


@pytest.fixture(scope="session")
def server_weights(tiny_checkpoints) -> Path:
    # ServerLayout expects <weights_dir>/tiny-ti2v-5b: the session's tiny checkpoints are there.
    return tiny_checkpoints["ti2v-5b"].parent


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, server_weights):
    server = start_server(tmp_path_factory.mktemp("torchserve"), server_weights)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def crds():
    """The upstream CRD schemas (scripts.manifests.schemas.find_crd_dir). Missing: the tests that
    need them skip with one line saying how to export them, except under CI (CI=true), where a
    missing schema must fail the run rather than pass it quietly."""
    from scripts.manifests import find_crd_dir, load_crds, missing_crds_help

    found = find_crd_dir()
    if found is None or not found.is_dir():
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(missing_crds_help(found))
    return load_crds(found)


@pytest.fixture(autouse=True, scope="session")
def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


# -- the job service: a live API + worker over pgserver, in front of a TorchServe of its own ------


@pytest.fixture(scope="session")
def jobs_torchserve(tmp_path_factory, server_weights):
    """A TorchServe of the job tests' own, so that their long and cancelled jobs never slow or
    skew another test's server."""
    server = start_server(tmp_path_factory.mktemp("jobs-torchserve"), server_weights)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def jobs_postgres(tmp_path_factory):
    database = Postgres(tmp_path_factory.mktemp("jobs-pg") / "data")
    database.start()
    yield database
    database.stop()


@pytest.fixture(scope="session")
def jobs_service(tmp_path_factory, jobs_torchserve, jobs_postgres):
    """The live job service (API + worker in one process) on the tiny model."""
    root = tmp_path_factory.mktemp("jobs")
    service = JobService(root, jobs_postgres, jobs_config(jobs_torchserve), env={"JOBS_MAX_ACTIVE_PER_USER": "3"})
    service.start()
    yield service
    service.stop()

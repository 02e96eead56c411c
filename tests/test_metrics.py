"""Generation metrics: what the service reports, TorchServe's declarations, and :8082/metrics."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from handler.metrics import METRICS, STAGES, GenerationMetrics
from handler.service import WanService
from handler.version import code_version
from tests.harness.payloads import SMALL

METRICS_YAML = Path(__file__).resolve().parent.parent / "config" / "metrics.yaml"
BODY = {"prompt": "a paper boat on a river", **SMALL}


class Recorded:
    """An Emit that keeps what it was given: (metric name, value, labels)."""

    def __init__(self):
        self.values: list[tuple[str, float, dict[str, str]]] = []

    def __call__(self, metric, value, labels):
        assert set(labels) == set(metric.labels), (metric.name, labels)
        self.values.append((metric.name, value, dict(labels)))

    def named(self, name: str) -> list[tuple[float, dict[str, str]]]:
        return [(value, labels) for metric, value, labels in self.values if metric == name]


def _service(base: WanService, recorded: Recorded, **config_changes) -> WanService:
    config = dataclasses.replace(base.config, **config_changes)
    return WanService(config, base.pipeline, base.storage, {"name": "wan", "version": "1.0"},
                      GenerationMetrics(recorded, "wan"))


def test_every_metric_is_declared_for_torchserve_as_emitted():
    """TorchServe drops a model metric that config/metrics.yaml does not declare."""
    declared = {}
    for kind, entries in yaml.safe_load(METRICS_YAML.read_text())["model_metrics"].items():
        for entry in entries:
            declared[entry["name"]] = (kind, entry["unit"], tuple(entry["dimensions"]))
    for metric in METRICS:
        assert declared.get(metric.name) == (metric.kind, metric.unit, metric.labels), metric.name


def test_a_generation_reports_each_stage_its_speed_and_ok(services):
    recorded = Recorded()
    service = _service(services["ti2v-5b"], recorded)
    assert recorded.named("wan_code_info") == [(1, {"ModelName": "wan", "version": code_version().package,
                                                   "commit": code_version().commit or "unknown"})]
    reply = service.handle(dict(BODY, num_inference_steps=3), "r-ok")
    assert reply.status == 200
    stages = {labels["stage"]: value for value, labels in recorded.named("wan_stage_seconds")}
    # No storage here, so no upload stage; every other stage once, as the response's timings.
    assert list(stages) == [stage for stage in STAGES if stage != "upload"]
    for stage, seconds in stages.items():
        assert seconds == pytest.approx(reply.body["timings"][f"{stage}_s"], abs=1e-4)
    [(rate, _)] = recorded.named("wan_denoise_steps_per_second")
    assert rate == pytest.approx(3 / reply.body["timings"]["denoise_s"], rel=1e-2)
    assert recorded.named("wan_requests_total") == [(1, {"ModelName": "wan", "outcome": "ok", "status": "200"})]
    assert recorded.named("wan_peak_gpu_memory_bytes") == []  # a CPU worker has no GPU peak to report


def _outcomes(recorded: Recorded) -> list[tuple[str, str]]:
    return [(labels["outcome"], labels["status"]) for _, labels in recorded.named("wan_requests_total")]


def test_refusals_deadlines_and_out_of_memory_are_counted_by_outcome(services, monkeypatch):
    recorded = Recorded()
    service = _service(services["ti2v-5b"], recorded)
    service.handle({"prompt": ""}, "r-400")
    service.handle({"prompt": "x", "image": "A" * (service.config.limits.max_image_bytes * 2)}, "r-413")
    _service(services["ti2v-5b"], recorded, deadline_s=0.0001).handle(dict(BODY, num_inference_steps=3), "r-504")

    def out_of_memory(request, on_step=None, on_frames=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(service.pipeline, "generate", out_of_memory)
    service.handle(dict(BODY), "r-507")
    assert _outcomes(recorded) == [("invalid_request", "400"), ("payload_too_large", "413"),
                                   ("deadline_exceeded", "504"), ("out_of_memory", "507")]


def test_a_failing_metrics_sink_never_fails_a_request(services, caplog):
    def broken(metric, value, labels):
        raise RuntimeError("metrics backend down")

    service = WanService(services["ti2v-5b"].config, services["ti2v-5b"].pipeline,
                         metrics=GenerationMetrics(broken, "wan"))
    with caplog.at_level(logging.ERROR):
        assert service.handle(dict(BODY), "r-1").status == 200
        assert service.handle({"prompt": ""}, "r-2").status == 400  # its outcome is emitted too
    assert sum("metrics backend down" in r.getMessage() or "emitting metric" in r.getMessage()
               for r in caplog.records) == 1  # logged once, not per value


def _scrape(server, pattern: str, timeout_s: float = 20.0) -> str:
    """/metrics once it shows ``pattern`` (the frontend reads the worker's metric lines a moment
    after the answer went out); bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"{server.layout.metrics_url}/metrics", timeout=10).text
        if re.search(pattern, text, re.MULTILINE) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_generation_metrics_on_torchserves_metrics_port(torchserve):
    assert torchserve.predict(dict(BODY, seed=1)).status_code == 200
    assert torchserve.predict({"prompt": "x", "num_frames": 8}).status_code == 400
    text = _scrape(torchserve, r'^wan_requests_total\{.*outcome="invalid_request"')
    for kind, name in (("histogram", "wan_stage_seconds"), ("counter", "wan_requests_total"),
                       ("gauge", "wan_denoise_steps_per_second"), ("gauge", "wan_peak_gpu_memory_bytes"),
                       ("gauge", "wan_code_info")):
        assert f"# TYPE {name} {kind}" in text
    for stage in ("text_encode", "denoise", "vae_decode", "video_encode"):
        assert re.search(rf'^wan_stage_seconds_count\{{ModelName="wan",stage="{stage}",.*\}} [1-9]', text, re.MULTILINE), stage
    assert re.search(r'^wan_requests_total\{ModelName="wan",outcome="ok",status="200",.*\} [1-9]', text, re.MULTILINE)
    assert re.search(r'^wan_requests_total\{ModelName="wan",outcome="invalid_request",status="400",.*\} [1-9]',
                     text, re.MULTILINE)
    assert re.search(r'^wan_denoise_steps_per_second\{ModelName="wan",.*\} [0-9.]+', text, re.MULTILINE)
    version = code_version()
    assert re.search(rf'^wan_code_info\{{ModelName="wan",version="{re.escape(version.package)}",'
                     rf'commit="{re.escape(version.commit or "unknown")}",.*\}} 1\.0', text, re.MULTILINE)

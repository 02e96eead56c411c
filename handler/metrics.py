"""Generation metrics: what the service reports about each request, independent of the server.

``WanService`` reports through a ``GenerationMetrics``; an adapter gives it an ``Emit`` function
that writes each value where its server exports metrics. The TorchServe adapter (wan_handler)
writes through TorchServe's metrics API, so they appear on :8082/metrics in Prometheus text; every
metric here is declared in config/metrics.yaml, which config.properties points to (TorchServe
drops a model metric it was not told about). Without an adapter nothing is emitted.

Why these: a generation is minutes of one GPU, so an operator needs where the time goes (stage
histograms), how fast the transformer runs (steps per second), how requests end (outcome, with the
HTTP status), how close the GPU came to its memory (peak), and which code is serving (info).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from handler.version import CodeVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "histogram", "gauge" or "counter"
    unit: str
    labels: tuple[str, ...]


# ModelName first, as TorchServe's own model metrics; TorchServe adds Hostname by itself.
STAGE_SECONDS = MetricSpec("wan_stage_seconds", "histogram", "Seconds", ("ModelName", "stage"))
STEPS_PER_SECOND = MetricSpec("wan_denoise_steps_per_second", "gauge", "Count", ("ModelName",))
REQUESTS = MetricSpec("wan_requests_total", "counter", "Count", ("ModelName", "outcome", "status"))
PEAK_GPU_MEMORY = MetricSpec("wan_peak_gpu_memory_bytes", "gauge", "Bytes", ("ModelName",))
CODE_INFO = MetricSpec("wan_code_info", "gauge", "Count", ("ModelName", "version", "commit"))
METRICS: tuple[MetricSpec, ...] = (STAGE_SECONDS, STEPS_PER_SECOND, REQUESTS, PEAK_GPU_MEMORY, CODE_INFO)

# The stages a generation's timings name (``<stage>_s``), in order.
STAGES = ("text_encode", "denoise", "vae_decode", "video_encode", "upload")
# A finished video that was meant for storage but came back inline (storage failed): not an error.
STORAGE_FALLBACK = "storage_fallback"
OK = "ok"

# emit(metric, value, labels): labels holds exactly the metric's label names.
Emit = Callable[[MetricSpec, float, Mapping[str, str]], None]


class GenerationMetrics:
    """The service's reports, turned into metric values for ``emit``. A failing ``emit`` is
    logged (once) and never fails a request."""

    def __init__(self, emit: Emit | None = None, model_name: str = ""):
        self._emit = emit
        self.model_name = model_name
        self._emit_failed = False

    def _send(self, metric: MetricSpec, value: float, **labels: str) -> None:
        if self._emit is None:
            return
        try:
            self._emit(metric, value, {"ModelName": self.model_name, **labels})
        except Exception:  # metrics must never cost a video
            if not self._emit_failed:
                log.exception("emitting metric %s failed; further failures are not logged", metric.name)
                self._emit_failed = True

    def code(self, version: CodeVersion) -> None:
        self._send(CODE_INFO, 1, version=version.package, commit=version.commit or "unknown")

    def generation(self, timings_s: Mapping[str, float], steps: int) -> None:
        """A generation's stage timings (``<stage>_s`` keys, as responses carry them)."""
        for stage in STAGES:
            if f"{stage}_s" in timings_s:
                self._send(STAGE_SECONDS, timings_s[f"{stage}_s"], stage=stage)
        denoise_s = timings_s.get("denoise_s")
        if denoise_s:
            self._send(STEPS_PER_SECOND, steps / denoise_s)

    def outcome(self, outcome: str, status: int) -> None:
        """How one request ended: ``ok``, ``storage_fallback`` or an error's type (its status)."""
        self._send(REQUESTS, 1, outcome=outcome, status=str(status))

    def peak_gpu_memory(self, peak_bytes: int) -> None:
        self._send(PEAK_GPU_MEMORY, peak_bytes)


NO_METRICS = GenerationMetrics()

"""One request end to end: validate, generate, encode, package; errors mapped in one place.

``WanService`` is everything the TorchServe handler does, minus TorchServe: tests drive it
in-process with the same bodies a client sends. Streaming is a callback (``emit``) that the
adapter wires to TorchServe's intermediate responses (or Triton's decoupled responses);
cancellation is another (``cancelled``), asked at every denoising step.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handler.config import HandlerConfig, load_handler_config
from handler.envelopes import PLAIN, Envelope
from handler.errors import Cancelled, DeadlineExceeded, InternalError, OutOfMemory, WanError
from handler.metrics import OK, STORAGE_FALLBACK, GenerationMetrics
from handler.parallel import RankGroup
from handler.pipeline import STOPS, CollectiveBroken, Generated, WanVideoPipeline, pick_device, trim_host_heap
from handler.request import GenerationRequest, OutputKind, parse_request
from handler.storage import ObjectStore, StorageConfig, StorageUnavailable
from handler.variants import detect_variant
from handler.version import code_version
from handler.video import MP4_CONTENT_TYPE, Mp4Encoder, encode_mp4

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
NDJSON_CONTENT_TYPE = "application/x-ndjson"

# emit(line) sends one NDJSON line to the client before the final reply.
Emit = Callable[[str], None]
# cancelled() says whether the client withdrew the request (Triton's request.is_cancelled).
IsCancelled = Callable[[], bool]


@dataclass
class Reply:
    """What goes back for one request: status, content type and body (dict, str or bytes)."""

    body: Any
    content_type: str = JSON_CONTENT_TYPE
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    """A finished video: its MP4 and the JSON answer describing it (the response's fields)."""

    mp4: bytes
    body: dict[str, Any]
    # Meant for storage, returned inline because storage failed (the body's warnings say so).
    storage_fallback: bool = False


def ndjson_line(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


@dataclass
class BatchItem:
    """One request of several handed over together (``WanService.handle_batch``)."""

    body: Any
    request_id: str
    emit: Emit | None = None
    envelope: Envelope = PLAIN
    cancelled: IsCancelled | None = None


@dataclass
class _Pending:
    """An admitted request on its way: its step callback streams progress and stops it when the
    client cancelled or its deadline passed."""

    request: GenerationRequest
    request_id: str
    started: float
    deadline_s: float
    emit: Emit | None  # set when the answer is streamed
    cancelled: IsCancelled | None
    lines_sent: int = 0

    def on_step(self, step: int, total: int, elapsed_s: float) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled(f"cancelled by the client after step {step} of {total}")
        since_arrival = time.perf_counter() - self.started
        if since_arrival > self.deadline_s and step < total:
            raise DeadlineExceeded(
                f"stopped after step {step} of {total}, {since_arrival:.0f} s after the request arrived: "
                f"past this model's {self.deadline_s:.0f} s deadline; ask for fewer frames, "
                "fewer steps or a smaller size"
            )
        if self.emit is not None:
            self.emit(ndjson_line({"event": "progress", "step": step, "total": total,
                                   "elapsed_s": round(elapsed_s, 3)}))
            self.lines_sent += 1


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    # torch's CPU allocator raises a plain RuntimeError when an allocation fails.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class WanService:
    def __init__(self, config: HandlerConfig, pipeline: WanVideoPipeline, storage: ObjectStore | None = None,
                 model: Mapping[str, str] | None = None, metrics: GenerationMetrics | None = None):
        self.config = config
        self.pipeline = pipeline
        self.spec = pipeline.spec
        self.defaults = pipeline.defaults
        self.storage = storage
        # Name and version of the served model (from the archive's manifest), for the records.
        self.model = dict(model or {})
        # Seconds spent starting: loading, warm-up (filled by from_model_config).
        self.startup_s: dict[str, float] = {}
        # What the adapter exports (Prometheus through TorchServe); nothing without one. Only the
        # leader of a worker of several ranks reports: the others follow its requests.
        leads = pipeline.group is None or pipeline.group.is_leader
        self.metrics = metrics if metrics is not None and leads else GenerationMetrics(model_name=self.model.get("name", ""))
        self.code_version = code_version()
        self.metrics.code(self.code_version)

    @classmethod
    def from_model_config(cls, model_yaml: Mapping[str, Any] | None, model_dir: str | Path,
                          gpu_id: int | None = None, model: Mapping[str, str] | None = None,
                          metrics: GenerationMetrics | None = None) -> WanService:
        """Start from model-config.yaml as TorchServe hands it over (storage from the environment)."""
        config = load_handler_config(model_yaml, model_dir)
        # Started by torchrun (model-config.yaml's torchrun section): one rank of several.
        # TorchServe may hand a torchrun worker no gpu_id: its deviceType says whether it has GPUs.
        on_gpu = torch.cuda.is_available() and (gpu_id is not None or config.worker.wants_gpu)
        group = RankGroup.for_worker(config.parallel, gpu_available=on_gpu)
        device = group.device if group is not None else pick_device(gpu_id)
        if device.type == "cpu":
            processes = config.worker.max_workers * (group.layout.world_size if group else 1)
            # TorchServe leaves intra-op threads at the core count in every worker; workers
            # then fight over the same cores (7x slower seen with 2 workers on 2 cores).
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // processes))
        started = time.perf_counter()
        spec = detect_variant(config.model_path)
        pipeline = WanVideoPipeline.load(config.model_path, spec, config.defaults_for(spec.defaults), device,
                                         config.speed, group, fast=config.fast)
        load_s = time.perf_counter() - started
        log.info("loaded %s from %s on %s in %.1f s", pipeline.spec.name, config.model_path, device, load_s)
        storage_config = StorageConfig.from_env()
        storage = ObjectStore(storage_config) if storage_config is not None else None
        if storage is not None:
            storage.check_at_start()
        service = cls(config, pipeline, storage, model, metrics)
        service.startup_s["load_s"] = load_s
        if device.type == "cuda" and config.speed.warmup:
            service.startup_s["warmup_s"] = pipeline.warm_up(service.defaults)
            log.info("warm-up (compilation, autotuning) took %.1f s", service.startup_s["warmup_s"])
        return service

    @property
    def storage_configured(self) -> bool:
        return self.storage is not None and self.storage.uploads_enabled

    def _fetch_s3(self, uri: str, field: str) -> bytes:
        return self.storage.fetch_image(uri, field, self.config.limits.max_image_bytes)

    def parse(self, body: Any, envelope: Envelope = PLAIN) -> GenerationRequest:
        reads_s3 = self.storage is not None and bool(self.storage.config.input_buckets)
        group = self.pipeline.group
        request = parse_request(body, self.spec, self.defaults, self.config.limits, self.storage_configured,
                                fetch_s3=self._fetch_s3 if reads_s3 else None,
                                # The size chosen for an image must split over the sequence ranks.
                                patches_divisor=group.layout.ulysses_degree if group else 1,
                                rules=self.config.rules)
        envelope.check_output(request)
        self.pipeline.check_prompt_length(request.prompt, "prompt")
        self.pipeline.check_prompt_length(request.negative_prompt, "negative_prompt")
        self.pipeline.check_split(request)
        return request

    def handle(self, body: Any, request_id: str, emit: Emit | None = None, envelope: Envelope = PLAIN,
               cancelled: IsCancelled | None = None) -> Reply:
        """Answer one request. Never raises: every failure becomes an error reply.

        ``cancelled`` is asked before the generation and after every denoising step, streamed or
        not: once it says yes the generation stops there and the reply is a ``Cancelled`` (499).

        On a worker of several ranks, every rank is called with the same request; the leader
        decides and answers, the others follow (``_follow``)."""
        group = self.pipeline.group
        if group is not None and not group.is_leader:
            reply = self._follow(request_id)
        else:
            reply = self._lead(body, request_id, emit, envelope, cancelled)
        # glibc keeps the pages a request freed (frames, decode buffers, the encoder's) in its
        # arenas: without this RSS grew by ~0.5 MiB per small request (no Python object left
        # behind) and held a big request's ~300 MiB until a later one reused it. Cost: ~5 ms
        # after a small request, ~30 ms after a big one (tests/harness/heap_trim.py, RELIABILITY.md).
        trim_host_heap()
        return reply

    def _lead(self, body: Any, request_id: str, emit: Emit | None, envelope: Envelope,
              cancelled: IsCancelled | None = None) -> Reply:
        """The answer to one request: on one process, or as the leader of several ranks."""
        started = time.perf_counter()
        pending = None
        try:
            pending = self._admit(body, request_id, emit, envelope, cancelled, started)
            return self._success(pending, self._generate(pending.request, request_id, pending.on_step, started))
        except CollectiveBroken as exc:
            # The other ranks may wait forever for this one: the worker must restart. No reply:
            # TorchServe may already have answered "Worker died." (another rank's connection
            # closed), and a late reply would be read as the answer to the next request.
            self.pipeline.group.give_up(f"request {request_id} failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - the one place where failures become responses
            return self._failure(exc, request_id, pending)

    def _admit(self, body: Any, request_id: str, emit: Emit | None, envelope: Envelope,
               cancelled: IsCancelled | None, started: float) -> _Pending:
        """Parse one request (raises its 4xx) and make its step callback."""
        group = self.pipeline.group
        request = None
        try:
            request = self.parse(body, envelope)
        finally:
            if group is not None:
                group.share_decision(request)  # None after a refusal: nothing to generate
        if cancelled is not None and cancelled():
            raise Cancelled("cancelled by the client before the generation started")
        return _Pending(request, request_id, started, self.config.deadline_s,
                        emit if request.stream else None, cancelled)

    def _success(self, pending: _Pending, result: GenerationResult) -> Reply:
        request = pending.request
        self.metrics.outcome(STORAGE_FALLBACK if result.storage_fallback else OK, 200)
        if request.output is OutputKind.MP4:
            return Reply(body=result.mp4, content_type=MP4_CONTENT_TYPE,
                         headers={"x-wan-seed": str(request.seed), "x-wan-request-id": pending.request_id})
        if pending.emit is not None:
            return Reply(body=ndjson_line({"event": "result", **result.body}), content_type=NDJSON_CONTENT_TYPE)
        return Reply(body=result.body)

    def _failure(self, exc: Exception, request_id: str, pending: _Pending | None) -> Reply:
        error = self._as_wan_error(exc, request_id)
        if isinstance(error, OutOfMemory):
            # Out of the except block: the traceback, and the tensors its frames held, are gone.
            self.pipeline.release_memory()
        return self.error_reply(error, streamed=pending is not None and pending.lines_sent > 0)

    def handle_batch(self, items: list[BatchItem]) -> list[Reply]:
        """Answer several requests that arrived together (TorchServe's batchSize, Triton's dynamic
        batching): those the pipeline can denoise together (``batch_key``: same size, frames,
        steps and guidance; their own prompts and seeds) run as one batch, the others alone. Each
        keeps its own progress, cancellation, errors and result; a refused request never joins
        a batch. Never raises."""
        if self.pipeline.group is not None or len(items) < 2:
            return [self.handle(item.body, item.request_id, item.emit, item.envelope, item.cancelled)
                    for item in items]
        started = time.perf_counter()
        replies: list[Reply | None] = [None] * len(items)
        batches: dict[Any, list[tuple[int, _Pending]]] = {}
        for index, item in enumerate(items):
            try:
                pending = self._admit(item.body, item.request_id, item.emit, item.envelope, item.cancelled, started)
            except Exception as exc:  # noqa: BLE001 - refused alone; its batch mates go on
                replies[index] = self._failure(exc, item.request_id, None)
                continue
            key = self.pipeline.batch_key(pending.request)
            batches.setdefault(key if key is not None else ("alone", index), []).append((index, pending))
        for members in batches.values():
            for index, reply in zip([i for i, _ in members], self._run_batch([p for _, p in members]), strict=True):
                replies[index] = reply
        trim_host_heap()
        return replies  # type: ignore[return-value] - every slot is filled above

    def _run_batch(self, members: list[_Pending]) -> list[Reply]:
        if len(members) == 1:
            [pending] = members
            try:
                return [self._success(pending, self._generate(pending.request, pending.request_id, pending.on_step,
                                                              pending.started))]
            except Exception as exc:  # noqa: BLE001 - the one place where failures become responses
                return [self._failure(exc, pending.request_id, pending)]
        log.info("denoising %d requests in one batch: %s", len(members), ", ".join(p.request_id for p in members))
        encoders = [Mp4Encoder(p.request.fps, self.config.video) for p in members]
        try:
            try:
                outcomes = self.pipeline.generate_batch([p.request for p in members], [p.on_step for p in members],
                                                        [encoder.add for encoder in encoders])
            except Exception as exc:  # noqa: BLE001 - the batch as a whole failed (out of memory): each is told
                return [self._failure(exc, p.request_id, p) for p in members]
            replies = []
            for pending, encoder, outcome in zip(members, encoders, outcomes, strict=True):
                try:
                    if isinstance(outcome, Exception):
                        raise outcome
                    replies.append(self._success(pending, self._package(
                        pending.request, pending.request_id, outcome, encoder, pending.started)))
                except Exception as exc:  # noqa: BLE001 - this request's failure is its own
                    replies.append(self._failure(exc, pending.request_id, pending))
            return replies
        finally:
            for encoder in encoders:
                encoder.abort()

    def error_reply(self, error: WanError, streamed: bool = False) -> Reply:
        """The one place an error becomes what the client gets (and is counted). ``streamed``:
        progress lines already went out with status 200, so the error (or the cancellation) is
        the last line."""
        self.metrics.outcome(error.error_type, error.http_status)
        if streamed:
            event = "cancelled" if isinstance(error, Cancelled) else "error"
            return Reply(body=ndjson_line({"event": event, **error.to_body()}), content_type=NDJSON_CONTENT_TYPE)
        return Reply(body=error.to_body(), status=error.http_status)

    def _follow(self, request_id: str) -> Reply:
        """A rank other than the leader: generate what the leader decided. TorchServe drops
        this rank's reply; the leader's goes to the client."""
        request = self.pipeline.group.share_decision()
        if request is None:
            return Reply(body={"rank": self.pipeline.group.layout.rank, "generated": False})
        try:
            self.pipeline.generate(request)
        except STOPS:
            pass  # stopped at the same step as the leader, which answers (504 or 499)
        except CollectiveBroken as exc:
            self.pipeline.group.give_up(f"request {request_id} failed on this rank: {exc}")
        return Reply(body={"rank": self.pipeline.group.layout.rank, "generated": True})

    def _as_wan_error(self, exc: Exception, request_id: str) -> WanError:
        if isinstance(exc, WanError):
            if isinstance(exc, Cancelled):
                log.info("request %s: %s", request_id, exc.message)  # the client's choice, not a failure
            elif exc.http_status >= 500:
                log.error("request %s failed: %s", request_id, exc.message)
            return exc
        if _is_out_of_memory(exc):
            log.error("request %s ran out of memory: %s", request_id, exc)
            return OutOfMemory(f"out of memory generating this video ({exc.__class__.__name__}); "
                               "try a smaller size or fewer frames")
        log.exception("request %s failed with an unexpected error", request_id)
        return InternalError(f"internal error; see the server log for request {request_id}")

    def _fast_echo(self, request: GenerationRequest) -> dict[str, Any]:
        """What made the video beyond its parameters: approximations (always listed, [] when
        none), the profile and the adapters (when any; fused ones too, marked)."""
        echo: dict[str, Any] = {"lossy": self.pipeline.lossy(request)}
        parameters = request.parameters()
        for name in ("profile", "lora"):
            if name in parameters:
                echo[name] = parameters[name]
        if self.config.lora.fuse:
            echo["lora_fused"] = [choice.to_json() for choice in self.config.lora.fuse]
        return echo

    def _generate(self, request: GenerationRequest, request_id: str, on_step, started: float) -> GenerationResult:
        # The encoder takes the frames while the VAE decodes the rest (see pipeline._FrameStreamer).
        encoder = Mp4Encoder(request.fps, self.config.video)
        on_gpu = self.pipeline.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.pipeline.device)
        try:
            generated = self.pipeline.generate(request, on_step, on_frames=encoder.add)
            return self._package(request, request_id, generated, encoder, started)
        finally:
            encoder.abort()  # a failed generation: stop the encoder's thread

    def _package(self, request: GenerationRequest, request_id: str, generated: Generated, encoder: Mp4Encoder,
                 started: float) -> GenerationResult:
        """A generated video's MP4 (``encoder`` had its frames if they streamed), stored or
        inline, and the answer's fields."""
        on_gpu = self.pipeline.device.type == "cuda"
        mark = time.perf_counter()
        if generated.streamed:
            mp4 = encoder.finish()
        else:
            encoder.abort()
            mp4 = encode_mp4(generated.frames, request.fps, self.config.video)
        # What the encoder still needed after the decode (all of it when nothing was streamed).
        timings = dict(generated.timings_s, video_encode_s=time.perf_counter() - mark)
        if on_gpu:
            self.metrics.peak_gpu_memory(torch.cuda.max_memory_allocated(self.pipeline.device))
        warnings: list[str] = []
        video: dict[str, Any] = {"content_type": MP4_CONTENT_TYPE}
        inline = request.output is OutputKind.INLINE
        if request.output is OutputKind.URL:
            mark = time.perf_counter()
            record = {"parameters": request.parameters(), "variant": self.spec.name, "model": self.model,
                      **self._fast_echo(request),
                      "code_version": self.code_version.to_json(),
                      "timings": {name: round(value, 4) for name, value in timings.items()}}
            try:
                stored = self.storage.store_video(mp4, request_id, record)
                video.update(url=stored.url, s3_uri=stored.s3_uri)
            except StorageUnavailable as exc:
                # Never lose a finished video to a storage problem: hand it back inline.
                warnings.append(f"{exc}; the video is returned inline instead of as a URL")
                inline = True
            timings["upload_s"] = time.perf_counter() - mark
        if inline:
            video["base64"] = base64.b64encode(mp4).decode("ascii")
        timings["total_s"] = time.perf_counter() - started
        self.metrics.generation(timings, request.num_inference_steps)
        body = {
            "request_id": request_id,
            "video": video,
            "width": request.width,
            "height": request.height,
            "num_frames": request.num_frames,
            "fps": request.fps,
            "duration_s": round(request.duration_s, 4),
            "seed": request.seed,
            "variant": self.spec.name,
            "timings": {name: round(value, 4) for name, value in timings.items()},
            "warnings": warnings,
            "code_version": self.code_version.to_json(),
            **self._fast_echo(request),
        }
        return GenerationResult(mp4=mp4, body=body, storage_fallback=request.output is OutputKind.URL and inline)

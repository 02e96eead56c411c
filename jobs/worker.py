"""The worker: takes jobs from the queue, runs each on an inference endpoint, keeps the result.

The queue is Procrastinate's, in the same PostgreSQL as the job rows: one queue per model
(``videos.<model>``) worked with a concurrency equal to the model's total endpoint capacity, and
a ``webhooks`` queue. Procrastinate gives retries with backoff, abort of running jobs, worker
heartbeats; a loop here takes up the jobs of a worker whose heartbeat stopped (kill -9).

Endpoint capacity holds across worker replicas: a job runs only while it holds one of its
endpoint's slots, a PostgreSQL advisory lock (endpoint, slot number) on a connection of its own.
A worker that dies loses its connection and so its slots, at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
import zlib
from typing import Any

import httpx
import procrastinate
import psycopg
import psycopg_pool
from procrastinate import JobContext, RetryStrategy

from jobs import dataplane, webhooks
from jobs.config import Endpoint, ModelEntry, Settings
from jobs.metrics import JobMetrics
from jobs.results import ResultStore, decode_inline, poster_jpeg
from jobs.store import ACTIVE, GENERATE_TASK, WEBHOOK_TASK, Store

log = logging.getLogger(__name__)

WEBHOOK_QUEUE = "webhooks"
SLOT_POLL_S = 0.5
# A worker writes its heartbeat (procrastinate's) at most this often, and the stalled-job check
# runs at most this often; both are kept well under JOBS_STALLED_AFTER_S (heartbeat_interval,
# stalled_check_interval). Just before a write a live worker's heartbeat is a whole interval old
# (older on a busy database): with the interval equal to the threshold (5 s and 5 s in the tests)
# the check took up a live worker's running job again, which then ran twice, and procrastinate
# refused the first run's end ("not in doing status").
HEARTBEAT_S = 5.0
STALLED_CHECK_S = 10.0
# How long a finished job's record is retried against a database that went away (a restart).
DB_RETRY_S = 120.0
# Poster of a video the data plane stored in object storage: read at most this much of it.
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024


def queue_name(model: str) -> str:
    return f"videos.{model}"


class RetryLater(Exception):
    """This attempt could not run (queue full, connection lost); Procrastinate schedules the
    next one with backoff."""


def make_queue_app(database_url: str) -> procrastinate.App:
    """The Procrastinate app, for deferring (API) and working (worker)."""
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))


class Queue:
    """How the API puts jobs and webhooks on the queue and takes them off, always inside the
    caller's transaction (``conn``)."""

    def __init__(self, app: procrastinate.App):
        self.app = app

    async def defer_generate(self, conn, video_id: str, model: str) -> int:
        return await self.app.configure_task(GENERATE_TASK, queue=queue_name(model), connection=conn) \
            .defer_async(video_id=video_id)

    async def defer_webhook(self, conn, video_id: str, status: str) -> int:
        # The event's id and time are fixed now: every retry carries the same webhook-id.
        event = webhooks.event_body(webhooks.EVENT_TYPES[status], video_id, "evt_" + secrets.token_hex(12))
        return await self.app.configure_task(WEBHOOK_TASK, queue=WEBHOOK_QUEUE, connection=conn) \
            .defer_async(video_id=video_id, event=event)

    async def cancel(self, conn, queue_job_id: int) -> None:
        # A queued entry is cancelled; a running one is asked to abort (the worker hears it).
        await self.app.job_manager.cancel_job_by_id_async(queue_job_id, abort=True, connection=conn)


def _slot_key(model: str, endpoint: str) -> int:
    return zlib.crc32(f"{model}/{endpoint}".encode()) & 0x7FFFFFFF


class EndpointSlots:
    """Endpoint choice: the first endpoint by priority with a free slot and not cooling down."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool):
        self.pool = pool
        self.cooling_until: dict[tuple[str, str], float] = {}

    def cool_down(self, model: ModelEntry, endpoint: Endpoint) -> None:
        self.cooling_until[(model.name, endpoint.name)] = time.monotonic() + endpoint.cooldown_s

    async def run_holding_slot(self, model: ModelEntry, still_wanted, work):
        """Wait for a slot, then ``await work(endpoint)`` while holding it. Returns None without
        running when the job stops being wanted while it waits.

        A slot is a session-level advisory lock, so it lives exactly as long as the connection
        holding it: that connection is our own, never the pool's, and is closed whatever happens.
        (A pooled one went back to the pool still holding a lock when the job was cancelled
        between taking the lock and reading its answer: the slot was then lost for good and every
        later job of the model waited forever.)"""
        try:
            conn = await psycopg.AsyncConnection.connect(self.pool.conninfo, **self.pool.kwargs)
        except psycopg.OperationalError as e:
            raise RetryLater(f"database unavailable: {e}") from None
        try:
            while True:
                for endpoint in model.endpoints:
                    if time.monotonic() < self.cooling_until.get((model.name, endpoint.name), 0):
                        continue
                    key = _slot_key(model.name, endpoint.name)
                    for slot in range(endpoint.capacity):
                        got = (await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok",
                                                         (key, slot))).fetchone())["ok"]
                        if got:
                            return await work(endpoint)  # the slot is released when conn closes
                if not await still_wanted():
                    return None
                await asyncio.sleep(SLOT_POLL_S)
        finally:
            await conn.close()


async def _with_db_retry(what: str, call):
    """Run a database write that must not be lost, through a database restart."""
    deadline = time.monotonic() + DB_RETRY_S
    delay = 0.5
    while True:
        try:
            return await call()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Runner:
    """Runs one job on the data plane and records what happened."""

    def __init__(self, settings: Settings, store: Store, queue: Queue, slots: EndpointSlots,
                 metrics: JobMetrics, client: httpx.AsyncClient):
        self.settings = settings
        self.store = store
        self.queue = queue
        self.slots = slots
        self.metrics = metrics
        self.client = client
        self.results = ResultStore(settings.results_path)
        self.name = f"{socket.gethostname()}-{os.getpid()}"

    async def generate(self, video_id: str) -> None:
        row, image = await self.store.load_for_work(video_id)
        if row is None or row["status"] not in ACTIVE:
            return  # deleted or cancelled before it reached a worker: nothing to do
        model = self.settings.model(row["model"])
        if model is None:
            await self.store.fail(video_id, {"code": "model_not_served", "type": "server_error", "param": None,
                                             "message": f"model {row['model']} is no longer configured"},
                                  self.queue.defer_webhook)
            return

        async def still_wanted() -> bool:
            current, _ = await self.store.load_for_work(video_id)
            return current is not None and current["status"] in ACTIVE

        request = dict(row["request"], **({"image": image} if image else {}))
        await self.slots.run_holding_slot(model, still_wanted,
                                          lambda endpoint: self._attempt(video_id, model, endpoint, request))

    async def _attempt(self, video_id: str, model: ModelEntry, endpoint: Endpoint, request: dict[str, Any]) -> None:
        row = await self.store.start_attempt(video_id, endpoint.name, self.name)
        if row is None:
            return
        if len(row["attempts"]) == 1:
            self.metrics.wait_seconds.labels(model.name).observe(time.time() - row["created_at"].timestamp())
        started = time.monotonic()

        async def on_progress(step: int, total: int, elapsed_s: float) -> bool:
            try:
                return await self.store.record_step(video_id, model.name, step, total, elapsed_s)
            except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
                # A database restart must not cost the GPU's work: keep generating, record later.
                log.warning("job %s: step %d not recorded (%s)", video_id, step, e)
                return True

        try:
            outcome = await dataplane.run(endpoint, request, on_progress, self.client, job_id=video_id)
        except dataplane.Stopped:
            await self.store.end_attempt(video_id, "cancelled", "the job was cancelled while it ran")
            return
        except dataplane.Refused as refused:
            error = refused.error
            row = await _with_db_retry("fail", lambda: self.store.fail(video_id, error, self.queue.defer_webhook))
            if row is not None:
                self.metrics.finished.labels(model.name, "failed").inc()
            return
        except dataplane.Retryable as retryable:
            reason = str(retryable)
            self.slots.cool_down(model, endpoint)
            attempts = await _with_db_retry("end attempt", lambda: self.store.end_attempt(video_id, "retry", reason))
            if attempts >= self.settings.max_attempts:
                error = {"code": "data_plane_unavailable", "type": "server_error", "param": None,
                         "message": f"gave up after {attempts} attempts; the last: {reason}"}
                await _with_db_retry("fail", lambda: self.store.fail(video_id, error, self.queue.defer_webhook,
                                                                     outcome="retry"))
                self.metrics.finished.labels(model.name, "failed").inc()
                return
            self.metrics.retries.labels(model.name, endpoint.name).inc()
            raise RetryLater(reason) from None
        await self._keep(video_id, model, endpoint, outcome.result)
        self.metrics.run_seconds.labels(model.name, endpoint.name).observe(time.monotonic() - started)

    async def _keep(self, video_id: str, model: ModelEntry, endpoint: Endpoint, result: dict[str, Any]) -> None:
        video = result.get("video") or {}
        mp4 = decode_inline(result)
        kept: dict[str, Any] = {"content_type": video.get("content_type", "video/mp4"),
                                "timings": result.get("timings"), "warnings": result.get("warnings") or [],
                                "request_id": result.get("request_id"), "variant": result.get("variant"),
                                "endpoint": endpoint.name,
                                # What made this video beyond its parameters: the approximations it
                                # took (never silently), the adapters fused at load, the code.
                                **{k: result[k] for k in ("lossy", "lora_fused", "code_version") if k in result}}
        if mp4 is not None:
            self.results.save(video_id, mp4)
            kept["bytes"] = len(mp4)
        elif video.get("s3_uri"):
            kept["s3_uri"] = video["s3_uri"]
            mp4 = await self._download(video.get("url"))
        else:
            error = {"code": "no_video", "type": "server_error", "param": None,
                     "message": f"{endpoint.name} answered without a video"}
            await _with_db_retry("fail", lambda: self.store.fail(video_id, error, self.queue.defer_webhook))
            return
        poster = None
        try:
            poster = poster_jpeg(mp4) if mp4 else None
        except Exception as e:  # noqa: BLE001 - a poster is a nicety; never lose the video for it
            log.warning("job %s: no poster (%s)", video_id, e)
        effective = {k: result[k] for k in ("width", "height", "num_frames", "fps", "seed") if k in result}
        row = await _with_db_retry("complete", lambda: self.store.complete(
            video_id, kept, effective, poster, self.queue.defer_webhook))
        if row is None:
            self.results.remove(video_id)  # cancelled or deleted while it ran
        else:
            self.metrics.finished.labels(model.name, "completed").inc()

    async def _download(self, url: str | None) -> bytes | None:
        if not url:
            return None
        try:
            async with self.client.stream("GET", url, timeout=60) as response:
                response.raise_for_status()
                data = b""
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_DOWNLOAD_BYTES:
                        return None
                return data
        except httpx.HTTPError as e:
            log.warning("could not read the stored video for its poster: %s", e)
            return None

    async def webhook(self, video_id: str, event: dict) -> None:
        target = await self.store.webhook_target(video_id)
        if target is None:
            return  # deleted since
        url, secret = target
        try:
            await webhooks.deliver(url, secret, event, self.settings.webhook_allowed_hosts)
        except webhooks.WebhookRefused as e:
            self.metrics.webhook_failures.labels("refused").inc()
            log.warning("webhook for %s refused: %s", video_id, e)
            return  # not retried: the target is not allowed
        except Exception as e:
            self.metrics.webhook_failures.labels("delivery").inc()
            log.warning("webhook for %s failed (retried): %s", video_id, e)
            raise
        self.metrics.webhooks_delivered.inc()


def register_tasks(app: procrastinate.App) -> dict[str, Runner]:
    """The two tasks, registered once per app. The returned dict holds the Runner that they
    call, set by ``work`` once its pools are open (and again after a restart)."""
    if GENERATE_TASK in app.tasks:
        return app.tasks[GENERATE_TASK].runner_ref
    runner_ref: dict[str, Runner] = {}

    @app.task(name=GENERATE_TASK, pass_context=True,
              retry=RetryStrategy(retry_exceptions={RetryLater}, exponential_wait=2))
    async def generate(context: JobContext, video_id: str) -> None:
        await runner_ref["runner"].generate(video_id)

    @app.task(name=WEBHOOK_TASK, pass_context=True, retry=RetryStrategy(max_attempts=8, exponential_wait=2))
    async def webhook(context: JobContext, video_id: str, event: dict) -> None:
        await runner_ref["runner"].webhook(video_id, event)

    generate.runner_ref = runner_ref
    return runner_ref


def heartbeat_interval(settings: Settings) -> float:
    return min(HEARTBEAT_S, settings.stalled_after_s / 4)


def stalled_check_interval(settings: Settings) -> float:
    return min(STALLED_CHECK_S, settings.stalled_after_s / 2)


async def recover_stalled(app: procrastinate.App, settings: Settings) -> None:
    """Take up again the jobs of workers whose heartbeat stopped (killed, lost their node)."""
    while True:
        try:
            for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=settings.stalled_after_s):
                log.warning("taking up job %s again: its worker stopped", job.id)
                await app.job_manager.retry_job(job)
        except Exception as e:  # noqa: BLE001 - a database restart; try again at the next round
            log.warning("stalled-job check failed: %s", e)
        await asyncio.sleep(stalled_check_interval(settings))


async def work(settings: Settings, database_url: str, app: procrastinate.App, store: Store,
               metrics: JobMetrics) -> None:
    """Run the workers of every model and of webhooks until cancelled."""
    runner_ref = register_tasks(app)
    async with httpx.AsyncClient(trust_env=False) as client:
        runner_ref["runner"] = Runner(settings, store, Queue(app), EndpointSlots(store.pool), metrics, client)
        workers = [
            app.run_worker_async(queues=[queue_name(m.name)], concurrency=m.capacity, name=f"videos-{m.name}",
                                 install_signal_handlers=False, update_heartbeat_interval=heartbeat_interval(settings),
                                 stalled_worker_timeout=settings.stalled_after_s, abort_job_polling_interval=1.0,
                                 fetch_job_polling_interval=2.0)
            for m in settings.models
        ]
        workers.append(app.run_worker_async(queues=[WEBHOOK_QUEUE], concurrency=4, name="webhooks",
                                            install_signal_handlers=False, update_heartbeat_interval=heartbeat_interval(settings),
                                            stalled_worker_timeout=settings.stalled_after_s))
        workers.append(recover_stalled(app, settings))
        tasks = [asyncio.ensure_future(w) for w in workers]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a worker that stopped on its own: raise, the caller restarts
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

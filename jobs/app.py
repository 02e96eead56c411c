"""The Jobs API (OpenAI Videos API compatible where they overlap) and the page, as one ASGI app.

``create_app(settings)`` builds it; ``python -m jobs serve`` runs it with uvicorn. With
``with_worker=True`` the worker runs in the same process (local use); in Kubernetes the API and
the worker are separate Deployments over the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import db, rules
from jobs.config import Settings
from jobs.errors import ApiError, Conflict, InvalidRequest, NotFound, PayloadTooLarge, Unauthorized, Unavailable
from jobs.events import RESYNC, EventHub, sse
from jobs.metrics import JobMetrics
from jobs.results import ResultStore, presign
from jobs.store import FINISHED, Store, User, open_pool, video_object
from jobs.worker import Queue, make_queue_app, work

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
# A create body: a 16 MiB image as base64 (~21.4 MiB) plus the rest, as the data plane bounds it.
MAX_CREATE_BYTES = 24 * 1024 * 1024
MAX_LIST_LIMIT = 100
SSE_KEEPALIVE_S = 15.0


class JobService:
    """What the routes share: settings, the store, the queue, events, metrics."""

    def __init__(self, settings: Settings, database_url: str, metrics: JobMetrics):
        self.settings = settings
        self.database_url = database_url
        self.metrics = metrics
        self.results = ResultStore(settings.results_path)
        self.store: Store | None = None
        self.queue: Queue | None = None
        self.hub = EventHub(database_url)

    async def user(self, request: Request, allow_query_key: bool = False) -> User:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        if key is None and allow_query_key:
            # EventSource and <video src> cannot send headers: the page passes the key here.
            key = request.query_params.get("key")
        if not key:
            raise Unauthorized("missing API key: send the header Authorization: Bearer YOUR_KEY")
        user = await self.store.authenticate(key)
        if user is None:
            raise Unauthorized("unknown API key (keys come from `python -m jobs keys create --user NAME`)")
        return user


async def _create_body(request: Request) -> tuple[dict[str, Any], bool]:
    """The create fields, typed. Returns (fields, came_as_form)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_CREATE_BYTES:
        raise PayloadTooLarge(f"request body is {length} bytes, over the {MAX_CREATE_BYTES} byte limit")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=MAX_CREATE_BYTES)
        fields: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        for name, value in form.multi_items():
            if name in fields:
                raise InvalidRequest(f"field {name} is given twice", name)
            if isinstance(value, UploadFile):
                if name not in ("input_reference", "image"):
                    raise InvalidRequest(f"{name} cannot be a file (only input_reference is)", name)
                data = await value.read()
                fields[name] = rules.image_from_upload(data)
            elif name.startswith("metadata[") and name.endswith("]"):
                metadata[name[9:-1]] = value
            elif name == "metadata":
                try:
                    fields["metadata"] = json.loads(value)
                except ValueError:
                    raise InvalidRequest("metadata must be a JSON object, or sent as metadata[key]=value fields",
                                         "metadata") from None
            else:
                fields[name] = rules.from_form_text(name, value)
        if metadata:
            if "metadata" in fields:
                raise InvalidRequest("give metadata either as JSON or as metadata[key] fields", "metadata")
            fields["metadata"] = metadata
        return fields, True
    raw = await request.body()
    if len(raw) > MAX_CREATE_BYTES:
        raise PayloadTooLarge(f"request body is over the {MAX_CREATE_BYTES} byte limit")
    if not raw.strip():
        raise InvalidRequest("request body is empty; send a JSON object with at least a prompt")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("request body is not valid JSON (send Content-Type: application/json, or "
                             "multipart/form-data)") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body, False


def create_app(settings: Settings, database_url: str, with_worker: bool = False,
               metrics: JobMetrics | None = None) -> FastAPI:
    metrics = metrics or JobMetrics()
    service = JobService(settings, database_url, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await open_pool(database_url, max_size=8 + (2 * settings.worker_concurrency if with_worker else 0))
        service.store = Store(pool)
        queue_app = make_queue_app(database_url)
        background = [asyncio.ensure_future(service.hub.run())]
        async with queue_app.open_async():
            service.queue = Queue(queue_app)
            if with_worker:
                background.append(asyncio.ensure_future(_supervised_worker(settings, database_url, queue_app,
                                                                           service.store, metrics)))
            try:
                yield
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
        await pool.close()

    app = FastAPI(title="Wan2.2 video jobs", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) if first else None
        return await api_error(request, InvalidRequest(f"{param}: {first.get('msg', 'invalid')}", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFound(f"no such endpoint: {request.method} {request.url.path}") if exc.status_code == 404 \
            else ApiError(str(exc.detail))
        error.status = exc.status_code
        return await api_error(request, error)

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg_pool.PoolTimeout)
    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return await api_error(request, Unavailable("the job database is unavailable; retry in a few seconds "
                                                    "(nothing was changed)"))

    # --- Jobs API ---

    @app.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        user = await service.user(request)
        fields, _ = await _create_body(request)
        job = rules.validate_job(fields, settings)
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= 255:
            raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", "Idempotency-Key")
        row, created = await service.store.create_job(user, job, key, settings.max_active_per_user,
                                                      settings.idempotency_ttl_s, service.queue.defer_generate)
        if created:
            metrics.submitted.labels(job.model.name).inc()
        return JSONResponse(await service.store.show(row))

    @app.get("/v1/videos")
    async def list_videos(request: Request, limit: int = 20, after: str | None = None,
                          order: str = "desc") -> dict:
        user = await service.user(request)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}", "limit")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc", "order")
        rows, has_more = await service.store.list(user, limit, after, order)
        data = [await service.store.show(row) for row in rows]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str, request: Request) -> dict:
        user = await service.user(request)
        return await service.store.show(await service.store.get(video_id, user))

    @app.post("/v1/videos/{video_id}/cancel")
    async def cancel_video(video_id: str, request: Request) -> dict:
        user = await service.user(request)
        row = await service.store.cancel(video_id, user, service.queue.cancel, service.queue.defer_webhook)
        metrics.finished.labels(row["model"], "cancelled").inc()
        return video_object(row)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str, request: Request) -> dict:
        user = await service.user(request)
        row = await service.store.delete(video_id, user, service.queue.cancel)
        service.results.remove(video_id)
        return {"id": row["id"], "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
        user = await service.user(request, allow_query_key=True)
        row = await service.store.get(video_id, user)
        if variant not in ("video", "thumbnail"):
            raise InvalidRequest(f"variant must be video or thumbnail, got {variant[:40]!r}", "variant")
        if row["status"] != "completed":
            raise Conflict(f"video {video_id} is {row['status']}: its content exists once it is completed",
                           "video_id", "video_not_ready")
        if variant == "thumbnail":
            poster = await service.store.poster(video_id)
            if poster is None:
                raise NotFound(f"video {video_id} has no poster frame", "variant")
            return Response(poster, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})
        s3_uri = (row["result"] or {}).get("s3_uri")
        if s3_uri:
            return RedirectResponse(presign(s3_uri), status_code=307)
        path = service.results.path(video_id)
        if not path.exists():
            raise NotFound(f"the stored video of {video_id} is gone from this server's results folder", "video_id")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4",
                            content_disposition_type="inline")

    @app.get("/v1/videos/{video_id}/events")
    async def video_events(video_id: str, request: Request) -> StreamingResponse:
        user = await service.user(request, allow_query_key=True)
        row = await service.store.get(video_id, user)
        return StreamingResponse(_event_stream(service, row, user), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/internal/v1/videos/{video_id}/wanted", include_in_schema=False)
    async def still_wanted(video_id: str, request: Request) -> dict:
        """For the data plane, not for users: is this running job still wanted? TorchServe cannot
        cancel a request, so our handler asks here at each denoising step (the worker names the
        job in the X-Wan-Job-Id header) and stops when the answer is no. Its own credential: a
        data-plane pod never holds a user's key, and users cannot reach this route with theirs."""
        token = settings.data_plane_token
        header = request.headers.get("authorization", "")
        if token is None:
            raise NotFound("no data-plane token is configured (JOBS_DATA_PLANE_TOKEN)")
        if not hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("this route takes the data-plane token (JOBS_DATA_PLANE_TOKEN)")
        return {"id": video_id, "wanted": await service.store.is_active(video_id)}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        await service.user(request)
        return {"object": "list", "data": [model.describe() for model in settings.models]}

    # --- operating it ---

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            # Short: a probe must get its answer (503) before its own timeout when the database is gone.
            async with service.store.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
                applied = {r["version"] for r in await (await conn.execute(
                    "SELECT version FROM jobs_schema_migrations")).fetchall()}
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            return JSONResponse({"status": "unavailable", "reason": f"database: {e.__class__.__name__}"}, 503)
        missing = [v for v, _, _ in db.MIGRATIONS if v not in applied]
        if missing:
            return JSONResponse({"status": "unavailable",
                                 "reason": f"migrations {missing} not applied: run python -m jobs migrate"}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        try:
            metrics.set_counts(await service.store.counts(), [m.name for m in settings.models])
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            log.warning("metrics: job counts unavailable (%s)", e)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- the page ---

    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                                headers={"Cache-Control": "no-cache"})

        @app.get("/favicon.ico", include_in_schema=False)
        async def favicon() -> RedirectResponse:
            return RedirectResponse("/static/favicon.svg", status_code=308)

    return app


def _progress_data(row: dict[str, Any]) -> dict[str, Any]:
    step, total, elapsed = row["step"] or 0, row["total_steps"], row["elapsed_s"]
    eta = round(elapsed / step * (total - step), 3) if step and total and elapsed is not None else None
    return {"id": row["id"], "status": row["status"], "step": step, "total_steps": total,
            "progress": row["progress"], "elapsed_s": elapsed, "eta_s": eta}


async def _event_stream(service: JobService, row: dict[str, Any], user: User):
    """queued (with its position) -> progress per step -> completed | failed | cancelled."""
    video_id, model = row["id"], row["model"]
    queue = service.hub.subscribe(video_id, model)
    try:
        yield "retry: 2000\n\n"
        last: tuple | None = None
        last_step = -1
        item: dict = RESYNC
        while True:
            if item.get("type") == "progress":
                if item["step"] > last_step:
                    last_step, last = item["step"], ("in_progress",)
                    yield sse("progress", {"id": video_id, "status": "in_progress",
                                           **{k: item[k] for k in ("step", "total_steps", "progress", "elapsed_s",
                                                                   "eta_s")}})
            elif item.get("type") == "deleted":
                yield sse("deleted", {"id": video_id, "deleted": True})
                return
            else:
                try:
                    row = await service.store.get(video_id, user)
                except NotFound:
                    yield sse("deleted", {"id": video_id, "deleted": True})
                    return
                if row["status"] in FINISHED:
                    yield sse(row["status"], await service.store.show(row))
                    return
                if row["status"] == "queued":
                    state = ("queued", await service.store.queue_position(row))
                    if state != last:
                        yield sse("queued", {"id": video_id, "status": "queued", "queue_position": state[1]})
                    last = state
                elif last is None or last[0] != "in_progress" or (row["step"] or 0) > last_step:
                    # The current state on connecting (or after a missed notification).
                    last_step, last = row["step"] or 0, ("in_progress",)
                    yield sse("progress", _progress_data(row))
            try:
                item = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"
                item = RESYNC
    finally:
        service.hub.unsubscribe(video_id, model, queue)


async def _supervised_worker(settings: Settings, database_url: str, queue_app, store: Store,
                             metrics: JobMetrics) -> None:
    """The in-process worker (local use): restarted after a failure such as a database restart."""
    while True:
        try:
            await work(settings, database_url, queue_app, store, metrics)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - keep working after a database restart
            log.warning("worker stopped (%s); restarting in 2 s", e)
            await asyncio.sleep(2)

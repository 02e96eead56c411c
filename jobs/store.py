"""Job records, users and keys in PostgreSQL: every query the API and the worker run.

A job row and its queue entry (Procrastinate's job) are written in one transaction; so are a
finished job's row and its webhook's queue entry. Changes are published with NOTIFY on
``video_events`` in the same transaction, so whichever API replica holds a client's event
stream hears them, and hears nothing that was rolled back.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from jobs.errors import Conflict, NotFound, TooManyActiveJobs
from jobs.rules import JobSpec
from jobs.webhooks import new_secret

EVENTS_CHANNEL = "video_events"
ACTIVE = ("queued", "in_progress")
FINISHED = ("completed", "failed", "cancelled")
GENERATE_TASK = "jobs.generate"
WEBHOOK_TASK = "jobs.webhook"
KEY_PREFIX = "wan_"


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool
    webhook_secret: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_video_id() -> str:
    return "video_" + secrets.token_hex(12)


def _epoch(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def video_object(row: dict[str, Any], queue_position: int | None = None) -> dict[str, Any]:
    """A job row as the API shows it: OpenAI's video object plus the Wan fields (docs/api.md)."""
    params = row["parameters"]
    frames, fps = params["num_frames"], params["fps"]
    return {
        "id": row["id"],
        "object": "video",
        "model": row["model"],
        "status": row["status"],
        "progress": row["progress"],
        "created_at": _epoch(row["created_at"]),
        "started_at": _epoch(row["started_at"]),
        "completed_at": _epoch(row["completed_at"]),
        "expires_at": None,
        "prompt": params["prompt"],
        "size": f"{params['width']}x{params['height']}",
        "seconds": f"{(frames - 1) / fps:g}",
        "remixed_from_video_id": None,
        "error": row["error"],
        "queue_position": queue_position if row["status"] == "queued" else None,
        "step": row["step"],
        "total_steps": row["total_steps"],
        "seed": params["seed"],
        "parameters": params,
        "attempts": row["attempts"],
        "metadata": row["metadata"],
        "result": row["result"],
    }


class Store:
    """The job service's queries over one connection pool."""

    def __init__(self, pool: AsyncConnectionPool):
        self.pool = pool

    # --- users and keys (also used synchronously by the CLI: see create_key) ---

    async def authenticate(self, key: str) -> User | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT u.name, u.is_admin, u.webhook_secret FROM api_keys k JOIN api_users u ON u.name = k.user_name "
                "WHERE k.key_hash = %s", (hash_key(key),))).fetchone()
        return User(row["name"], row["is_admin"], row["webhook_secret"]) if row else None

    async def user(self, name: str) -> User | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT name, is_admin, webhook_secret FROM api_users WHERE name = %s", (name,))).fetchone()
        return User(row["name"], row["is_admin"], row["webhook_secret"]) if row else None

    # --- the API's side ---

    async def create_job(self, user: User, job: JobSpec, idempotency_key: str | None, max_active: int,
                         ttl_s: int, defer) -> tuple[dict[str, Any], bool]:
        """Insert the job and its queue entry in one transaction. Returns (row, created): an
        Idempotency-Key seen with the same body returns the first job and False."""
        async with self.pool.connection() as conn, conn.transaction():
            # One submission at a time per user: the active count and the key check hold.
            await conn.execute("SELECT 1 FROM api_users WHERE name = %s FOR UPDATE", (user.name,))
            if idempotency_key is not None:
                await conn.execute(
                    "UPDATE video_jobs SET idempotency_key = NULL WHERE user_name = %s AND idempotency_key = %s "
                    "AND created_at < now() - make_interval(secs => %s)", (user.name, idempotency_key, ttl_s))
                existing = await (await conn.execute(
                    "SELECT * FROM video_jobs WHERE user_name = %s AND idempotency_key = %s",
                    (user.name, idempotency_key))).fetchone()
                if existing is not None:
                    if existing["request_hash"] != job.fingerprint:
                        raise Conflict("this Idempotency-Key was used with another body; use a new key for a new "
                                       "job", "Idempotency-Key", "idempotency_key_reused")
                    return existing, False
            active = (await (await conn.execute(
                "SELECT count(*) AS n FROM video_jobs WHERE user_name = %s AND status IN ('queued', 'in_progress')",
                (user.name,))).fetchone())["n"]
            if active >= max_active:
                raise TooManyActiveJobs(
                    f"{active} of your jobs are queued or running, the most this server takes per user "
                    f"({max_active}); submit again when one finishes", retry_after_s=10)
            video_id = new_video_id()
            row = await (await conn.execute(
                "INSERT INTO video_jobs (id, user_name, model, status, request, parameters, metadata, webhook_url, "
                "idempotency_key, request_hash) VALUES (%s, %s, %s, 'queued', %s, %s, %s, %s, %s, %s) RETURNING *",
                (video_id, user.name, job.model.name, Jsonb(job.request), Jsonb(job.parameters), Jsonb(job.metadata),
                 job.webhook_url, idempotency_key, job.fingerprint))).fetchone()
            if job.image is not None:
                await conn.execute("INSERT INTO video_inputs (job_id, image) VALUES (%s, %s)", (video_id, job.image))
            queue_job_id = await defer(conn, video_id, job.model.name)
            row = await (await conn.execute(
                "UPDATE video_jobs SET queue_job_id = %s WHERE id = %s RETURNING *", (queue_job_id, video_id))).fetchone()
            await self._notify(conn, video_id, row["model"], "status")
        return row, True

    async def get(self, video_id: str, user: User) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT * FROM video_jobs WHERE id = %s AND (user_name = %s OR %s)",
                (video_id, user.name, user.is_admin))).fetchone()
        if row is None:
            # Another user's job is "not found" too: its existence is not theirs to learn.
            raise NotFound(f"no video {video_id[:60]!r}", "video_id")
        return row

    async def queue_position(self, row: dict[str, Any]) -> int | None:
        if row["status"] != "queued":
            return None
        async with self.pool.connection() as conn:
            ahead = (await (await conn.execute(
                "SELECT count(*) AS n FROM video_jobs WHERE model = %s AND status = 'queued' AND seq < %s",
                (row["model"], row["seq"]))).fetchone())["n"]
        return ahead + 1

    async def show(self, row: dict[str, Any]) -> dict[str, Any]:
        return video_object(row, await self.queue_position(row))

    async def list(self, user: User, limit: int, after: str | None, order: str) -> tuple[list[dict], bool]:
        descending = order == "desc"
        clauses, args = ["(user_name = %s OR %s)"], [user.name, user.is_admin]
        if after is not None:
            cursor = await self.get(after, user)
            clauses.append("seq < %s" if descending else "seq > %s")
            args.append(cursor["seq"])
        query = (f"SELECT * FROM video_jobs WHERE {' AND '.join(clauses)} ORDER BY seq {'DESC' if descending else 'ASC'}"
                 " LIMIT %s")
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, (*args, limit + 1))).fetchall()
        return rows[:limit], len(rows) > limit

    async def cancel(self, video_id: str, user: User, cancel_queue_job, defer_webhook) -> dict[str, Any]:
        async with self.pool.connection() as conn, conn.transaction():
            row = await self._lock_visible(conn, video_id, user)
            if row["status"] in FINISHED:
                raise Conflict(f"video {video_id} is already {row['status']}; only queued or running videos can be "
                               "cancelled", "video_id", "video_finished")
            row = await self._finish(conn, row, "cancelled", error=None, result=None, outcome="cancelled")
            if row["queue_job_id"] is not None:
                # Queued: the queue entry is cancelled and never reaches a worker. Running: the
                # worker is asked to abort (it also sees the row's status at its next step).
                await cancel_queue_job(conn, row["queue_job_id"])
            if row["webhook_url"]:
                await defer_webhook(conn, row["id"], "cancelled")
        return row

    async def delete(self, video_id: str, user: User, cancel_queue_job) -> dict[str, Any]:
        async with self.pool.connection() as conn, conn.transaction():
            row = await self._lock_visible(conn, video_id, user)
            if row["status"] in ACTIVE and row["queue_job_id"] is not None:
                await cancel_queue_job(conn, row["queue_job_id"])
            await conn.execute("DELETE FROM video_jobs WHERE id = %s", (video_id,))
            await self._notify(conn, video_id, row["model"], "deleted")
        return row

    async def poster(self, video_id: str) -> bytes | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT poster FROM video_posters WHERE job_id = %s",
                                            (video_id,))).fetchone()
        return bytes(row["poster"]) if row else None

    async def counts(self) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            return await (await conn.execute(
                "SELECT model, status, count(*) AS n FROM video_jobs GROUP BY model, status")).fetchall()

    # --- the worker's side ---

    async def is_active(self, video_id: str) -> bool:
        """Queued or running (not cancelled, finished or deleted)."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT status FROM video_jobs WHERE id = %s", (video_id,))).fetchone()
        return row is not None and row["status"] in ACTIVE

    async def load_for_work(self, video_id: str) -> tuple[dict[str, Any] | None, str | None]:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT * FROM video_jobs WHERE id = %s", (video_id,))).fetchone()
            image = await (await conn.execute("SELECT image FROM video_inputs WHERE job_id = %s",
                                              (video_id,))).fetchone()
        return row, image["image"] if image else None

    async def start_attempt(self, video_id: str, endpoint: str, worker: str) -> dict[str, Any] | None:
        """Mark the job running on ``endpoint`` and open an attempt. None if it is no longer to
        be run (cancelled or deleted meanwhile). An attempt left open by a worker that died is
        closed here as interrupted."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT * FROM video_jobs WHERE id = %s AND status IN ('queued', 'in_progress') FOR UPDATE",
                (video_id,))).fetchone()
            if row is None:
                return None
            attempts = list(row["attempts"])
            now = time.time()
            for attempt in attempts:
                if attempt.get("ended_at") is None:
                    attempt.update(ended_at=round(now, 3), outcome="interrupted",
                                   reason="the worker running it stopped (it was taken up again)")
            attempts.append({"number": len(attempts) + 1, "endpoint": endpoint, "worker": worker,
                             "started_at": round(now, 3), "ended_at": None, "outcome": None})
            row = await (await conn.execute(
                "UPDATE video_jobs SET status = 'in_progress', started_at = COALESCE(started_at, now()), "
                "step = NULL, total_steps = NULL, elapsed_s = NULL, attempts = %s WHERE id = %s RETURNING *",
                (Jsonb(attempts), video_id))).fetchone()
            await self._notify(conn, video_id, row["model"], "status")
        return row

    async def record_step(self, video_id: str, model: str, step: int, total: int, elapsed_s: float) -> bool:
        """One denoising step. False when the job is no longer running (cancelled, deleted)."""
        progress = min(99, int(100 * step / total)) if total else 0
        eta_s = round(elapsed_s / step * (total - step), 3) if step else None
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "UPDATE video_jobs SET step = %s, total_steps = %s, progress = %s, elapsed_s = %s "
                "WHERE id = %s AND status = 'in_progress' RETURNING id", (step, total, progress, elapsed_s, video_id),
            )).fetchone()
            if row is None:
                return False
            await self._notify(conn, video_id, model, "progress", step=step, total_steps=total, progress=progress,
                               elapsed_s=round(elapsed_s, 3), eta_s=eta_s)
        return True

    async def still_running(self, video_id: str) -> bool:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT status FROM video_jobs WHERE id = %s", (video_id,))).fetchone()
        return row is not None and row["status"] == "in_progress"

    async def end_attempt(self, video_id: str, outcome: str, reason: str | None = None) -> int:
        """Close the open attempt (the job stays in_progress for a retry). Returns the attempt count."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute("SELECT attempts FROM video_jobs WHERE id = %s FOR UPDATE",
                                            (video_id,))).fetchone()
            if row is None:
                return 0
            attempts = self._closed(row["attempts"], outcome, reason)
            await conn.execute("UPDATE video_jobs SET attempts = %s WHERE id = %s", (Jsonb(attempts), video_id))
        return len(attempts)

    async def complete(self, video_id: str, result: dict[str, Any], effective: dict[str, Any],
                       poster: bytes | None, defer_webhook) -> dict[str, Any] | None:
        """The job's result, in one transaction with its poster and its webhook. None when the job
        was cancelled or deleted meanwhile (the caller removes the stored video)."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT * FROM video_jobs WHERE id = %s AND status = 'in_progress' FOR UPDATE", (video_id,))).fetchone()
            if row is None:
                return None
            await conn.execute(
                "UPDATE video_jobs SET parameters = parameters || %s WHERE id = %s", (Jsonb(effective), video_id))
            if poster is not None:
                await conn.execute("INSERT INTO video_posters (job_id, poster) VALUES (%s, %s) ON CONFLICT (job_id) "
                                   "DO UPDATE SET poster = EXCLUDED.poster", (video_id, poster))
            row = await self._finish(conn, row, "completed", error=None, result=result, outcome="completed")
            if row["webhook_url"]:
                await defer_webhook(conn, video_id, "completed")
        return row

    async def fail(self, video_id: str, error: dict[str, Any], defer_webhook,
                   outcome: str = "failed") -> dict[str, Any] | None:
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT * FROM video_jobs WHERE id = %s AND status IN ('queued', 'in_progress') FOR UPDATE",
                (video_id,))).fetchone()
            if row is None:
                return None
            row = await self._finish(conn, row, "failed", error=error, result=None, outcome=outcome,
                                     reason=error.get("message"))
            if row["webhook_url"]:
                await defer_webhook(conn, video_id, "failed")
        return row

    async def webhook_target(self, video_id: str) -> tuple[str, str] | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT j.webhook_url, u.webhook_secret FROM video_jobs j JOIN api_users u ON u.name = j.user_name "
                "WHERE j.id = %s", (video_id,))).fetchone()
        return (row["webhook_url"], row["webhook_secret"]) if row and row["webhook_url"] else None

    # --- helpers ---

    @staticmethod
    def _closed(attempts: list[dict], outcome: str, reason: str | None) -> list[dict]:
        attempts = [dict(a) for a in attempts]
        if attempts and attempts[-1].get("ended_at") is None:
            attempts[-1].update(ended_at=round(time.time(), 3), outcome=outcome, reason=reason)
        return attempts

    async def _finish(self, conn, row, status: str, *, error, result, outcome: str, reason: str | None = None):
        attempts = self._closed(row["attempts"], outcome, reason)
        progress = 100 if status == "completed" else row["progress"]
        row = await (await conn.execute(
            "UPDATE video_jobs SET status = %s, completed_at = now(), error = %s, result = %s, progress = %s, "
            "attempts = %s WHERE id = %s RETURNING *",
            (status, Jsonb(error) if error else None, Jsonb(result) if result else None, progress, Jsonb(attempts),
             row["id"]))).fetchone()
        await self._notify(conn, row["id"], row["model"], "status")
        return row

    async def _lock_visible(self, conn, video_id: str, user: User) -> dict[str, Any]:
        row = await (await conn.execute(
            "SELECT * FROM video_jobs WHERE id = %s AND (user_name = %s OR %s) FOR UPDATE",
            (video_id, user.name, user.is_admin))).fetchone()
        if row is None:
            raise NotFound(f"no video {video_id[:60]!r}", "video_id")
        return row

    @staticmethod
    async def _notify(conn, video_id: str, model: str, kind: str, **data: Any) -> None:
        payload = json.dumps({"id": video_id, "model": model, "type": kind, **data}, separators=(",", ":"))
        await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, payload))


async def open_pool(url: str, max_size: int = 10) -> AsyncConnectionPool:
    """A pool whose connections hand rows out as dicts. Broken connections (a database restart)
    are checked and replaced when taken from the pool."""
    pool = AsyncConnectionPool(url, min_size=1, max_size=max_size, open=False,
                               kwargs={"row_factory": dict_row, "autocommit": True},
                               check=AsyncConnectionPool.check_connection, timeout=10)
    await pool.open(wait=True, timeout=30)
    return pool


def create_key(url: str, user: str, admin: bool = False) -> dict[str, str]:
    """A new API key for ``user`` (created if new; another key if it exists). The key is shown
    once: only its hash is stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn, conn.transaction():
        conn.execute("INSERT INTO api_users (name, is_admin, webhook_secret) VALUES (%s, %s, %s) "
                     "ON CONFLICT (name) DO UPDATE SET is_admin = api_users.is_admin OR EXCLUDED.is_admin",
                     (user, admin, new_secret()))
        conn.execute("INSERT INTO api_keys (key_hash, user_name) VALUES (%s, %s)", (hash_key(key), user))
        secret = conn.execute("SELECT webhook_secret FROM api_users WHERE name = %s", (user,)).fetchone()
    return {"user": user, "key": key, "webhook_secret": secret["webhook_secret"]}

"""PostgreSQL: the embedded default server, versioned migrations, the connection pool.

One database holds the job records and the queue (Procrastinate's tables), so that a job row
and its queue entry are written in one transaction.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from pathlib import Path

import psycopg
from procrastinate.schema import SchemaManager

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Serialises `migrate` across replicas started at once (any constant; pg_advisory_xact_lock's key).
_MIGRATION_LOCK = 7_421_013


def embedded_url(run_dir: Path) -> str:
    """Start (or find running) the embedded PostgreSQL of the ``pgserver`` wheel under
    ``run_dir/postgres`` and return its URL. No root and no system service: the server runs as
    the calling user (pgserver switches to its own user when called as root) and listens on a
    Unix socket in its data folder only. It keeps running after this process exits, so the API,
    the worker and `make serve` share it; ``stop_embedded`` stops it."""
    data = run_dir / "postgres"
    data.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI): pgserver does not need it.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver

        server = pgserver.get_server(str(data), cleanup_mode=None)
    return server.get_uri()


def stop_embedded(run_dir: Path, timeout_s: float = 30.0, data_dir_name: str = "postgres") -> bool:
    """Stop the embedded PostgreSQL if it runs (a fast shutdown: SIGINT to the postmaster, as
    pg_ctl -m fast does; pg_ctl itself would have to run as pgserver's user, which may not be
    able to reach the folder). True if one was stopped."""
    pid_file = run_dir / data_dir_name / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)
    except (OSError, ValueError, IndexError):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def _procrastinate_schema(connection: psycopg.Connection) -> None:
    connection.execute(SchemaManager.get_schema())


# (version, name, how). Never edit an applied migration: add the next one.
MIGRATIONS = (
    (1, "procrastinate 3.10 schema (the queue)", _procrastinate_schema),
    (2, "jobs, users and keys", MIGRATIONS_DIR / "0002_jobs.sql"),
)


def migrate(url: str) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction, and return their names.
    Safe to run from several replicas at once (an advisory lock serialises them)."""
    applied_now = []
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS jobs_schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, name, how in MIGRATIONS:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                done = connection.execute(
                    "SELECT 1 FROM jobs_schema_migrations WHERE version = %s", (version,)
                ).fetchone()
                if done:
                    continue
                if callable(how):
                    how(connection)
                else:
                    connection.execute(how.read_text())
                connection.execute("INSERT INTO jobs_schema_migrations (version, name) VALUES (%s, %s)",
                                   (version, name))
                applied_now.append(f"{version:04d} {name}")
                log.info("applied migration %04d %s", version, name)
    return applied_now


def pending_migrations(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as connection:
        try:
            applied = {row[0] for row in connection.execute("SELECT version FROM jobs_schema_migrations")}
        except psycopg.errors.UndefinedTable:
            applied = set()
    return [version for version, _, _ in MIGRATIONS if version not in applied]

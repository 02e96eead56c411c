"""The local job service of ``make serve``: the embedded PostgreSQL, the migrations, a key for the
local user, and ``python -m jobs serve --with-worker`` in the background on 127.0.0.1:8000.
Everything it writes is under .run/ (logs in .run/logs/jobs.log). Running it twice is harmless.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jobs import db
from jobs.config import DATA_PLANE_TOKEN_FILE, Settings
from jobs.store import create_key

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0


def _port() -> int:
    return int(os.environ.get("JOBS_PORT", "8000"))


def _pid_file(settings: Settings) -> Path:
    return settings.run_dir / "jobs.pid"


def key_file(settings: Settings) -> Path:
    return settings.run_dir / "jobs_key.json"


def _running_pid(settings: Settings) -> int | None:
    try:
        pid = int(_pid_file(settings).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _ensure_key(settings: Settings, database_url: str) -> dict:
    """The local user's key: kept in .run/jobs_key.json, made once (a new one if the database
    was reset and no longer knows it)."""
    path = key_file(settings)
    try:
        saved = json.loads(path.read_text())
        import psycopg

        from jobs.store import hash_key

        with psycopg.connect(database_url) as conn:
            if conn.execute("SELECT 1 FROM api_keys WHERE key_hash = %s", (hash_key(saved["key"]),)).fetchone():
                return saved
    except (OSError, ValueError, KeyError):
        pass
    created = create_key(database_url, "local")
    path.write_text(json.dumps(created) + "\n")
    path.chmod(0o600)
    return created


def _ensure_data_plane_token(settings: Settings) -> None:
    """The local TorchServe's credential for the cancellation check (.run/data_plane_token):
    the handler reads the same file (scripts/serve.py points it there)."""
    path = settings.run_dir / DATA_PLANE_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)


def start(settings: Settings) -> int:
    url = f"http://{HOST}:{_port()}"
    database_url = settings.database_url or db.embedded_url(settings.run_dir)
    db.migrate(database_url)
    key = _ensure_key(settings, database_url)
    _ensure_data_plane_token(settings)
    if _running_pid(settings) and _ready(url):
        print(f"job service already running: {url}")
    else:
        logs = settings.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "jobs.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "jobs", "serve", "--host", HOST, "--port", str(_port()), "--with-worker"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "JOBS_RUN_DIR": str(settings.run_dir)},
            )
        _pid_file(settings).write_text(str(process.pid))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                print(f"the job service did not become ready; see {logs / 'jobs.log'}", file=sys.stderr)
                return 1
            time.sleep(0.3)
    print(f"job service: {url}/ (the page), API {url}/v1 (docs {url}/docs)")
    # Printed for the person at this terminal (the service listens on 127.0.0.1 only); kept in the
    # key file for scripts.
    print(f"  your API key (user 'local'), to paste into the page: {key['key']}")
    print(f"  (also in {key_file(settings)})")
    print(f"  logs: {settings.run_dir / 'logs' / 'jobs.log'}; database: embedded PostgreSQL in "
          f"{settings.run_dir / 'postgres'}")
    return 0


def stop(settings: Settings) -> int:
    pid = _running_pid(settings)
    if pid:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.2)
        else:
            os.killpg(pid, signal.SIGKILL)
        print("job service stopped")
    _pid_file(settings).unlink(missing_ok=True)
    if settings.database_url is None and db.stop_embedded(settings.run_dir):
        print("embedded PostgreSQL stopped")
    return 0


def status(settings: Settings) -> int:
    url = f"http://{HOST}:{_port()}"
    ready = _ready(url)
    print(f"job service: {'ready' if ready else 'not running'} at {url}")
    return 0 if ready else 1

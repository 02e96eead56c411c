"""``python -m jobs``: the job service's commands.

    serve [--host H] [--port P] [--with-worker]   the API (and the page); the worker too if asked
    worker [--metrics-port P]                     the worker alone (its own Deployment)
    migrate                                       apply the database migrations not applied yet
    keys create --user NAME [--admin]             a new API key (printed once, stored hashed)
    local start|stop|status                       the local service of `make serve` (background)

The database is ``JOBS_DATABASE_URL``, or the embedded PostgreSQL under .run/ when it is unset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from jobs import db
from jobs.config import JobsConfigError, Settings, load_settings


def database_url(settings: Settings) -> str:
    return settings.database_url or db.embedded_url(settings.run_dir)


def _serve(args, settings: Settings) -> int:
    import uvicorn

    from jobs.app import create_app

    url = database_url(settings)
    pending = db.pending_migrations(url)
    if pending:
        print(f"note: migrations {pending} are not applied; /readyz stays 503 until `python -m jobs migrate` runs",
              file=sys.stderr)
    app = create_app(settings, url, with_worker=args.with_worker)
    # The server's own access log would print API keys passed as ?key= (EventSource, <video>).
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=10)
    return 0


def _worker(args, settings: Settings) -> int:
    from prometheus_client import start_http_server

    from jobs.metrics import JobMetrics
    from jobs.store import Store, open_pool
    from jobs.worker import make_queue_app, work

    url = database_url(settings)
    metrics = JobMetrics()
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            pool = await open_pool(url, max_size=4 + 2 * settings.worker_concurrency)
            app = make_queue_app(url)
            try:
                async with app.open_async():
                    task = asyncio.ensure_future(work(settings, url, app, Store(pool), metrics))
                    stopper = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    task.cancel()
                    stopper.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
            except Exception as e:  # noqa: BLE001 - a database restart: start over
                logging.getLogger("jobs").warning("worker stopped (%s); restarting in 2 s", e)
                await asyncio.sleep(2)
            finally:
                await pool.close()

    asyncio.run(main())
    return 0


def _migrate(args, settings: Settings) -> int:
    applied = db.migrate(database_url(settings))
    print(json.dumps({"applied": applied}))
    return 0


def _keys(args, settings: Settings) -> int:
    from jobs.store import create_key

    print(json.dumps(create_key(database_url(settings), args.user, admin=args.admin)))
    return 0


def _local(args, settings: Settings) -> int:
    from jobs import local

    return {"start": local.start, "stop": local.stop, "status": local.status}[args.action](settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config/jobs.yaml by default (or JOBS_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API and the page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--with-worker", action="store_true", help="run the worker in the same process")
    worker = sub.add_parser("worker", help="run the worker")
    worker.add_argument("--metrics-port", type=int, default=9100, help="Prometheus metrics port (0: none)")
    sub.add_parser("migrate", help="apply database migrations")
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a user (the user too, if new)")
    create.add_argument("--user", required=True)
    create.add_argument("--admin", action="store_true", help="the user sees every user's jobs")
    local = sub.add_parser("local", help="the local background service of make serve")
    local.add_argument("action", choices=("start", "stop", "status"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pgserver narrates every start at INFO and httpx logs each request: only their warnings.
    for chatty in ("pgserver", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        settings = load_settings(args.config)
    except JobsConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handlers = {"serve": _serve, "worker": _worker, "migrate": _migrate, "keys": _keys, "local": _local}
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())

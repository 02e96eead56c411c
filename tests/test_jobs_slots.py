"""Endpoint slots (jobs/worker.py EndpointSlots) against a real PostgreSQL: a job cancelled at
any moment while it takes or holds its slot gives the slot back. (A slot once stayed with a
pooled connection after a cancel landed between taking the lock and reading the answer: every
later job of that model waited forever.)"""

from __future__ import annotations

import asyncio

import psycopg

from jobs.config import load_settings
from jobs.store import open_pool
from jobs.worker import EndpointSlots, _slot_key
from tests.harness.jobs import Postgres

CONFIG = """
models:
  - name: wan
    variant: ti2v-5b
    model_config: {model_config}
    endpoints:
      - {{name: local, url: "http://127.0.0.1:9", capacity: 1}}
"""


def _slot_is_free(url: str, model: str, endpoint: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        key = _slot_key(model, endpoint)
        got = conn.execute("SELECT pg_try_advisory_lock(%s, 0)", (key,)).fetchone()[0]
        if got:
            conn.execute("SELECT pg_advisory_unlock(%s, 0)", (key,))
        return got


def test_a_cancelled_job_always_gives_its_slot_back(tmp_path):
    from tests.harness.servers import TINY_CONFIG

    (tmp_path / "jobs.yaml").write_text(CONFIG.format(model_config=TINY_CONFIG))
    model = load_settings(tmp_path / "jobs.yaml", run_dir=tmp_path).model("wan")
    database = Postgres(tmp_path / "pg")
    url = database.start()

    async def scenario() -> tuple[int, int]:
        pool = await open_pool(url, max_size=2)
        slots = EndpointSlots(pool)
        ran = 0

        async def wanted() -> bool:
            return True

        async def work(endpoint) -> None:
            nonlocal ran
            ran += 1
            await asyncio.sleep(3600)  # a generation that the cancel interrupts

        leaked = 0
        try:
            # Cancel after 0..40 ms: before, during and after taking the lock.
            for delay_ms in range(0, 41):
                task = asyncio.ensure_future(slots.run_holding_slot(model, wanted, work))
                await asyncio.sleep(delay_ms / 1000)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                # A closed connection's locks go when its server process sees it gone: soon, not at once.
                for _ in range(50):
                    if await asyncio.to_thread(_slot_is_free, url, "wan", "local"):
                        break
                    await asyncio.sleep(0.1)
                else:
                    leaked += 1
            # And the slot still serves the next job.
            async def quick(endpoint) -> str:
                return endpoint.name
            assert await asyncio.wait_for(slots.run_holding_slot(model, wanted, quick), 10) == "local"
        finally:
            await pool.close()
        return leaked, ran

    try:
        leaked, ran = asyncio.run(scenario())
    finally:
        database.stop()
    assert ran > 0, "no attempt reached the work: the delays never covered holding the slot"
    assert leaked == 0, f"{leaked} cancels left the slot taken"

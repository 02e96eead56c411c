"""Live job events for Server-Sent Events streams, from PostgreSQL's LISTEN/NOTIFY.

Every change of a job is NOTIFYed on ``video_events`` by the transaction that makes it (see
``jobs.store``), so any API replica can stream any job: each replica holds one listening
connection and fans the notifications out to its open streams. A stream re-reads the job row
for status changes (the row is the truth; a notification only says "look again"), and takes
progress steps from the notifications themselves so that none is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict

import psycopg

from jobs.store import EVENTS_CHANNEL

log = logging.getLogger(__name__)

RESYNC = {"type": "resync"}


class EventHub:
    def __init__(self, database_url: str):
        self.database_url = database_url
        self._by_video: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._by_model: dict[str, set[asyncio.Queue]] = defaultdict(set)

    def subscribe(self, video_id: str, model: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._by_video[video_id].add(queue)
        self._by_model[model].add(queue)
        return queue

    def unsubscribe(self, video_id: str, model: str, queue: asyncio.Queue) -> None:
        self._by_video[video_id].discard(queue)
        self._by_model[model].discard(queue)
        if not self._by_video[video_id]:
            del self._by_video[video_id]
        if not self._by_model[model]:
            del self._by_model[model]

    def _dispatch(self, event: dict) -> None:
        for queue in self._by_video.get(event.get("id"), ()):
            queue.put_nowait(event)
        if event.get("type") in ("status", "deleted"):
            # A job starting, finishing or leaving moves every queued job of its model up.
            for queue in self._by_model.get(event.get("model"), ()):
                if queue not in self._by_video.get(event.get("id"), ()):
                    queue.put_nowait(RESYNC)

    def _resync_all(self) -> None:
        for queues in self._by_video.values():
            for queue in queues:
                queue.put_nowait(RESYNC)

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after a database restart (streams re-read their
        job then: notifications sent while disconnected are lost, the rows are not)."""
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    delay = 0.5
                    self._resync_all()
                    async for notification in conn.notifies():
                        try:
                            self._dispatch(json.loads(notification.payload))
                        except ValueError:
                            log.warning("unreadable notification: %.200s", notification.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a database restart: listen again
                log.warning("event listener lost its connection (%s); reconnecting in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

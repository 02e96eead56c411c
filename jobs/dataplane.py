"""Calling an inference endpoint over HTTP, as any client would: the job service never imports
the pipeline. One function per endpoint kind turns its streaming answer into progress callbacks
and one outcome.

- TorchServe (also a KServe InferenceService running our TorchServe runtime):
  ``POST /predictions/<model>`` with ``stream: true``, NDJSON lines ``progress`` ... ``result`` |
  ``error``.
- Triton: ``POST /v2/models/<model>/generate_stream`` with ``{"request": "<JSON>"}``, Server-Sent
  Events whose ``response`` holds the same NDJSON events as text.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from jobs.config import Endpoint

# Read at most this much of an error answer (a misconfigured proxy may answer with a page).
_MAX_ERROR_BYTES = 64 * 1024

OnProgress = Callable[[int, int, float], Awaitable[bool]]  # (step, total, elapsed_s) -> keep going


class Retryable(Exception):
    """The endpoint could not run the job now (queue full, connection lost, a gateway's 5xx):
    the same job, with the same seed, is tried again later, maybe on another endpoint."""


class Refused(Exception):
    """The endpoint answered the job with an error of its own (a 4xx, or a handler error such as
    a deadline or out of memory): the job fails with it and is never retried."""

    def __init__(self, status: int, error: dict[str, Any]):
        super().__init__(error.get("message", ""))
        self.status = status
        self.error = error


class Stopped(Exception):
    """The job was cancelled or deleted while it ran; the connection was closed."""


@dataclass(frozen=True)
class Outcome:
    result: dict[str, Any]  # the handler's result fields (video, width, ..., timings)


def _handler_error(payload: Any, status: int) -> dict[str, Any]:
    """The handler's error object, in the Jobs API's shape (code, message, type, param)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return {"code": error.get("type") or f"http_{status}", "message": str(error.get("message", ""))[:2000],
                "type": "data_plane_error", "param": error.get("field")}
    if isinstance(error, str):  # Triton's {"error": "<message>"}
        return {"code": f"http_{status}", "message": error[:2000], "type": "data_plane_error", "param": None}
    return {"code": f"http_{status}", "message": f"the inference endpoint answered HTTP {status}",
            "type": "data_plane_error", "param": None}


async def _error_answer(response: httpx.Response) -> Exception:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > _MAX_ERROR_BYTES:
            break
    status = response.status_code
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if status == 503 or status in (502, 504) and payload is None or status == 429:
        # TorchServe's "queue full", or a gateway in between: not the job's fault.
        return Retryable(f"endpoint answered HTTP {status}")
    if status in (401, 403):
        # Our credentials, not the job: retried (the key file is re-read; an operator fixes it).
        return Retryable(f"endpoint refused our credentials (HTTP {status})")
    return Refused(status, _handler_error(payload, status))


async def _events(endpoint: Endpoint, response: httpx.Response):
    """The NDJSON events of an answer, whatever the endpoint's framing."""
    async for line in response.aiter_lines():
        line = line.strip()
        if not line:
            continue
        if endpoint.kind == "triton":
            if not line.startswith("data:"):
                continue  # SSE comments and other fields
            envelope = json.loads(line[5:])
            if "error" in envelope:
                yield {"event": "error", "error": {"type": "data_plane_error", "message": envelope["error"]}}
                continue
            line = envelope.get("response", "")
            if not isinstance(line, str):
                line = json.dumps(line)
        yield json.loads(line)


# Names the job to the data plane, whose cancellation check asks the job service about it.
JOB_ID_HEADER = "X-Wan-Job-Id"


async def run(endpoint: Endpoint, request: dict[str, Any], on_progress: OnProgress,
              client: httpx.AsyncClient, job_id: str | None = None) -> Outcome:
    """Send one job and follow it to its outcome. Raises Retryable, Refused or Stopped."""
    body = dict(request, stream=True, output=endpoint.output)
    if endpoint.kind == "triton":
        url = f"{endpoint.url}/v2/models/{endpoint.model}/generate_stream"
        payload: Any = {"request": json.dumps(body)}
    else:
        url = f"{endpoint.url}/predictions/{endpoint.model}"
        payload = body
    timeout = httpx.Timeout(endpoint.timeout_s, connect=10.0)
    try:
        headers = dict(endpoint.auth_headers(), **({JOB_ID_HEADER: job_id} if job_id else {}))
        async with client.stream("POST", url, json=payload, headers=headers,
                                 timeout=timeout) as response:
            if response.status_code != 200:
                raise await _error_answer(response)
            async for event in _events(endpoint, response):
                kind = event.get("event")
                if kind == "progress":
                    if not await on_progress(int(event["step"]), int(event["total"]), float(event["elapsed_s"])):
                        raise Stopped()
                elif kind == "result":
                    event.pop("event")
                    return Outcome(event)
                elif kind == "error":
                    # After progress went out with 200, the handler's error is the last line.
                    raise Refused(200, _handler_error(event, 200))
    except (httpx.TransportError, json.JSONDecodeError) as e:
        raise Retryable(f"connection to {endpoint.name} failed: {e.__class__.__name__}: {e}"[:500]) from None
    raise Retryable(f"{endpoint.name} closed the answer before its result")

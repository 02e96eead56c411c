"""KServe's own Python v2 client (``kserve.InferenceRESTClient``), unchanged, as a new user calls it.

Run by the tests in ``.venv-triton`` (kserve is installed there: its protobuf descriptors clash
with tritonclient's in one process). Reads one JSON job on stdin: ``{"base_url", "model",
"request": <the Wan request>, "binary": bool, "headers": {...}}``; prints one JSON line,
``{"status": 200, "answer": <the answer's JSON>}`` or ``{"status": <HTTP status>, "error": "<what
the client's exception says>", "body": "<the answer it carries>", "content_type": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import numpy as np

from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def call(job: dict) -> dict:
    document = json.dumps(job["request"])
    tensor = InferInput("request", [1], "BYTES")
    if job.get("binary"):
        tensor.set_data_from_numpy(np.array([document.encode("utf-8")], dtype=np.object_), binary_data=True)
    else:
        tensor = InferInput("request", [1], "BYTES", data=[document])
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
    try:
        result = await client.infer(job["base_url"], InferRequest(job["model"], [tensor]), model_name=job["model"],
                                    headers=job.get("headers") or None)
    except httpx.HTTPStatusError as error:
        # What the client shows (its message holds the server's "error" only for a JSON content
        # type) and the answer its exception carries.
        return {"status": error.response.status_code, "error": str(error), "body": error.response.text,
                "content_type": error.response.headers.get("content-type")}
    finally:
        await client.close()
    [output] = result.outputs
    value = output.as_numpy().reshape(-1)[0]
    return {"status": 200, "output": output.name,
            "answer": json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(call(json.load(sys.stdin)))))

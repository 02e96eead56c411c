"""Client for the Wan2.2 server: send a request, show progress from the stream, save the MP4.

    python -m scripts.client --prompt "a red fox running through snow" --out fox.mp4
    python -m scripts.client --prompt "the cat starts to dance" --image cat.png --out cat.mp4

The TorchServe key is read from the key file by itself ($WAN_KEY_FILE, ./.run/key_file.json,
./key_file.json). ``WanClient`` is the importable part.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY_FILE_CANDIDATES = (Path(".run/key_file.json"), Path("key_file.json"), REPO_ROOT / ".run" / "key_file.json")

ProgressCallback = Callable[[dict[str, Any]], None]


class ServerError(Exception):
    """The server answered with an error; ``body`` is its JSON error object when it sent one."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        error = body.get("error") if isinstance(body, dict) else None
        detail = error.get("message") if isinstance(error, dict) else body
        super().__init__(f"HTTP {status}: {detail}")


def find_key_file() -> Path | None:
    explicit = os.environ.get("WAN_KEY_FILE")
    if explicit:
        return Path(explicit)
    return next((path for path in KEY_FILE_CANDIDATES if path.is_file()), None)


def image_data_url(path: str | Path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass
class Result:
    response: dict[str, Any]  # the JSON result (request_id, seed, timings, ...)
    mp4: bytes


class WanClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8080", model: str = "wan",
                 key: str | None = None, timeout_s: float = 3600.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if key is None:
            key_file = find_key_file()
            if key_file is not None:
                key = json.loads(key_file.read_text())["inference"]["key"]
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    @property
    def predictions_url(self) -> str:
        return f"{self.base_url}/predictions/{self.model}"

    def ping(self) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/ping", timeout=10)
        if not response.ok:
            raise ServerError(response.status_code, _json_or_text(response))
        return response.json()

    def generate(self, request: dict[str, Any], on_progress: ProgressCallback | None = None,
                 download: bool = True) -> Result:
        """Run one request; streams progress when ``on_progress`` is given. With a URL result,
        the video is downloaded only when ``download`` (``Result.mp4`` is empty otherwise)."""
        body = dict(request)
        if on_progress is not None:
            body["stream"] = True
        response = self.session.post(self.predictions_url, json=body, stream=bool(body.get("stream")),
                                     timeout=self.timeout_s)
        if response.status_code != 200:
            raise ServerError(response.status_code, _json_or_text(response))
        if body.get("output") == "mp4":
            return Result(response={"seed": response.headers.get("x-wan-seed")}, mp4=response.content)
        if body.get("stream"):
            final = None
            try:
                for event in iter_ndjson(response):
                    if event.get("event") == "progress" and on_progress is not None:
                        on_progress(event)
                    elif event.get("event") in ("result", "error"):
                        final = event
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                # What a client sees when the worker dies mid-generation: TorchServe resets the
                # connection of a stream it had already started (status 200).
                raise ServerError(response.status_code, "the stream broke off before the result (the "
                                  "server's worker may have died); the request can be sent again") from exc
            if final is None:
                raise ServerError(response.status_code, "stream ended without a result")
            if final["event"] == "error":
                raise ServerError(200, final)
            result = final
        else:
            result = response.json()
        video = result["video"]
        return Result(response=result, mp4=self.fetch_video(video) if download or "base64" in video else b"")

    def fetch_video(self, video: dict[str, Any]) -> bytes:
        if "base64" in video:
            return base64.b64decode(video["base64"])
        # A presigned URL carries its own authorization: no TorchServe key goes to S3.
        response = requests.get(video["url"], timeout=self.timeout_s)
        response.raise_for_status()
        return response.content


def iter_ndjson(response: requests.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.strip():
            yield json.loads(line)


def _json_or_text(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def progress_bar(event: dict[str, Any], width: int = 30) -> None:
    step, total = event["step"], event["total"]
    filled = int(width * step / total)
    eta = event["elapsed_s"] / step * (total - step)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total} "
                     f"{event['elapsed_s']:.1f}s elapsed, ~{eta:.0f}s left ")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def lora_choice(text: str) -> dict[str, Any]:
    """--lora NAME or NAME:SCALE as the request's {"name", "scale"} (the server checks both)."""
    name, _, scale = text.partition(":")
    if not scale:
        return {"name": name}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise SystemExit(f"error: --lora {text!r}: the scale after ':' must be a number") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate a video with the Wan2.2 server.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--image", help="a PNG/JPEG/WebP file for image-to-video")
    for name in ("width", "height", "num-frames", "fps", "steps", "seed"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--guidance-scale-2", type=float)
    parser.add_argument("--profile", help="a speed preset of the model (e.g. lightning)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                        help="an adapter from the model's allow-list; repeat for several")
    parser.add_argument("--output", choices=("inline", "url"), help="server default when omitted")
    parser.add_argument("--no-stream", action="store_true", help="do not show progress")
    parser.add_argument("--out", help="save the MP4 here (for URL results: download it); "
                                      "inline results default to output.mp4")
    parser.add_argument("--url", default=os.environ.get("WAN_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--model", default="wan")
    args = parser.parse_args(argv)

    request: dict[str, Any] = {"prompt": args.prompt}
    fields = {"negative_prompt": args.negative_prompt, "width": args.width, "height": args.height,
              "num_frames": args.num_frames, "fps": args.fps, "num_inference_steps": args.steps,
              "seed": args.seed, "guidance_scale": args.guidance_scale,
              "guidance_scale_2": args.guidance_scale_2, "output": args.output, "profile": args.profile}
    request.update({key: value for key, value in fields.items() if value is not None})
    if args.lora:
        request["lora"] = [lora_choice(text) for text in args.lora]
    if args.image:
        request["image"] = image_data_url(args.image)

    client = WanClient(args.url, args.model)
    started = time.perf_counter()
    try:
        result = client.generate(request, None if args.no_stream else progress_bar, download=args.out is not None)
    except ServerError as e:
        raise SystemExit(f"error: {e}") from None
    info = {key: result.response.get(key) for key in ("request_id", "variant", "width", "height",
                                                       "num_frames", "fps", "seed", "timings", "warnings",
                                                       "lossy", "profile", "lora") if key in result.response}
    video = result.response.get("video", {})
    if "url" in video:
        info.update(url=video["url"], s3_uri=video["s3_uri"])
    print(json.dumps(info, indent=2))
    out = args.out or (None if "url" in video else "output.mp4")
    if out is not None:
        Path(out).write_bytes(result.mp4)
        print(f"saved {out} ({len(result.mp4)} bytes) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

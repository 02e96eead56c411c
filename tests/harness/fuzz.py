"""Hostile input against a running server: images built to hurt, and thousands of generated bodies
checked against an oracle that parses each one as the handler does."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

from handler.request import FIELDS
from scripts.serve import REPO_ROOT, local_session
from tests.harness.faults import next_request
from tests.harness.load import stats
from tests.harness.payloads import (
    FRONTEND,
    HANDLER,
    MIB,
    SMALL,
    answer_protocol,
    b64,
    hostile_images,
    image_bytes,
    unwrap_answer,
    video_problem,
)
from tests.harness.servers import REQUEST_TIMEOUT_S, Server, proc_kib, reset_peak_rss

# A refused hostile image costs a header read, not a decode (~10 ms measured; generous bound).
MAX_REFUSAL_S = 5.0


def run_images(server: Server) -> dict[str, Any]:
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker"]}
    cases = []
    for name, value, expected, refused_by in hostile_images():
        rss_before = proc_kib(pid, "VmRSS")
        can_peak = reset_peak_rss(pid)
        sent = time.monotonic()
        response = server.post({"prompt": "a hostile image", **SMALL, "image": value}, timeout=60)
        seconds = time.monotonic() - sent
        peak = proc_kib(pid, "VmHWM") if can_peak else None
        growth_mib = (peak - rss_before) / 1024 if peak and rss_before else None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        error = error if isinstance(error, dict) else {}
        # The big bodies the worker gets cost their own size to receive and parse as JSON
        # (TorchServe's Python side reads and json-decodes them); everything else must cost
        # almost nothing in the worker, and what the frontend refuses never reaches it.
        big = isinstance(value, str) and len(value) > MIB
        case = {"name": name, "status": response.status_code, "seconds": round(seconds, 3), "big_body": big,
                "refused_by": refused_by, "field": error.get("field"),
                "message": (error.get("message") or response.text)[:160],
                "worker_peak_growth_mib": round(growth_mib, 1) if growth_mib is not None else None}
        cases.append(case)
        if response.status_code not in expected:
            problems.append(f"{name}: {response.status_code} {response.text[:200]}")
        elif refused_by == HANDLER and not (error.get("field") == "image" and error.get("type")
                                            and isinstance(error.get("message"), str) and error["message"]):
            problems.append(f"{name}: refused without our JSON error naming the image field: {response.text[:200]}")
        elif refused_by == FRONTEND and error:
            problems.append(f"{name}: refused by the handler, so the worker received a body over max_request_size: "
                            f"{response.text[:200]}")
        if seconds > MAX_REFUSAL_S:
            problems.append(f"{name}: took {seconds:.2f} s")
        if growth_mib is not None and (not big or refused_by == FRONTEND) and growth_mib > 32:
            problems.append(f"{name}: worker peak memory grew {growth_mib:.0f} MiB: something was decoded")
    pid_after = server.ready_pid()
    if pid_after != pid:
        problems.append(f"the worker changed ({pid} -> {pid_after})")
    next_request(server, problems)
    # None when no peak could be read (clear_refs refused): not a growth of 0.
    small_growth = [c["worker_peak_growth_mib"] for c in cases
                    if not c["big_body"] and c["worker_peak_growth_mib"] is not None]
    return {"tried": len(cases), "refused_4xx": sum(400 <= c["status"] < 500 for c in cases),
            "max_seconds": max(c["seconds"] for c in cases),
            "max_worker_peak_growth_mib_small_bodies": max(small_growth) if small_growth else None,
            "worker_pid_unchanged": pid_after == pid, "cases": cases, "problems": problems}




# -- fuzzing the running server ------------------------------------------------------------------------------

_RAW = "\x00raw:"  # marks a JSON token inserted verbatim (NaN, huge numbers, deep nesting)


def _raw(text: str) -> str:
    return f"{_RAW}{text}"


def _dump(value: Any) -> str:
    """json.dumps, with _raw(...) strings replaced by their verbatim text."""
    tokens: list[str] = []

    def swap(item: Any) -> Any:
        if isinstance(item, str) and item.startswith(_RAW):
            tokens.append(item[len(_RAW):])
            return f"@@RAW{len(tokens) - 1}@@"
        if isinstance(item, dict):
            return {key: swap(v) for key, v in item.items()}
        if isinstance(item, list):
            return [swap(v) for v in item]
        return item

    text = json.dumps(swap(value))
    for index, token in enumerate(tokens):
        text = text.replace(f'"@@RAW{index}@@"', token, 1)
    return text


class BodyFuzzer:
    """A seeded generator of request bodies, from valid to hostile, as (kind, bytes, content type)."""

    KINDS = (("valid", 14), ("bad_value", 34), ("structure", 10), ("random_json", 8), ("deep", 6),
             ("text", 10), ("bytes", 8), ("image", 6), ("content_type", 4), ("kserve", 8))

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.small_images = [b64(image_bytes(w, h, fmt)) for (w, h, fmt) in
                             ((16, 16, "PNG"), (48, 32, "JPEG"), (40, 64, "WEBP"), (128, 96, "PNG"))]
        self.deep_depths = iter(range(850, 1010))
        self.hostile_image_values = [value for _, value, _, _ in hostile_images() if not (
            isinstance(value, str) and len(value) > MIB)]

    def text(self, max_len: int = 60) -> str:
        rng = self.rng
        alphabets = ["abcdefghijklmnopqrstuvwxyz ", "日本語の猫が走る ", "😀🦊🌊🎬 ", "\u202e\u200b\u00ad\ufeff",
                     "\x00\x01\x1f\x7f", "\ud800\udfff\udbff", "'\"\\{}[]<>%$;", "Ω≈ç√∫˜µ≤≥÷"]
        weights = [20, 3, 3, 1, 1, 1, 2, 2]
        alphabet = rng.choices(alphabets, weights)[0]
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))

    def valid(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"prompt": "a " + self.text(40)}
        if rng.random() < 0.6:
            width, height = rng.choice([(128, 128), (96, 128), (128, 96), (64, 64), (32, 128), (128, 32), (32, 32)])
            body.update(width=width, height=height)
        options = {
            "negative_prompt": lambda: self.text(30) if rng.random() < 0.8 else "",
            "num_frames": lambda: rng.choice([1, 5, 9]),
            "fps": lambda: rng.randint(1, 60),
            "num_inference_steps": lambda: rng.choice([1, 2]),
            "guidance_scale": lambda: rng.choice([0, 1, 1.0, 5.0, 20, rng.uniform(0, 20)]),
            "seed": lambda: rng.choice([0, 1, 2**63 - 1, rng.randrange(2**63)]),
            "output": lambda: rng.choice(["url", "inline", "mp4"]),
            "stream": lambda: rng.random() < 0.3,
            "image": lambda: rng.choice(self.small_images) if rng.random() < 0.7 else
            "data:image/png;base64," + self.small_images[0],
        }
        for name, make in options.items():
            if rng.random() < 0.35:
                body[name] = make()
        if body.get("stream") and body.get("output") == "mp4":
            body["output"] = "inline"
        for name in rng.sample(FIELDS, 2) if rng.random() < 0.1 else ():
            body.setdefault(name, None)  # null means absent
        return body

    def hostile_value(self) -> Any:
        rng = self.rng
        pool = [
            None, True, False, 0, -1, 1, 2, 3, 5, 8, 9, 10, 13, 31, 32, 33, 64, 96, 127, 128, 129, 160, 256, 4096,
            2**31, 2**53 + 1, 2**63, 2**64, -2**63, 10**30, 1.0, 1.5, -0.0, 0.1, 1e-308, 5e-324, 1e308, -1e308,
            _raw("NaN"), _raw("Infinity"), _raw("-Infinity"), _raw("1e999"), _raw("-1e999"), _raw("1" * 5000),
            _raw("1" * 4300), _raw("0." + "1" * 5000), _raw("1E+400"), _raw("-0"),
            "", " ", "128", "0x80", "１２８", "1e3", "true", "null", "NaN", "url", "URL", "inline ", "mp4\x00",
            "x" * 4001, "x" * 4000, "\x00", "\ud800", "a\udfffb", "😀" * 10, "\u202eevil", "<script>alert(1)</script>",
            "'; DROP TABLE videos; --", "{{7*7}}", "%s%s%n", "../../etc/passwd", "http://169.254.169.254/",
            "s3://bucket/key", "file:///etc/passwd", "data:image/png;base64,", "data:,", [], [128], [[]], {}, {"a": 1},
            {"width": 128}, [None] * 100, list(range(1000)), {"x" * 100: "y"},
        ]
        return rng.choice(pool)

    def kserve_body(self) -> dict[str, Any]:
        """A KServe v1 or v2 body (handler/envelopes.py), well-formed or broken in one place."""
        rng = self.rng
        request: dict[str, Any] = self.valid()
        if rng.random() < 0.3:
            request[rng.choice(FIELDS)] = self.hostile_value()
        broken = rng.random() < 0.5
        if rng.random() < 0.5:
            instances: Any = [request]
            extra: dict[str, Any] = {}
            if broken:
                choice = rng.randrange(4)
                instances = {0: request, 1: [], 2: [request, request], 3: self.hostile_value()}[choice]
                extra = {"signature_name": "serving_default"} if rng.random() < 0.3 else {}
            return {"instances": instances, **extra}
        item: dict[str, Any] = {"name": "request", "datatype": "BYTES", "shape": [1],
                                "data": [_dump(request) if rng.random() < 0.8 else request]}
        body: dict[str, Any] = {"inputs": [item]}
        if rng.random() < 0.5:
            body["id"] = self.text(20)
        if broken:
            choice = rng.randrange(6)
            if choice == 0:
                item[rng.choice(["name", "datatype", "shape", "data"])] = self.hostile_value()
            elif choice == 1:
                item.pop(rng.choice(["name", "datatype", "shape"]))
            elif choice == 2:
                item["data"] = [_dump(request)] * 2
            elif choice == 3:
                body["inputs"] = rng.choice([[], [item, item], self.hostile_value()])
            elif choice == 4:
                body["id"] = self.hostile_value()
            else:
                body[rng.choice(["parameters", "outputs"])] = {"x": 1}
        return body

    def nested(self, depth: int, kind: str) -> str:
        return _raw(("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth))

    def case(self) -> tuple[str, bytes, str | None, dict[str, Any] | None]:
        """(kind, body bytes, content type, form fields for multipart/urlencoded or None)."""
        rng = self.rng
        kind = rng.choices([k for k, _ in self.KINDS], [w for _, w in self.KINDS])[0]
        content_type: str | None = "application/json"
        if kind == "valid":
            return kind, _dump(self.valid()).encode(), content_type, None
        if kind == "bad_value":
            body = self.valid()
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                body[rng.choice(FIELDS)] = self.hostile_value()
            return kind, _dump(body).encode(), content_type, None
        if kind == "structure":
            body = self.valid()
            choice = rng.randrange(7)
            if choice == 0:
                body.pop("prompt", None)
            elif choice == 1:
                body[rng.choice(["promt", "Prompt", "width ", "steps", "instances", "body", "data", "", "\ud800",
                                 "x" * 300])] = 1
            elif choice == 2:
                body.pop("height", None)
                body["width"] = 128
            elif choice == 3:
                return kind, b'{"prompt": "x", "prompt": ' + _dump(self.hostile_value()).encode() + b"}", content_type, None
            elif choice == 4:
                body = {name: self.hostile_value() for name in rng.sample(FIELDS, rng.randint(1, len(FIELDS)))}
            elif choice == 5:
                body = {f"k{i}": i for i in range(rng.choice([50, 1000, 5000]))} | {"prompt": "x"}
            else:
                body = {"instances": [body]} if rng.random() < 0.5 else {"inputs": [{"name": "x", "data": body}]}
            return kind, _dump(body).encode(), content_type, None
        if kind == "kserve":
            return kind, _dump(self.kserve_body()).encode(), content_type, None
        if kind == "random_json":
            return kind, _dump(self.random_json(4)).encode(), content_type, None
        if kind == "deep":
            depth = next(self.deep_depths, None) or rng.randint(850, 1010)
            shape = rng.choice(["list", "dict"])
            where = rng.choice(["width", "num_frames", "guidance_scale", "output", "stream", "seed", "prompt", "image",
                                "body", "unknown"])
            if where == "body":
                return kind, self.nested(depth, shape)[len(_RAW):].encode(), content_type, None
            body = {"prompt": "deep", **SMALL}
            if where == "width":
                body["height"] = 128
            body["zzz" if where == "unknown" else where] = self.nested(depth, shape)
            return kind, _dump(body).encode(), content_type, None
        if kind == "text":
            valid = _dump(self.valid())
            choice = rng.randrange(9)
            text = {
                0: valid[: rng.randrange(max(1, len(valid)))],
                1: valid + rng.choice(["}", "]", ",", " x", "\x00"]),
                2: rng.choice(["NaN", "Infinity", "null", "true", "0", '"string"', "[]", "{}", ""]),
                3: "\ufeff" + valid,
                4: valid.replace('"', "'"),
                5: '{"prompt": "x", "width": ' + "9" * rng.choice([20, 400, 4301, 10000]) + ', "height": 128}',
                6: json.dumps(valid),  # JSON text of a JSON string holding a request
                7: " " * rng.randint(0, 1000) + "\n\t",
                8: "".join(rng.choice('{}[]":,0123456789.eE+-truefalsnul \\u') for _ in range(rng.randint(1, 300))),
            }[choice]
            data = text.encode("utf-16" if rng.random() < 0.05 else "utf-8", errors="surrogatepass")
            return kind, data, content_type, None
        if kind == "bytes":
            data = rng.randbytes(rng.choice([0, 1, 7, 64, 1024, 65536]))
            return kind, data, rng.choice(["application/json", None, "application/octet-stream", "text/plain"]), None
        if kind == "image":
            body = {"prompt": "a hostile image", **SMALL}
            body["image"] = rng.choice(self.hostile_image_values + [self.hostile_value(), b64(rng.randbytes(500)),
                                                                    "data:image/png;base64," + b64(rng.randbytes(300))])
            return kind, _dump(body).encode(), content_type, None
        # content_type: a valid request under other content types and encodings
        body = self.valid()
        choice = rng.randrange(5)
        if choice == 0:
            return kind, _dump(body).encode(), "text/plain", None
        if choice == 1:
            return kind, _dump(body).encode(), "application/octet-stream", None
        if choice == 2:
            return kind, _dump(body).encode(), None, None
        # Form fields as bytes: a lone surrogate goes out as the (invalid) UTF-8 it would be.
        form = {k: str(v).encode("utf-8", "surrogatepass") for k, v in body.items()}
        return kind, b"", "application/x-www-form-urlencoded" if choice == 3 else "multipart/form-data", form

    def deep_sweep(self) -> Iterator[tuple[str, bytes, str | None, None]]:
        """Nesting around Python's recursion limit (1000), where the stack depths of TorchServe's
        json decoding and of the handler differ: a field 988 deep once made a 500."""
        for depth in range(960, 1001):
            for where in ("width", "guidance_scale", "output", "body"):
                if where == "body":
                    yield "deep", self.nested(depth, "list")[len(_RAW):].encode(), "application/json", None
                    continue
                body = {"prompt": "deep", **SMALL, where: self.nested(depth, "list")}
                yield "deep", _dump(body).encode(), "application/json", None

    def cases(self, count: int) -> Iterator[tuple[str, bytes, str | None, dict[str, Any] | None]]:
        """The deep sweep first, then seeded random cases: ``count`` in all."""
        sweep = self.deep_sweep()
        for _ in range(count):
            yield next(sweep, None) or self.case()

    def random_json(self, depth: int) -> Any:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.4:
            return rng.choice([None, True, False, rng.randint(-10**6, 10**6), rng.uniform(-1e6, 1e6), self.text(20),
                               self.hostile_value()])
        if rng.random() < 0.5:
            return [self.random_json(depth - 1) for _ in range(rng.randint(0, 4))]
        keys = list(FIELDS) + ["x", "", "instances", "body"]
        return {rng.choice(keys): self.random_json(depth - 1) for _ in range(rng.randint(0, 5))}


class Oracle:
    """The parser run in-process with the fuzz server's own config: what the server must answer."""

    def __init__(self, config_path: Path):
        from handler.config import load_handler_config
        from handler.variants import TI2V_5B

        config = load_handler_config(yaml.safe_load(config_path.read_text()), REPO_ROOT)
        self.spec = TI2V_5B
        self.defaults = config.defaults_for(TI2V_5B.defaults)
        self.limits = config.limits

    def expect(self, data: bytes, content_type: str | None) -> dict[str, Any]:
        """The status (and field, or request) the server must answer, and in which protocol's
        wrapping: the handler opens KServe v1/v2 bodies itself (handler/envelopes.py)."""
        from handler.envelopes import PLAIN, unwrap
        from handler.errors import WanError
        from handler.request import parse_request

        body: Any = data
        if content_type == "application/json":
            # TorchServe's Python side json-decodes application/json bodies itself and hands the
            # handler the value (a JSON string arrives as text, which the handler reads as JSON).
            try:
                body = json.loads(data.decode("utf-8"))
            except Exception:  # noqa: BLE001 - exactly what TorchServe catches
                body = data
        # As handler/wan_handler.py: the envelope (if any) opened, the request parsed, its output
        # checked against the envelope (as WanService.parse).
        protocol = PLAIN.protocol
        try:
            envelope, inner = unwrap(body, self.limits)
            protocol = envelope.protocol
            if isinstance(inner, WanError):
                raise inner
            request = parse_request(inner, self.spec, self.defaults, self.limits, storage_configured=True)
            envelope.check_output(request)
        except WanError as error:
            return {"status": error.http_status, "field": error.field, "message": error.message,
                    "protocol": protocol.value}
        except Exception as exc:  # noqa: BLE001 - a parser bug: the server would answer 500
            return {"status": 500, "field": None, "message": f"the parser raised {type(exc).__name__}: {exc}",
                    "protocol": protocol.value}
        return {"status": 200, "request": request, "protocol": protocol.value}


def run_fuzz(server: Server, count: int, seed: int, oracle: Oracle, check_every: int = 50) -> dict[str, Any]:
    """``count`` generated bodies against the server: never a 5xx, never a worker restart, each
    answer the one the in-process parser gives, every 200 a valid video."""
    problems: list[str] = []
    pid, _ = server.wait_ready()
    if pid is None:
        return {"problems": ["no READY worker"]}
    fuzzer = BodyFuzzer(seed)
    by_status: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    mismatches = five_xx = not_json = bad_video = restarts = 0
    seconds_4xx: list[float] = []
    session = local_session()
    started = time.monotonic()

    def note(text: str) -> None:
        if len(problems) < 30:
            problems.append(text)

    for index, (kind, data, content_type, form) in enumerate(fuzzer.cases(count)):
        by_kind[kind] += 1
        sent = time.monotonic()
        try:
            headers = server.headers()
            if form is not None and content_type == "multipart/form-data":
                response = session.post(server.predictions_url, files={k: (None, v) for k, v in form.items()},
                                        headers=headers, timeout=REQUEST_TIMEOUT_S)
            elif form is not None:
                response = session.post(server.predictions_url, data=form, headers=headers, timeout=REQUEST_TIMEOUT_S)
            else:
                response = server.post(data=data, content_type=content_type, session=session)
        except requests.RequestException as exc:
            five_xx += 1
            note(f"#{index} {kind}: no answer ({type(exc).__name__}: {str(exc)[:120]}) for {data[:200]!r}")
            continue
        seconds = time.monotonic() - sent
        status = response.status_code
        by_status[str(status)] += 1
        if status >= 500:
            five_xx += 1
            note(f"#{index} {kind}: {status} {response.text[:200]} for {data[:300]!r} ({content_type})")
            continue
        # The protocol the answer came back in (KServe v1/v2 wrapping or plain), if it is JSON.
        answered_as = None
        if response.headers.get("Content-Type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                answered_as = answer_protocol(response.json())
        if 400 <= status < 500:
            seconds_4xx.append(seconds)
            try:
                error = unwrap_answer(response.json())["error"]
                if isinstance(error, str):
                    # The Open Inference Protocol's error (a v2 request): {"error": "<message>"}.
                    assert error
                    error = {"message": error}
                else:
                    assert isinstance(error["message"], str) and error["message"] and "type" in error and "field" in error
            except (ValueError, KeyError, TypeError, AssertionError):
                if not (status == 413 and "code" in response.text):  # TorchServe's own 413 has its own shape
                    not_json += 1
                    note(f"#{index} {kind}: {status} without a JSON error body: {response.text[:200]}")
                error = {}
        else:
            error = {}
        expected = oracle.expect(data, content_type) if form is None else None
        if expected is not None:
            tolerated = (
                # The tokenizer's 512-token limit is checked by the server, not by parse_request.
                (expected["status"] == 200 and status == 400 and "tokens" in error.get("message", ""))
                # TorchServe json-decodes application/json at a shallower stack than the handler:
                # nesting that is "too deep" for one may still parse in the other; both are 400.
                or (status == 400 and expected["status"] == 400 and "nested too deeply" in
                    (expected["message"] + error.get("message", "")))
            )
            if not tolerated:
                if status != expected["status"]:
                    mismatches += 1
                    note(f"#{index} {kind}: server {status} {response.text[:160]!r}, parser says {expected['status']} "
                         f"{expected.get('message', '')[:120]!r} for {data[:300]!r}")
                # (A v2 error carries its message only, as the protocol has it: no field to compare.)
                elif (status == 400 and expected["field"] is not None and "field" in error
                      and error.get("field") != expected["field"]):
                    mismatches += 1
                    note(f"#{index} {kind}: server names field {error.get('field')!r}, parser {expected['field']!r}")
            if (status == 200 or error) and answered_as is not None and answered_as != expected["protocol"]:
                mismatches += 1
                note(f"#{index} {kind}: answered as {answered_as}, the request came as {expected['protocol']}: "
                     f"{response.text[:160]!r}")
        if status == 200:
            request = expected.get("request") if expected else None
            expect = ({"width": request.width, "height": request.height, "num_frames": request.num_frames}
                      if request is not None else {})
            output = request.output.value if request is not None else "url"
            issue = video_problem(response, expect, output)
            if issue:
                bad_video += 1
                note(f"#{index} {kind}: 200 with a bad video: {issue}")
        if (index + 1) % check_every == 0 or index == count - 1:
            now_pid = server.ready_pid()
            if now_pid != pid:
                restarts += 1
                note(f"the worker changed between bodies {index + 1 - check_every} and {index}: {pid} -> {now_pid}")
                pid, _ = server.wait_ready(120.0)
    session.close()
    return {"bodies": count, "seconds": round(time.monotonic() - started, 1), "by_kind": dict(sorted(by_kind.items())),
            "by_status": dict(sorted(by_status.items())), "five_xx": five_xx, "not_json_errors": not_json,
            "oracle_mismatches": mismatches, "bad_videos": bad_video, "worker_restarts": restarts,
            "latency_4xx_s": stats(seconds_4xx), "problems": problems}



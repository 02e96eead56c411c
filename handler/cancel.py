"""TorchServe's cancellation: the handler asks the job service whether a running job is still wanted.

TorchServe cannot tell a handler that its client went away (a closed connection is noticed only
when the answer is written, after the whole generation). The job service can: it knows when a job
was cancelled or deleted. So the job service's worker names the job in the ``X-Wan-Job-Id`` header
and the handler asks ``GET <WAN_CANCEL_URL with {job_id}>`` (``{"id", "wanted": bool}``) with the
data-plane token, and stops at the next denoising step once the answer is ``wanted: false``.

Rules (issue #12): at most one question a second per request, each with a short timeout, asked in a
thread of its own so that no denoising step ever waits for the network; a failed question (job
service down, timeout, 5xx, a token not there yet) never cancels: only an explicit ``false`` does.

Configured by the environment (the operator's, like storage): ``WAN_CANCEL_URL``,
``WAN_CANCEL_TOKEN`` or ``WAN_CANCEL_TOKEN_FILE`` (read at each question: the local job service
writes it after TorchServe has started, and a mounted Secret may be rotated).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from handler.errors import ConfigError, InvalidRequest

log = logging.getLogger(__name__)

JOB_ID_HEADER = "X-Wan-Job-Id"
# The job service's ids (video_<hex>); anything else never reaches a URL.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The job service is an address inside the deployment: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class CancelCheckConfig:
    """Where and how the handler asks whether a job is still wanted."""

    # With ``{job_id}`` where the job's id goes.
    url_template: str
    token: str | None = None
    token_file: Path | None = None
    # At most one question per this many seconds per request (the job service's load: one small
    # query a second per running video).
    interval_s: float = 1.0
    # A question that takes longer is a failed one (never a cancel); it runs beside the steps.
    timeout_s: float = 2.0

    def __post_init__(self):
        if "{job_id}" not in self.url_template or not self.url_template.startswith(("http://", "https://")):
            raise ConfigError(f"WAN_CANCEL_URL must be an http(s) URL with {{job_id}} in it, got {self.url_template!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CancelCheckConfig | None:
        """None without ``WAN_CANCEL_URL``: no check, jobs run to their end."""
        url = env.get("WAN_CANCEL_URL", "").strip()
        if not url:
            return None
        token_file = env.get("WAN_CANCEL_TOKEN_FILE", "").strip()
        return cls(url, token=env.get("WAN_CANCEL_TOKEN", "").strip() or None,
                   token_file=Path(token_file) if token_file else None)

    def read_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError:
            return None  # not written yet (the local job service starts after TorchServe)

    def check_for(self, header_value: str | None) -> StillWantedCheck | None:
        """The cancellation hook for one request, from its ``X-Wan-Job-Id`` header (none: no job
        service sent it, nothing to ask). A malformed id is the request's fault: a 400."""
        if header_value is None:
            return None
        job_id = header_value.strip()
        if not _JOB_ID.fullmatch(job_id):
            raise InvalidRequest(f"header {JOB_ID_HEADER} must be a job id (letters, digits, '_' or '-', "
                                 "at most 128)", field=JOB_ID_HEADER)
        return StillWantedCheck(self, job_id)


class StillWantedCheck:
    """``WanService.handle``'s ``cancelled`` hook for one job: True once the job service said the
    job is no longer wanted. Calling it never blocks: it starts a question in the background when
    the last one is ``interval_s`` old and answers from what is known."""

    def __init__(self, config: CancelCheckConfig, job_id: str, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.job_id = job_id
        self.url = config.url_template.replace("{job_id}", job_id)
        self._clock = clock
        self._lock = threading.Lock()
        self._unwanted = False
        self._asking = False
        self._last_asked: float | None = None
        self.questions = 0  # how many were asked (tests, logs)
        self.failures = 0

    def __call__(self) -> bool:
        with self._lock:
            if self._unwanted:
                return True
            now = self._clock()
            if not self._asking and (self._last_asked is None or now - self._last_asked >= self.config.interval_s):
                self._asking = True
                self._last_asked = now
                self.questions += 1
                threading.Thread(target=self._ask, name=f"still-wanted-{self.job_id}", daemon=True).start()
            return self._unwanted

    def wait_idle(self, timeout_s: float) -> None:
        """Wait for a question in flight to end (tests)."""
        deadline = time.monotonic() + timeout_s
        while self._asking and time.monotonic() < deadline:
            time.sleep(0.01)

    def _ask(self) -> None:
        unwanted = False
        try:
            unwanted = self._ask_once()
        except Exception as exc:  # noqa: BLE001 - a failed question never cancels, and never kills a worker
            self.failures += 1
            log.warning("could not ask whether job %s is still wanted (%s): it runs on", self.job_id, exc)
        finally:
            with self._lock:
                self._unwanted = self._unwanted or unwanted
                self._asking = False
        if unwanted:
            log.info("job %s is no longer wanted: stopping at the next step", self.job_id)

    def _ask_once(self) -> bool:
        token = self.config.read_token()
        if token is None:
            raise RuntimeError("no data-plane token (WAN_CANCEL_TOKEN or WAN_CANCEL_TOKEN_FILE)")
        request = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {token}",
                                                            "Accept": "application/json"})
        try:
            with _OPENER.open(request, timeout=self.config.timeout_s) as response:
                answer = json.loads(response.read(64 * 1024))
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code} from {self.url}") from None
        # Only an explicit false about this very job cancels.
        if not isinstance(answer, dict) or answer.get("id") != self.job_id or not isinstance(answer.get("wanted"), bool):
            raise RuntimeError(f"unexpected answer from {self.url}: {str(answer)[:200]}")
        return answer["wanted"] is False

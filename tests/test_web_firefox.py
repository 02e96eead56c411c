"""The experience centre page in Firefox: Debian's firefox-esr, driven over WebDriver BiDi.

Debian packages no geckodriver, and nothing is downloaded at test time: Firefox speaks WebDriver
BiDi itself (--remote-debugging-port), so a few BiDi commands over one WebSocket drive it. The
Chromium scenarios (tests/test_web_page.py) cover the page in depth; this one checks what could
differ in another engine: a person makes a video and it plays, at desktop and phone widths, with
nothing logged as an error.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from websocket import WebSocketException, create_connection

FIREFOX = "/usr/bin/firefox-esr"
SCREENSHOTS = Path(__file__).parent / "screenshots"
# As in tests/test_web_page.py: a loaded 2-core machine, behind the other scenarios' jobs.
JOB_TIMEOUT_S = 180
UI_TIMEOUT_S = 20
# No update checks, telemetry or first-run pages: nothing leaves 127.0.0.1.
PREFS = {
    "app.update.auto": False, "app.update.enabled": False, "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore", "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False, "browser.aboutwelcome.enabled": False,
    "network.captive-portal-service.enabled": False, "network.connectivity-service.enabled": False,
    "media.autoplay.default": 0, "extensions.update.enabled": False,
}


class Firefox:
    """One headless Firefox and its single tab, over WebDriver BiDi."""

    def __init__(self, profile: Path):
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items()))
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.process = subprocess.Popen(
            [FIREFOX, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", "0",
             "--remote-allow-hosts", "127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            self._connect()
        except BaseException:
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    def _connect(self) -> None:
        url = None
        deadline = time.monotonic() + 60
        # Firefox prints the address it listens on; port 0 lets it pick a free one.
        while url is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise AssertionError(f"firefox-esr exited with {self.process.returncode}")
            match = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            url = match and match.group(1)
        assert url, "firefox-esr never said where WebDriver BiDi listens"
        self.ws = create_connection(url.rstrip("/") + "/session", timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.logs: list[dict] = []
        self.command("session.new", capabilities={})
        self.command("session.subscribe", events=["log.entryAdded"])
        self.context = self.command("browsingContext.getTree")["contexts"][0]["context"]

    def command(self, method: str, **params):
        command_id = next(self.ids)
        self.ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("type") == "event":
                if message["method"] == "log.entryAdded":
                    self.logs.append(message["params"])
                continue
            if message.get("id") != command_id:
                continue
            if message.get("type") == "error":
                raise AssertionError(f"{method}: {message.get('error')}: {message.get('message')}")
            return message["result"]

    def navigate(self, url: str) -> None:
        self.command("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.command("script.evaluate", expression=expression, awaitPromise=True,
                              target={"context": self.context}, resultOwnership="none")
        if result["type"] == "exception":
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']['text']}")
        return _value(result["result"])

    def wait(self, expression: str, timeout: float = UI_TIMEOUT_S, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        self.screenshot("firefox-timeout")
        raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}")

    def viewport(self, width: int, height: int) -> None:
        self.command("browsingContext.setViewport", context=self.context,
                     viewport={"width": width, "height": height})

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        data = self.command("browsingContext.captureScreenshot", context=self.context, origin="document")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[dict]:
        return [entry for entry in self.logs if entry.get("level") == "error"]

    def quit(self) -> None:
        # Already gone is fine: the process is ended below either way.
        with contextlib.suppress(AssertionError, OSError, WebSocketException):
            self.command("browser.close")
        self.ws.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _value(remote: dict):
    """A BiDi remote value as Python (the few types the test reads)."""
    kind = remote["type"]
    if kind in ("string", "number", "boolean"):
        return remote["value"]
    if kind in ("undefined", "null"):
        return None
    if kind == "array":
        return [_value(item) for item in remote.get("value", [])]
    if kind == "object":
        return {key: _value(item) for key, item in remote.get("value", [])}
    return remote


@pytest.fixture(scope="module")
def firefox(tmp_path_factory):
    if not os.access(FIREFOX, os.X_OK):
        pytest.fail(f"{FIREFOX} is missing: `make test` installs Debian's firefox-esr (make browser)")
    browser = Firefox(tmp_path_factory.mktemp("firefox-profile"))
    try:
        yield browser
    finally:
        browser.quit()


def test_firefox_makes_a_video_that_plays_and_fits_a_phone(firefox, jobs_service):
    key = jobs_service.new_key(f"firefox-{uuid.uuid4().hex[:8]}")["key"]
    firefox.navigate(jobs_service.url + "/")
    firefox.wait("document.title === 'Wan2.2 experience centre'", what="the page's title")
    firefox.wait("!document.getElementById('key-section').hidden", what="the API key form")
    firefox.js(f"document.getElementById('key-input').value = {json.dumps(key)};"
               "document.getElementById('key-form').requestSubmit()")
    firefox.wait("document.getElementById('video-form').offsetParent !== null", what="the form")

    prompt = f"a red fox running through snow {uuid.uuid4().hex[:6]}"
    firefox.js(f"const p = document.getElementById('prompt'); p.value = {json.dumps(prompt)};"
               "p.dispatchEvent(new Event('input', {bubbles: true}));"
               "document.getElementById('submit').click()")
    card = (f"[...document.querySelectorAll('#videos li.video')]"
            f".find(c => c.querySelector('.prompt').innerText === {json.dumps(prompt)})")
    firefox.wait(f"{card} !== undefined", what="the new video's card")
    status = f"{card}.querySelector('.status').innerText"
    firefox.wait(f"{status}.startsWith('Ready')", JOB_TIMEOUT_S, what="the video to be ready")
    assert "100 %" in firefox.js(f"{card}.querySelector('.progress-text').innerText")
    video_id = firefox.js(f"{card}.dataset.id")
    api = requests.get(f"{jobs_service.url}/v1/videos/{video_id}", headers={"Authorization": f"Bearer {key}"},
                       timeout=30).json()
    assert f"seed {api['seed']}" in firefox.js(f"{card}.querySelector('.params').innerText")

    # Firefox decodes H.264 with the system's libavcodec (make browser installs it).
    media = firefox.js(f"{card}.querySelector('.media').innerText")
    assert "could not be loaded" not in media, "Firefox could not play the MP4: is libavcodec installed?"
    player = f"{card}.querySelector('video')"
    firefox.wait(f"{player}.duration > 0", what="the video's duration (Firefox decoding the MP4)")
    firefox.js(f"{player}.muted = true; {player}.play()")
    firefox.wait(f"{player}.currentTime > 0", what="the video to play")
    firefox.screenshot("firefox-desktop")

    firefox.viewport(360, 740)
    firefox.wait("window.innerWidth === 360", what="the phone width")
    assert firefox.js("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), \
        "horizontal scrolling at 360 px in Firefox"
    firefox.screenshot("firefox-phone")
    assert firefox.errors() == [], f"the page logged errors in Firefox: {firefox.errors()}"

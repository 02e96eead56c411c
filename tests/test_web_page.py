"""The experience centre page (jobs/web/) in a real browser against a live job service.

Debian's headless Chromium, driven by Selenium through Debian's chromedriver (nothing is
downloaded: the driver's path is given, and Selenium Manager is told to stay offline). The job
service is the `jobs_service` fixture: the real API, worker, PostgreSQL and TorchServe on the tiny
model. Every scenario writes a screenshot to tests/screenshots/ for people to look at, and fails
on any JavaScript or console error the page logged. Assertions are on what a person sees: text,
the progress bar, the video element; the API is used to set up and to confirm what the page says.
"""

from __future__ import annotations

import base64
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from scripts.serve import REPO_ROOT, free_ports
from tests.harness.jobs import JobService, Postgres, jobs_config, own_job_service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).parent / "screenshots"
# The page lists this many videos per page (PAGE_SIZE in jobs/web/app.js).
PAGE_SIZE = 10
# Long enough for a tiny-model job on a shared 2-core machine (behind the earlier scenarios' long
# jobs: seen waiting over 90 s in the queue with the machine's load at 5), short enough to fail in time.
JOB_TIMEOUT_S = 180
UI_TIMEOUT_S = 20
# A job that keeps the worker busy while another one waits in the queue: the tiny model's
# largest size and frame count within its limits (config/models/tiny-ti2v.yaml), most steps.
# Status lines of a video that is still waiting or being made.
ACTIVE_TEXT = re.compile(r"^(Queued|Making it)")
LONG_JOB = {"size": "512x512", "num_frames": 65, "num_inference_steps": 20}


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: `make test` installs Debian's chromium and chromium-driver"
    return None


# ---------------------------------------------------------------------------------------------
# The browser


class Page:
    """One browser tab on the page, with what a test needs to act and look as a person would."""

    def __init__(self, driver: webdriver.Chrome, base_url: str, name: str):
        self.driver = driver
        self.base_url = base_url
        self.name = name
        # Tests that provoke a 4xx (or a refused connection) on purpose say so: Chromium logs every
        # failed request.
        self.expected_http_errors: set[int] = set()
        self.expected_network_errors: set[str] = set()

    def open(self) -> None:
        self.driver.get(self.base_url + "/")

    def find(self, css: str, within=None):
        return (within or self.driver).find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str, within=None):
        return (within or self.driver).find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, timeout: float = UI_TIMEOUT_S, message: str = ""):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(lambda _: condition())
        except TimeoutException:
            self.screenshot("timeout")
            raise AssertionError(f"timed out after {timeout} s waiting for: {message}") from None

    def visible(self, css: str) -> bool:
        elements = self.find_all(css)
        return bool(elements) and elements[0].is_displayed()

    def sign_in(self, key: str) -> None:
        self.wait(lambda: self.visible("#key-input"), message="the API key form")
        self.find("#key-input").send_keys(key, Keys.ENTER)
        self.wait(lambda: self.visible("#video-form"), message="the form after the key was accepted")
        self.wait_for_history()

    def wait_for_history(self) -> None:
        # The list is loaded when either a card or the empty-state line is shown.
        self.wait(lambda: self.find_all("#videos li.video") or self.visible("#videos-empty"),
                  message="the history to load")

    def set_value(self, css: str, value: str) -> None:
        element = self.find(css)
        element.clear()
        element.send_keys(value)

    def open_advanced(self) -> None:
        details = self.find("#advanced")
        if not details.get_attribute("open"):
            self.find("#advanced summary").click()

    def cards(self):
        return self.find_all("#videos li.video")

    def card_for(self, prompt: str):
        self.wait(lambda: any(self.find(".prompt", c).text == prompt for c in self.cards()),
                  message=f"a video card for {prompt!r}")
        return next(c for c in self.cards() if self.find(".prompt", c).text == prompt)

    def status_of(self, card) -> str:
        return self.find(".status", card).text

    def wait_for_status(self, card, text: str, timeout: float = JOB_TIMEOUT_S) -> None:
        self.wait(lambda: self.status_of(card).startswith(text), timeout,
                  message=f"status {text!r} (now {self.status_of(card)!r})")

    def error_next_to(self, field: str) -> str:
        return self.find(f"#{field}-error").text

    def drop_file(self, name: str, content: bytes, mime_type: str) -> None:
        """Drop a file on the image area, as a drag from the desktop delivers it."""
        self.driver.execute_script("""
            const [name, b64, type, target] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type}));
            for (const kind of ['dragenter', 'dragover', 'drop']) {
              target.dispatchEvent(new DragEvent(kind, {dataTransfer: data, bubbles: true, cancelable: true}));
            }
        """, name, base64.b64encode(content).decode(), mime_type, self.find("#drop"))

    def record_progress_texts(self) -> None:
        """Keep every text the list's status and progress lines show, as a person watching would."""
        self.driver.execute_script("""
            window.__seen = [];
            const keep = () => {
              for (const el of document.querySelectorAll('#videos .status, #videos .progress-text')) {
                if (el.offsetParent !== null && window.__seen[window.__seen.length - 1] !== el.textContent) {
                  window.__seen.push(el.textContent);
                }
              }
            };
            new MutationObserver(keep).observe(document.getElementById('videos'),
              {subtree: true, childList: true, characterData: true, attributes: true});
        """)

    def seen_texts(self) -> list[str]:
        return self.driver.execute_script("return window.__seen")

    def no_horizontal_scroll(self) -> bool:
        return self.driver.execute_script(
            "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")

    def screenshot(self, suffix: str = "") -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{self.name}{'-' + suffix if suffix else ''}.png"
        # The whole page, not just the window: size the window to the document first.
        width = self.driver.execute_script("return window.innerWidth")
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": max(height, 600), "deviceScaleFactor": 1, "mobile": width < 600})
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
            if width < 600:
                self.phone()
        return path

    def phone(self) -> None:
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})

    def console_errors(self) -> list[dict]:
        errors = []
        for entry in self.driver.get_log("browser"):
            if entry["level"] != "SEVERE":
                continue
            if entry.get("source") == "network" and (
                any(f"status of {status}" in entry["message"] for status in self.expected_http_errors)
                or any(error in entry["message"] for error in self.expected_network_errors)
            ):
                continue
            errors.append(entry)
        return errors


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = _browser_missing()
    if missing:
        pytest.fail(missing)
    # Selenium Manager would fetch a driver or a browser if it were asked to find one: it is not
    # (the driver's path is given), and offline mode makes sure.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(driver, jobs_service, request):
    """A fresh visit: no key in storage, the console read before and checked after."""
    page = Page(driver, jobs_service.url.rstrip("/"), request.node.name.removeprefix("test_"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    page.open()
    driver.execute_script("localStorage.clear()")
    page.open()
    driver.get_log("browser")  # drop what the previous test left
    yield page
    page.screenshot()
    errors = page.console_errors()
    assert not errors, f"the page logged errors: {errors}"


# ---------------------------------------------------------------------------------------------
# The API, for setting up and for confirming what the page shows


class Api:
    def __init__(self, base_url: str, key: str):
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.session = requests.Session()
        self.session.trust_env = False  # 127.0.0.1 only, whatever proxy the caller has set
        self.session.headers["Authorization"] = f"Bearer {key}"

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, self.base_url + path, timeout=30, **kwargs)

    def create(self, **fields) -> dict:
        response = self.call("POST", "/v1/videos", json=fields)
        assert response.status_code == 200, response.text
        return response.json()

    def get(self, video_id: str) -> dict:
        return self.call("GET", f"/v1/videos/{video_id}").json()

    def videos(self) -> list[dict]:
        response = self.call("GET", "/v1/videos", params={"limit": 100})
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait_until_final(self, video_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            video = self.get(video_id)
            if video["status"] in ("completed", "failed", "cancelled"):
                return video
            time.sleep(0.25)
        raise AssertionError(f"{video_id} did not finish in {timeout} s: {video}")

    def cancel_active(self) -> None:
        for video in self.videos():
            if video["status"] in ("queued", "in_progress"):
                self.call("POST", f"/v1/videos/{video['id']}/cancel")


def new_user(jobs_service, name: str) -> Api:
    """A user of its own per test (unique name), so that no test sees another's videos."""
    created = jobs_service.new_key(f"{name}-{uuid.uuid4().hex[:8]}")
    key = created["key"] if isinstance(created, dict) else created
    return Api(jobs_service.url, key)


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------------------------------
# Scenarios


def test_make_a_video_and_watch_it(page, jobs_service):
    user = new_user(jobs_service, "watcher")
    page.sign_in(user.key)
    assert page.driver.title == "Wan2.2 experience centre"
    prompt = unique("a red fox running through snow")
    page.set_value("#prompt", prompt)
    page.open_advanced()
    # Enough steps to see the bar move step by step before it reaches the end.
    page.set_value("#num_inference_steps", "8")
    page.record_progress_texts()
    page.find("#submit").click()

    card = page.card_for(prompt)
    assert page.cards()[0] == card, "the new video is at the top of the list"
    page.wait_for_status(card, "Ready")
    seen = page.seen_texts()
    assert any(text.startswith("Queued · number") for text in seen), f"queue position never shown: {seen}"
    steps_seen = [text for text in seen if text.startswith("Step ") and " of 8" in text]
    assert any(not text.startswith(("Step 0 ", "Step 8 ")) for text in steps_seen), \
        f"no step between the first and the last was shown: {seen}"
    assert any("elapsed" in text for text in steps_seen), seen
    bar = page.find(".progress progress", card)
    assert bar.is_displayed() and bar.get_attribute("value") == "100"
    assert "100 %" in page.find(".progress-text", card).text

    video_id = card.get_attribute("data-id")
    api_video = user.get(video_id)
    assert api_video["status"] == "completed"
    assert f"seed {api_video['seed']}" in page.find(".params", card).text
    download = page.find("a.download", card)
    assert download.is_displayed() and download.text == "Download MP4"
    content = requests.get(download.get_attribute("href"), timeout=30)
    assert content.status_code == 200 and content.headers["Content-Type"].startswith("video/mp4")

    player = page.find("video", card)
    page.wait(lambda: (page.driver.execute_script("return arguments[0].duration", player) or 0) > 0,
              message="the video's duration")
    page.driver.execute_script("arguments[0].muted = true; arguments[0].play()", player)
    page.wait(lambda: page.driver.execute_script("return arguments[0].currentTime", player) > 0,
              message="the video to play")
    page.screenshot("desktop")


def test_a_bad_value_is_shown_next_to_its_field_and_nothing_is_queued(page, jobs_service):
    user = new_user(jobs_service, "typo")
    page.sign_in(user.key)
    page.set_value("#prompt", unique("a lighthouse in a storm"))
    page.open_advanced()

    # Before submission: the model's own limit, shown as the user leaves the field.
    page.set_value("#num_inference_steps", "500")
    page.find("#fps").click()
    assert page.error_next_to("num_inference_steps") == "Steps must be between 1 and 20."
    page.find("#submit").click()
    assert page.error_next_to("num_inference_steps") == "Steps must be between 1 and 20."
    assert page.driver.switch_to.active_element == page.find("#num_inference_steps")

    # After submission: a value the page does not judge itself (a seed past the server's range),
    # with the server's own message next to the field.
    page.set_value("#num_inference_steps", "4")
    assert page.error_next_to("num_inference_steps") == ""
    seed = "99999999999999999999"
    page.set_value("#seed", seed)
    page.expected_http_errors.add(400)
    page.find("#submit").click()
    page.wait(lambda: page.error_next_to("seed"), message="the server's message next to the seed")
    server = user.call("POST", "/v1/videos", json={"prompt": "x", "seed": int(seed)}).json()["error"]
    assert server["param"] == "seed"
    assert page.error_next_to("seed") == server["message"]
    assert page.find("#seed").get_attribute("aria-invalid") == "true"

    assert page.cards() == [] and page.visible("#videos-empty")
    assert user.videos() == [], "nothing is queued"


def test_cancel_a_queued_video(page, jobs_service):
    user = new_user(jobs_service, "canceller")
    # Keep the worker busy so that the page's video waits in the queue.
    busy = [user.create(prompt=unique("busy"), **LONG_JOB) for _ in range(2)]
    try:
        page.sign_in(user.key)
        prompt = unique("a paper boat on a river")
        page.set_value("#prompt", prompt)
        page.find("#submit").click()
        card = page.card_for(prompt)
        page.wait_for_status(card, "Queued · number", timeout=UI_TIMEOUT_S)
        assert "in the queue" in page.find(".progress-text", card).text
        cancel = page.find("button.cancel", card)
        assert cancel.is_displayed()
        page.screenshot("queued")
        cancel.click()
        page.wait_for_status(card, "Cancelled", timeout=UI_TIMEOUT_S)
        assert not cancel.is_displayed()
        assert not page.find(".progress", card).is_displayed()
        video = user.get(card.get_attribute("data-id"))
        assert video["status"] == "cancelled" and video["started_at"] is None
    finally:
        for video in busy:
            user.call("POST", f"/v1/videos/{video['id']}/cancel")


def test_progress_survives_an_api_restart(page, jobs_service, jobs_postgres, jobs_torchserve, tmp_path):
    """A second API process over the same database (a replica; the session's worker does the work):
    killed while the page watches a job, then started again on the same port. The page says it is
    reconnecting, reconnects on its own and shows the video."""
    # The worker writes videos to its service's results folder: the replica reads the same one,
    # as replicas share a volume or a bucket.
    replica = JobService(tmp_path, jobs_postgres, jobs_config(jobs_torchserve), separate_worker=True,
                         env={"JOBS_RESULTS_DIR": str(jobs_service.root / "results")})
    replica.start_api()  # no worker of its own
    try:
        user = Api(replica.url, replica.new_key(f"replica-{uuid.uuid4().hex[:8]}")["key"])
        page.base_url = replica.url
        page.open()
        page.sign_in(user.key)
        video = user.create(prompt=unique("a train crossing a bridge"), **LONG_JOB)
        page.driver.refresh()
        card = page.card_for(video["prompt"])
        page.wait_for_status(card, "Making it")
        page.wait(lambda: page.find(".progress-text", card).text.startswith("Step "), JOB_TIMEOUT_S,
                  message="a step shown")

        # The stream cut mid-way, then refused until the API is back.
        page.expected_network_errors.update({"ERR_INCOMPLETE_CHUNKED_ENCODING", "ERR_CONNECTION_REFUSED"})
        replica.kill_api()
        page.wait(lambda: "reconnecting" in page.find(".progress-text", card).text,
                  message="the page to say it is reconnecting")
        page.screenshot("reconnecting")
        replica.start_api()
        page.wait_for_status(card, "Ready")
        assert "reconnecting" not in page.find(".progress-text", card).text
        assert "100 %" in page.find(".progress-text", card).text
        player = page.find("video", card)
        page.wait(lambda: (page.driver.execute_script("return arguments[0].duration", player) or 0) > 0,
                  message="the video's duration")
    finally:
        replica.stop()


def test_a_failure_shows_the_servers_message(page, jobs_torchserve, tmp_path):
    """A model whose rules allow more than its data plane does (as in tests/test_jobs.py): the page
    accepts the size, the job starts, TorchServe refuses it, and the card shows the server's reason.
    A service of its own (own PostgreSQL): the session's worker must not take this model's jobs."""
    database = Postgres(tmp_path / "pg")
    database.start()
    config = jobs_config(jobs_torchserve)
    (tmp_path / "loose.yaml").write_text("handler:\n  limits:\n    max_side_px: 1280\n    max_pixels: 921600\n")
    config["models"].append(dict(config["models"][0], name="strict", model_config=str(tmp_path / "loose.yaml")))
    service = JobService(tmp_path, database, config, env={"JOBS_MAX_ATTEMPTS": "1"})
    service.start()
    try:
        user = Api(service.url, service.new_key("failing")["key"])
        page.base_url = service.url
        page.open()
        page.sign_in(user.key)
        Select(page.find("#model")).select_by_value("strict")
        prompt = unique("a city skyline at night")
        page.set_value("#prompt", prompt)
        Select(page.find("#size")).select_by_value("custom")
        page.set_value("#width", "1024")
        page.set_value("#height", "512")
        page.open_advanced()
        page.set_value("#num_inference_steps", "1")
        page.find("#submit").click()
        card = page.card_for(prompt)
        page.wait_for_status(card, "Failed")
        api_video = user.get(card.get_attribute("data-id"))
        assert api_video["status"] == "failed" and api_video["error"]["param"] == "width", api_video
        failure = page.find(".failure", card)
        assert failure.is_displayed()
        assert failure.text == f"The video could not be made: {api_video['error']['message']}"
        assert not page.find("button.cancel", card).is_displayed()
        assert not page.find("a.download", card).is_displayed()
    finally:
        service.stop()
        database.stop()


# Small request rules for the A14B pair (no weights: no job of theirs runs). The text-only model's
# limits stop at 832 px, so of its native sizes only 832x480 and its portrait form are offered;
# each model's defaults differ from the others' so that a refill shows.
T2V_RULES = {"defaults": {"width": 832, "height": 480, "num_frames": 17, "fps": 16, "num_inference_steps": 6,
                          "guidance_scale": 4.5, "guidance_scale_2": 2.5, "negative_prompt": "blurry"},
             "limits": {"max_side_px": 832, "max_pixels": 832 * 480, "max_num_frames": 33,
                        "max_inference_steps": 12}}
I2V_RULES = {"defaults": {"num_frames": 21, "fps": 16, "num_inference_steps": 8, "guidance_scale": 3.5,
                          "guidance_scale_2": 3.0, "negative_prompt": "static"},
             "limits": {"max_num_frames": 33, "max_inference_steps": 12}}


def options_of(page, css: str) -> list[tuple[str, str]]:
    return [(o.get_attribute("value"), o.text) for o in Select(page.find(css)).options]


def advanced_values(page) -> dict[str, str]:
    return {field: page.find(f"#{field}").get_attribute("value")
            for field in ("negative_prompt", "num_inference_steps", "fps", "guidance_scale", "guidance_scale_2",
                          "duration")}


def test_each_model_takes_what_it_accepts(page, tmp_path):
    """A job service fronting three models (config/jobs.yaml's model entries): the tiny TI2V one
    (text, image optional), a T2V-A14B (text only) and an I2V-A14B (image required). Their
    endpoints are a closed port: nothing here runs a job. The form follows the chosen model: the
    image picker, the size presets (native sizes and their portrait forms, within its limits) and
    the advanced defaults."""
    [closed] = free_ports(1)  # nothing listens there
    endpoints = [{"name": "nowhere", "url": f"http://127.0.0.1:{closed}", "cooldown_s": 1}]
    models = []
    for name, variant, rules in (("wan", "ti2v-5b", None), ("t2v", "t2v-a14b", T2V_RULES),
                                 ("i2v", "i2v-a14b", I2V_RULES)):
        model_config = REPO_ROOT / "config" / "models" / "tiny-ti2v.yaml"
        if rules:
            model_config = tmp_path / f"{name}.yaml"
            model_config.write_text(yaml.safe_dump({"handler": rules}))
        models.append({"name": name, "variant": variant, "model_config": str(model_config), "endpoints": endpoints})
    with own_job_service(tmp_path / "service", {"models": models}) as service:
        user = Api(service.url, service.new_key("chooser")["key"])
        page.base_url = service.url
        page.open()
        page.sign_in(user.key)
        assert options_of(page, "#model") == [
            ("wan", "wan (text, image optional)"), ("t2v", "t2v (text)"), ("i2v", "i2v (text + image)")]
        assert page.find("#image-label").text == "Image (optional)"
        # The tiny model's limits (640 px) leave none of its native 1280x704 sizes.
        assert options_of(page, "#size") == [("", "256×256 (default)"), ("custom", "Custom size…")]
        page.open_advanced()
        assert not page.visible("#guidance_scale_2")  # one expert

        # Text only: no image picker at all; an image chosen for another model is dropped.
        picture = tmp_path / "still.png"
        Image.new("RGB", (64, 96), (30, 90, 160)).save(picture)
        page.find("#image").send_keys(str(picture))
        page.wait(lambda: page.visible("#image-preview"), message="the image preview")
        page.set_value("#num_inference_steps", "3")
        Select(page.find("#model")).select_by_value("t2v")
        assert page.find("#model-info").text == "Text only."
        assert not page.visible("#image-field") and not page.find("#image").is_displayed()
        assert page.find("#image-name").text == "" and not page.find("#image-preview").is_displayed()
        assert options_of(page, "#size") == [
            ("", "832×480 (default)"), ("480x832", "480×832 portrait"), ("custom", "Custom size…")]
        assert advanced_values(page) == {"negative_prompt": "blurry", "num_inference_steps": "6", "fps": "16",
                                         "guidance_scale": "4.5", "guidance_scale_2": "2.5", "duration": "17"}
        assert page.find("#guidance_scale-label").text == "Guidance, high-noise expert"
        assert page.visible("#guidance_scale_2")
        assert page.find("#width").get_attribute("max") == "832"
        page.screenshot("text-only")

        # Image required: the picker says so, and a submission without one stops at the field.
        page.set_value("#num_inference_steps", "11")
        Select(page.find("#model")).select_by_value("i2v")
        assert page.find("#model-info").text == "Text and an image to start from (required)."
        assert page.visible("#image-field") and page.find("#image-label").text == "Image (required)"
        assert options_of(page, "#size") == [
            ("", "1280×720 (default)"), ("720x1280", "720×1280 portrait"), ("832x480", "832×480 landscape"),
            ("480x832", "480×832 portrait"), ("custom", "Custom size…")]
        assert advanced_values(page) == {"negative_prompt": "static", "num_inference_steps": "8", "fps": "16",
                                         "guidance_scale": "3.5", "guidance_scale_2": "3", "duration": "21"}
        page.set_value("#prompt", unique("the still lake ripples"))
        page.find("#submit").click()
        assert page.error_next_to("image") == "i2v makes a video from an image: choose one."
        assert page.driver.switch_to.active_element == page.find("#image")
        page.screenshot("image-required")
        assert page.cards() == [] and page.visible("#videos-empty")
        assert user.videos() == [], "nothing is queued"
        # Choosing one clears the message.
        page.find("#image").send_keys(str(picture))
        page.wait(lambda: page.visible("#image-preview"), message="the image preview")
        assert page.error_next_to("image") == ""

        # Changed settings come back with the model's defaults.
        page.set_value("#num_inference_steps", "2")
        page.set_value("#guidance_scale_2", "7")
        page.find("#reset-defaults").click()
        assert advanced_values(page)["num_inference_steps"] == "8"
        assert advanced_values(page)["guidance_scale_2"] == "3"  # as the page writes 3.0
        Select(page.find("#model")).select_by_value("wan")
        assert page.find("#image-label").text == "Image (optional)"
        assert page.find("#num_inference_steps").get_attribute("value") == "4"  # tiny-ti2v.yaml's
        assert not page.visible("#guidance_scale_2")
        assert user.videos() == []


def test_a_speed_preset_fills_the_form_and_is_sent(page, jobs_service):
    """The tiny model's profiles (config/models/tiny-ti2v.yaml): "lightning" sets 4 steps and
    guidance 1 with a LoRA and locks the guidance; "cached" switches on a lossy step cache. The
    form shows what a preset sets, keeps what it locks out of reach (and out of the request: the
    server refuses a locked field), and the video records the preset."""
    user = new_user(jobs_service, "hurried")
    page.sign_in(user.key)
    assert page.visible("#profile-field")
    assert options_of(page, "#profile") == [
        ("", "None: the settings below"), ("lightning", "lightning"), ("cached", "cached")]
    page.open_advanced()
    default_guidance = page.find("#guidance_scale").get_attribute("value")

    Select(page.find("#profile")).select_by_value("cached")
    assert page.find("#profile-hint").text == "Faster, at some cost in quality (step cache)."
    assert page.find("#guidance_scale").is_enabled() and page.find("#num_inference_steps").is_enabled()

    Select(page.find("#profile")).select_by_value("lightning")
    assert page.find("#profile-hint").text == "The preset sets its own guidance. It uses the LoRA tiny-lora."
    guidance = page.find("#guidance_scale")
    assert guidance.get_attribute("value") == "1" and not guidance.is_enabled()
    steps = page.find("#num_inference_steps")
    assert steps.get_attribute("value") == "4" and steps.is_enabled()
    page.set_value("#num_inference_steps", "3")  # not locked: still the person's to change
    page.screenshot("lightning")
    prompt = unique("a quick sketch of a bird")
    page.set_value("#prompt", prompt)
    page.find("#submit").click()
    card = page.card_for(prompt)
    page.wait_for_status(card, "Ready")
    video = user.get(card.get_attribute("data-id"))
    assert video["status"] == "completed", video
    assert video["parameters"]["profile"] == "lightning", video["parameters"]
    assert video["parameters"]["num_inference_steps"] == 3, video["parameters"]
    assert "guidance_scale" not in video["parameters"] or video["parameters"]["guidance_scale"] == 1.0
    assert "preset lightning" in page.find(".params", card).text

    # No preset: the model's own values, every field open again.
    Select(page.find("#profile")).select_by_value("")
    assert page.find("#profile-hint").text == ""
    assert guidance.is_enabled() and guidance.get_attribute("value") == default_guidance
    # The video's settings again: the preset with them.
    page.find("button.reuse", card).click()
    assert Select(page.find("#profile")).first_selected_option.get_attribute("value") == "lightning"
    assert not guidance.is_enabled() and steps.get_attribute("value") == "3"


def test_history_after_reload_reuse_and_delete(page, jobs_service):
    user = new_user(jobs_service, "returning")
    done = user.create(prompt=unique("a hot air balloon over hills"), seed=1234567890123456789)
    done = user.wait_until_final(done["id"])
    assert done["status"] == "completed", done
    page.sign_in(user.key)
    page.driver.refresh()  # the key is kept: no form, the same history
    page.wait_for_history()
    assert not page.visible("#key-section")
    card = page.card_for(done["prompt"])
    assert page.status_of(card) == "Ready"
    params = page.find(".params", card).text
    assert "seed 1234567890123456789" in params and "steps" in params
    player = page.find("video", card)
    poster = player.get_attribute("poster")
    assert "variant=thumbnail" in poster
    assert page.driver.execute_async_script(
        "const img = new Image(); img.onload = () => arguments[1](img.naturalWidth);"
        "img.onerror = () => arguments[1](0); img.src = arguments[0];", poster) > 0, "the poster frame loads"

    page.find("button.reuse", card).click()
    assert page.find("#prompt").get_attribute("value") == done["prompt"]
    assert page.find("#seed").get_attribute("value") == "1234567890123456789"
    assert page.driver.switch_to.active_element == page.find("#prompt")

    page.find("button.delete", card).click()
    page.find("button.delete-yes", card).click()
    page.wait(lambda: not page.cards(), message="the deleted video to go")
    assert page.visible("#videos-empty")
    assert user.call("GET", f"/v1/videos/{done['id']}").status_code == 404


def test_history_is_paginated_newest_first(page, jobs_service):
    user = new_user(jobs_service, "prolific")
    prompts = []
    for i in range(PAGE_SIZE + 1):
        video = user.create(prompt=f"history item {i:02d}")
        user.call("POST", f"/v1/videos/{video['id']}/cancel")  # history, not work
        prompts.append(video["prompt"])
    page.sign_in(user.key)
    shown = [page.find(".prompt", c).text for c in page.cards()]
    assert shown == prompts[::-1][:PAGE_SIZE]
    page.find("#more").click()
    page.wait(lambda: len(page.cards()) == PAGE_SIZE + 1, message="the older video")
    assert [page.find(".prompt", c).text for c in page.cards()] == prompts[::-1]
    assert not page.visible("#more")


def test_an_image_by_picker_or_drop_is_previewed_and_sent(page, jobs_service, tmp_path):
    user = new_user(jobs_service, "painter")
    picture = tmp_path / "cat.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(picture)
    page.sign_in(user.key)
    assert page.find("#image-label").text == "Image (optional)"  # the tiny model is TI2V

    page.find("#image").send_keys(str(picture))
    page.wait(lambda: page.visible("#image-preview"), message="the image preview")
    assert page.driver.execute_script("return document.getElementById('image-preview').naturalWidth") == 96
    assert page.find("#image-name").text.startswith("cat.png")
    page.find("#image-clear").click()
    assert not page.visible("#image-preview") and page.find("#image-name").text == ""

    page.drop_file("notes.txt", b"not a picture", "text/plain")
    assert page.error_next_to("image") == "notes.txt is not a PNG, JPEG or WebP image."
    assert not page.visible("#image-preview")
    page.drop_file("dropped.png", picture.read_bytes(), "image/png")
    page.wait(lambda: page.visible("#image-preview"), message="the dropped image's preview")
    assert page.error_next_to("image") == ""

    prompt = unique("the cat starts to dance")
    page.set_value("#prompt", prompt)
    page.find("#submit").click()
    card = page.card_for(prompt)
    page.wait_for_status(card, "Ready")
    assert "from an image" in page.find(".params", card).text


def test_every_control_is_labelled_and_the_form_works_by_keyboard(page, jobs_service):
    user = new_user(jobs_service, "keyboard")
    page.sign_in(user.key)
    page.open_advanced()
    unlabelled = page.driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button, video')]
          .filter(el => el.offsetParent !== null || el.type === 'file')
          .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                        && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
          .map(el => el.outerHTML.slice(0, 80));
    """)
    assert unlabelled == []

    # Type a prompt and reach the button with Tab alone, as someone without a mouse would.
    prompt = unique("a kite over the sea")
    page.find("#prompt").send_keys(prompt)
    for _ in range(40):
        if page.driver.switch_to.active_element == page.find("#submit"):
            break
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
    assert page.driver.switch_to.active_element == page.find("#submit"), "Tab never reached the button"
    ActionChains(page.driver).send_keys(Keys.ENTER).perform()
    card = page.card_for(prompt)
    cancel = page.find("button.cancel", card)
    if cancel.is_displayed():
        cancel.send_keys(Keys.ENTER)
        page.wait(lambda: not ACTIVE_TEXT.match(page.status_of(card)), message="the video to stop")


def test_another_users_key_sees_none_of_it(page, jobs_service):
    owner = new_user(jobs_service, "owner")
    secret = owner.create(prompt=unique("my private idea"))
    owner.call("POST", f"/v1/videos/{secret['id']}/cancel")
    page.expected_http_errors.add(401)

    page.find("#key-input").send_keys("not-a-key", Keys.ENTER)
    page.wait(lambda: page.error_next_to("key").startswith("This key was not accepted:"),
              message="the refused key's message")
    assert not page.visible("#video-form")

    other = new_user(jobs_service, "other")
    page.set_value("#key-input", other.key)
    page.find("#key-input").send_keys(Keys.ENTER)
    page.wait(lambda: page.visible("#videos-empty"), message="an empty history")
    assert page.cards() == []
    assert secret["prompt"] not in page.driver.page_source
    assert other.call("GET", f"/v1/videos/{secret['id']}").status_code == 404


def test_phone_width_has_no_horizontal_scroll(page, jobs_service):
    user = new_user(jobs_service, "phone")
    long_prompt = "a very long prompt without spaces " + "x" * 300
    video = user.create(prompt=long_prompt)
    user.call("POST", f"/v1/videos/{video['id']}/cancel")
    page.phone()
    page.sign_in(user.key)
    assert page.driver.execute_script("return window.innerWidth") == 360
    assert page.no_horizontal_scroll()
    page.open_advanced()
    Select(page.find("#size")).select_by_value("custom")
    assert page.visible("#width")
    assert page.no_horizontal_scroll()
    for css in ("#prompt", "#model", "#submit", "#videos li.video"):
        box = page.driver.execute_script("return arguments[0].getBoundingClientRect().right", page.find(css))
        assert box <= 360, f"{css} reaches {box} px"


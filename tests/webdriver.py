"""Headless Chromium driven over the W3C WebDriver protocol (plain HTTP to chromedriver), for
the page test and bench/page_screenshot.py: the few commands they need, without a client
library. Debian's packages: `apt-get install chromium chromium-driver` (`make test-browser`).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
ENTER = "\ue007"  # the WebDriver key code for Enter, sent inside typed text


def browser_binaries() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed, else None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriverError(AssertionError):
    pass


class Browser:
    """One headless Chromium session."""

    def __init__(self, http: httpx.Client, session: str):
        self.http, self.session = http, session

    def _call(self, method: str, path: str, body: dict | None = None):
        r = self.http.request(method, f"/session/{self.session}{path}", json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}")
        return value

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        """Key presses into the element, as a person types them (ENTER presses Enter)."""
        self._call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def run(self, script: str, *args):
        """The value of `script` (a function body: `return ...`) run in the page."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, *args, timeout: float = 60, what: str = ""):
        """Poll `script` until it returns something truthy; that value."""
        deadline, pause = time.monotonic() + timeout, 0.05
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise WebDriverError(f"timed out after {timeout}s waiting for {what or script}")
            time.sleep(pause)
            pause = min(pause * 1.5, 1.0)  # quick for a tiny model, and not busy for minutes with a real one

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path


@contextlib.contextmanager
def headless_chromium(workdir: Path, width: int = 1280, height: int = 860):
    """A Browser on a fresh profile in `workdir` (chromedriver's log there too), closed after."""
    binaries = browser_binaries()
    if binaries is None:
        raise WebDriverError("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    chromium, driver = binaries
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(workdir / "chromedriver.log", "w")
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/status").json()["value"]["ready"]:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise WebDriverError(f"chromedriver did not start: {(workdir / 'chromedriver.log').read_text()}")
                time.sleep(0.05)
            options = {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--window-size={width},{height}", f"--user-data-dir={workdir / 'profile'}"]}
            r = http.post("/session", json={"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}})
            if r.status_code != 200:
                raise WebDriverError(f"cannot start chromium: {r.text[:1000]}")
            browser = Browser(http, r.json()["value"]["sessionId"])
            try:
                yield browser
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    http.delete(f"/session/{browser.session}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

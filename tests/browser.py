"""Open a page in headless Chromium and report what a person would see: whether each image loaded, the
console's errors, and a screenshot. Standard library only: Chromium is driven over the DevTools protocol
through a pipe (``--remote-debugging-pipe``: it reads NUL-terminated JSON commands on fd 3 and writes
replies and events on fd 4), so no driver package and no browser download is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageView:
    images: list[dict]  # per <img>: complete, naturalWidth, naturalHeight, src (first 40 characters)
    errors: list[str]  # console errors, uncaught exceptions, failed loads and other error log entries
    screenshot: bytes  # PNG of the whole page
    title: str = ""
    events: list[str] = field(default_factory=list)


class _Pipe:
    def __init__(self, executable: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # The child must find them at 3 and 4: duplicate them above 10 first, so that dup2 onto 3 and 4
        # in the child cannot overwrite one with the other.
        hi_r, hi_w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds():  # runs in the child before exec; dup2 makes 3 and 4 inheritable
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=child_fds)
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = self._read_until(lambda m: m.get("id") == self._next, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        return self._read_until(lambda m: m.get("method") == method, timeout, keep=False)

    def _read_until(self, done, timeout: float, keep: bool = True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if done(msg):
                    if "method" in msg and keep:
                        self.events.append(msg)
                    return msg
                if "method" in msg:
                    self.events.append(msg)
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError("chromium did not answer" + (" (it exited)" if self.proc.poll() is not None else ""))
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise TimeoutError("chromium closed its DevTools pipe")
                self._buf += chunk

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds``."""
        try:
            self._read_until(lambda m: False, seconds)
        except TimeoutError:
            pass

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


IMAGES_JS = ("JSON.stringify([...document.images].map(i => ({complete: i.complete, naturalWidth: i.naturalWidth, "
             "naturalHeight: i.naturalHeight, src: i.src.slice(0, 40)})))")


def open_page(url: str, executable: str, profile: Path, width: int = 1280, timeout: float = 90) -> PageView:
    """Load ``url`` in a fresh headless Chromium (profile in ``profile``), wait for its load event, and
    return its images, its errors and a full-page screenshot."""
    pipe = _Pipe(executable, profile)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)
        images = json.loads(pipe.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True},
                                      session=session)["result"]["value"])
        title = pipe.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                          session=session)["result"].get("value", "")
        size = pipe.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": min(int(size["height"]), 16000), "scale": 1}
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip},
                         session=session, timeout=timeout)["data"]
        pipe.drain(0.3)  # late log entries (a failed load is reported after the load event)
        errors = []
        for e in pipe.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')}")
        return PageView(images, errors, base64.b64decode(shot), title, [e.get("method", "") for e in pipe.events])
    finally:
        pipe.close()

"""Headless Chromium for tests, driven over the DevTools protocol with the standard library only.

Chromium is started with ``--remote-debugging-pipe``: it reads protocol commands from its file
descriptor 3 and writes replies and events to descriptor 4, each message JSON ended by a NUL byte (what
Puppeteer's ``pipe: true`` does), so no WebSocket client is needed. One page target is attached in
flat mode (``sessionId`` on each message).

    with Browser(chromium_executable()) as browser:
        browser.open(Path("report.html").as_uri())
        browser.evaluate("document.title")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any, Self

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium died, timed out or answered a command with an error."""


def chromium_executable() -> str | None:
    """The first of :data:`CHROMIUM_NAMES` on ``PATH`` (``$CHROMIUM`` wins when set), or None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def _high_fd(fd: int) -> int:
    """``fd`` moved to a number >= 10 (close-on-exec), so that moving the child's ends onto 3 and 4
    cannot clobber one end with the other."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """A headless Chromium with one page of ``width`` x ``height`` CSS pixels."""

    def __init__(self, executable: str, *, width: int = 1400, height: int = 1000, timeout: float = 60.0):
        self.timeout = timeout
        self._closed = False
        self._ids = itertools.count(1)
        self._buffer = b""
        # Chromium's helper processes may still write into the profile while it is removed after the browser
        # exits ("Directory not empty"); what is left is under the temporary folder, which the OS clears.
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (Chromium's output, kept until close())
        to_browser_r, self._to_browser = map(_high_fd, os.pipe())
        self._from_browser, from_browser_w = map(_high_fd, os.pipe())
        chromium = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                    f"--user-data-dir={self._profile.name}", "--no-first-run", "--no-default-browser-check",
                    "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                    f"--window-size={width},{height}", "about:blank"]
        # The child's ends of the pipes become Chromium's descriptors 3 and 4: bash moves them there and
        # execs Chromium (no preexec_fn; bash, unlike dash, takes descriptor numbers above 9).
        moves = f"3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-"
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" {moves}', "chromium", *chromium],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=self._log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.session: str | None = None
        try:
            target = self.command("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.command("Page.enable")
            self.command("Runtime.enable")
            self.command("Emulation.setDeviceMetricsOverride", width=width, height=height,
                         deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # -- protocol -------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer from Chromium within {self.timeout} s{self._log_tail()}")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the pipe (exit {self.process.poll()}){self._log_tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def command(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page session once attached) and return its result."""
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == ident:                       # anything else is an event: ignored
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    # -- page -----------------------------------------------------------------------------------

    def evaluate(self, expression: str, *, frame: str | None = None) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON data: in the page, or in the
        frame with id ``frame`` (:meth:`child_frames`; an isolated world, which sees the frame's DOM)."""
        where = {}
        if frame is not None:
            where["contextId"] = self.command("Page.createIsolatedWorld", frameId=frame,
                                              worldName="test")["executionContextId"]
        result = self.command("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                              **where)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}\n{expression[:500]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, frame: str | None = None, timeout: float | None = None,
                 interval: float = 0.1) -> Any:
        """Evaluate ``expression`` (in the page or ``frame``) until it is truthy; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression, frame=frame)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for: {expression}")
            time.sleep(interval)

    def child_frames(self) -> list[dict[str, Any]]:
        """Every frame below the page's main frame (iframes), depth first: Page.Frame objects
        (``id``, ``url``, ...)."""
        def below(node: dict[str, Any]) -> list[dict[str, Any]]:
            return [frame for child in node.get("childFrames", []) for frame in [child["frame"], *below(child)]]
        return below(self.command("Page.getFrameTree")["frameTree"])

    def wait_for_frame(self, url: str, *, timeout: float | None = None) -> str:
        """The id of the child frame showing ``url``, once there is one."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            frames = [frame["id"] for frame in self.child_frames() if frame.get("url") == url]
            if frames:
                return frames[-1]
            if time.monotonic() > deadline:
                raise BrowserError(f"no frame shows {url[:80]}...")
            time.sleep(0.1)

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until the document has loaded."""
        reply = self.command("Page.navigate", url=url)
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self) -> bytes:
        """PNG of the page's viewport."""
        return base64.b64decode(self.command("Page.captureScreenshot", format="png")["data"])

    # -- lifetime -------------------------------------------------------------------------------

    def _log_tail(self) -> str:
        self._log.seek(0)
        tail = self._log.read()[-3000:].decode(errors="replace").strip()
        return f"\nChromium's output:\n{tail}" if tail else ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._to_browser)
        os.close(self._from_browser)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

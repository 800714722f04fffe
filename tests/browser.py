"""Headless Chromium driven over the DevTools protocol, for tests of pages this project writes.

The protocol runs over a pair of pipes (`--remote-debugging-pipe`: the browser reads commands on its
file descriptor 3 and writes replies and events on 4, each message JSON ended by a NUL byte), so it
needs no WebDriver, no websocket library and no network port: only Debian's `chromium` package and the
standard library. Every console message, uncaught exception, log entry and network request the page
makes is recorded, so a test can assert that a page had none it should not.

Usage::

    with Chromium() as browser:
        browser.open(Path("page.html"))
        value = browser.evaluate("document.title")
        png = browser.screenshot()
        assert not browser.errors()
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# Debian's names for the browser; `CHROMIUM` overrides them.
BINARIES = ("chromium", "chromium-browser", "google-chrome")
# Seconds to wait for one reply; loading a page of ~10 MB of embedded weights takes about one.
TIMEOUT_S = 60.0
# Inherited descriptors are first moved this high, so that putting them on 3 and 4 never overwrites one.
_HIGH_FD = 10


class BrowserError(RuntimeError):
    """The browser died, did not answer in time, or answered a command with an error."""


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None."""
    names = (os.environ["CHROMIUM"],) if os.environ.get("CHROMIUM") else BINARIES
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless Chromium with one page (a tab), attached over the DevTools protocol."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 1000) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(f"no Chromium found (tried {', '.join(BINARIES)}; apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        # The browser's ends, above any descriptor the shell below might be asked to write to.
        child_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
        child_write = fcntl.fcntl(events_write, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
        os.close(commands_read)
        os.close(events_write)
        flags = ["--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                 "--hide-scrollbars", f"--window-size={width},{height}",
                 f"--user-data-dir={self._profile.name}", "about:blank"]
        if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
            flags.insert(0, "--no-sandbox")
        # bash puts the two pipe ends on descriptors 3 and 4, then becomes the browser (subprocess keeps
        # descriptor numbers, never moves them; dash takes only one-digit ones).
        script = f'exec "$0" "$@" 3<&{child_read} 4>&{child_write} {child_read}<&- {child_write}>&-'
        self._process = subprocess.Popen(["bash", "-c", script, binary, *flags],
                                         pass_fds=(child_read, child_write),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_read)
        os.close(child_write)
        self._send_fd = commands_write
        self._recv_fd = events_read
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        self.events: list[dict[str, Any]] = []
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    # -- protocol ---------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("the browser did not answer in time")
            ready, _, _ = select.select([self._recv_fd], [], [], left)
            if ready:
                chunk = os.read(self._recv_fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser exited (code {self._process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def command(self, method: str, params: dict[str, Any] | None = None, page: bool = True,
                timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """Sends one command (to the page's session unless `page` is False) and returns its result;
        events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if page and self._session is not None:
            message["sessionId"] = self._session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """Waits for an event `method` (the first one kept, or the next to come), removes it and returns its
        params."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    self.events.remove(event)
                    return event.get("params", {})
            self.events.append(self._read_message(deadline))

    def _attach(self) -> None:
        targets = self.command("Target.getTargets", page=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self._session = self.command("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                     page=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.command(f"{domain}.enable")

    # -- what tests use ---------------------------------------------------------------------------

    def open(self, path: Path) -> None:
        """Loads a local file and waits until its `load` event has fired."""
        self.events.clear()
        self.command("Page.navigate", {"url": path.resolve().as_uri()})
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), as JSON."""
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            message = details.get("exception", {}).get("description", details)
            raise BrowserError(f"{expression[:80]}: {message}")
        return result["result"].get("value")

    def press_key(self, key: str, code: int) -> None:
        """Presses and releases one key (e.g. `"ArrowRight", 39`) in the focused element, as a user would."""
        for kind in ("rawKeyDown", "keyUp"):
            self.command("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                    "windowsVirtualKeyCode": code})

    def screenshot(self, full_page: bool = True) -> bytes:
        """A PNG of the page (the whole page, not only the window, if `full_page`)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            size = self.command("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        return base64.b64decode(self.command("Page.captureScreenshot", params)["data"])

    def errors(self) -> list[str]:
        """Every console error, uncaught exception and error log entry since the last `open`."""
        self.command("Runtime.evaluate", {"expression": "0"})  # let pending events arrive
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description", details.get("text", "")))
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def requests(self) -> list[str]:
        """The URLs of every request the page made since the last `open` (the page itself included)."""
        return [event["params"]["request"]["url"] for event in self.events
                if event["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        """Ends the browser and removes its profile."""
        try:
            os.write(self._send_fd, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._send_fd, self._recv_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

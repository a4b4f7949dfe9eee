"""Headless Chromium for page tests, driven over the Chrome DevTools protocol (one websocket).

``Browser(profile_dir)`` starts /usr/bin/chromium with ``--remote-debugging-port=0``, reads the port
it picked from ``DevToolsActivePort`` in the profile, and attaches to its first page. ``navigate``,
``evaluate`` (JSON-able results) and ``screenshot`` (full page PNG) are all the tests need. No
browser automation library: the protocol is JSON over the ``websockets`` package uvicorn already uses.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage",   # containers often have a tiny /dev/shm
         "--no-proxy-server", "--remote-debugging-port=0"]


class Browser:
    def __init__(self, profile_dir: Path, width: int = 1440, height: int = 1000, start_timeout_s: float = 20.0):
        self.width = width
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile_dir}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._ids = itertools.count(1)
        self._stack = contextlib.ExitStack()
        try:
            port = self._devtools_port(profile_dir / "DevToolsActivePort", start_timeout_s)
            self.ws = self._stack.enter_context(connect(self._page_socket(port, start_timeout_s), max_size=None,
                                                        open_timeout=10))
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, path: Path, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.proc.returncode}")
            lines = path.read_text().split() if path.exists() else []
            if len(lines) >= 2:   # port, then the browser's socket path: the file is complete
                return int(lines[0])
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def _page_socket(self, port: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False, timeout=5).json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise TimeoutError("chromium opened no page")

    def send(self, method: str, timeout_s: float = 30.0, **params) -> dict:
        """One protocol command; events that arrive meanwhile are skipped."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]

    def navigate(self, url: str, timeout_s: float = 15.0) -> None:
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load")
            time.sleep(0.05)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page, at the window's width."""
        height = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1,
                  mobile=False)
        shot = self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self._stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

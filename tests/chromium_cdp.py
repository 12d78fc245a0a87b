"""Debian's headless Chromium driven over the DevTools protocol (ECOSYSTEM.md §3.2): plain ``chromium --screenshot``
captures Bokeh pages before their websocket fills them (a blank page), so tests navigate, evaluate JavaScript until
the page is ready, then capture.  Needs only tornado (a dependency of distributed).

    with Chromium() as browser:
        browser.navigate(url)
        value = browser.wait_for("JSON.stringify(...)", ok=lambda v: ..., timeout=20)
        browser.screenshot("page.png")
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

__all__ = ["Chromium", "find_chromium"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Chromium:
    """One headless Chromium process with one page, driven synchronously (its own asyncio loop)."""

    def __init__(self, width: int = 1400, height: int = 900, executable: str | None = None):
        self.width, self.height = width, height
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("chromium not found")
        self.loop = asyncio.new_event_loop()
        self.proc = None
        self.ws = None
        self._id = 0

    def __enter__(self):
        port, self._userdir = _free_port(), tempfile.mkdtemp(prefix="cdp-")
        self.proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._userdir}", f"--window-size={self.width},{self.height}",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its own group
        page = None
        t0 = time.time()
        while page is None and time.time() - t0 < 30:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    page = next((t for t in json.load(r) if t["type"] == "page"), None)
            except OSError:
                pass
            if page is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
                time.sleep(0.1)
        if page is None:
            self.__exit__(None, None, None)
            raise TimeoutError("chromium's DevTools endpoint did not answer in 30 s")
        from tornado.websocket import websocket_connect

        async def connect():  # created inside this loop (tornado binds the future to the running loop)
            return await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)

        self.ws = self.loop.run_until_complete(connect())
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        return self

    def __exit__(self, *exc):
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None:  # the browser and its zygote/renderer children: the whole process group
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # children that outlive the browser process
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self._userdir, ignore_errors=True)
        self.loop.close()

    def call(self, method: str, timeout: float = 30.0, **params):
        self._id += 1
        n = self._id

        async def go():
            self.ws.write_message(json.dumps({"id": n, "method": method, "params": params}))
            while True:
                raw = await self.ws.read_message()
                if raw is None:
                    raise ConnectionError("DevTools connection closed")
                msg = json.loads(raw)
                if msg.get("id") == n:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})

        return self.loop.run_until_complete(asyncio.wait_for(go(), timeout))

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (JSON-serialisable), or None when it throws."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            return None
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, ok, timeout: float = 20.0, period: float = 0.3):
        """Evaluate ``expression`` until ``ok(value)``; the last value either way."""
        t0 = time.time()
        value = None
        while time.time() - t0 < timeout:
            value = self.evaluate(expression)
            try:
                if ok(value):
                    return value
            except Exception:
                pass
            time.sleep(period)
        return value

    def screenshot(self, path: str | os.PathLike) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        with open(path, "wb") as fh:
            fh.write(data)
        return data

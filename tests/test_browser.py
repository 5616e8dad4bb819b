"""The dashboard in headless Chromium: live numbers render, the upload form shows the image, its probability
and its trace, and a screenshot shows them. Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe), so nothing but the `chromium` Debian package is needed."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from roadcascade.serve import ServeConfig, create_app
from roadcascade.serve.testing import live_server, tiny_bundle

pytestmark = pytest.mark.browser
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
VIEW_W, VIEW_H = 1280, 1000


def _need_chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("headless Chromium not found: install Debian's `chromium` package (apt-get install -y chromium) to run the dashboard test")


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3: to Chromium, fd 4: from it)."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 20)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 20)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def child_fds() -> None:  # runs in the child before exec: Chromium expects the pipe on fds 3 and 4
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                f"--user-data-dir={profile}", f"--window-size={VIEW_W},{VIEW_H}", "--remote-debugging-pipe", "about:blank"]
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     preexec_fn=child_fds, pass_fds=(3, 4), close_fds=True)
        os.close(hi_r)
        os.close(hi_w)
        self._id = 0
        self._results: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cv:
                    self._cv.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cv:
                    if "id" in msg:
                        self._results[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cv.notify_all()

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        with self._cv:
            while self._id not in self._results:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no answer to {method}")
                self._cv.wait(left)
            res = self._results.pop(self._id)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res.get("result", {})

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for i, e in enumerate(self.events):
                    if e.get("method") == method:
                        return self.events.pop(i)
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {method} event")
                self._cv.wait(left)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        for m in ("Page.enable", "Runtime.enable", "DOM.enable"):
            self.send(m)
        self.send("Emulation.setDeviceMetricsOverride", {"width": VIEW_W, "height": VIEW_H, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.js(expression)
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"never true: {expression}")

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._to_chrome)
        self._log.close()


ORANGE = (240, 110, 20)


def upload_image() -> bytes:
    """A distinctive image: orange with a few dark stripes (what the screenshot is checked for)."""
    img = np.zeros((150, 200, 3), dtype=np.uint8)
    img[:] = ORANGE
    img[::25] = (30, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_dashboard_in_headless_chromium(tmp_path):
    binary = _need_chromium()
    bundle = tiny_bundle(tmp_path / "bundle")
    image_path = tmp_path / "upload.png"
    image_path.write_bytes(upload_image())
    with live_server(create_app(bundle, ServeConfig(max_batch=8, warmup_rounds=1))) as url:
        want = httpx.post(url + "/v1/predict", files={"file": ("upload.png", image_path.read_bytes(), "image/png")}).json()
        browser = DevTools(binary, tmp_path / "profile", tmp_path / "chromium.log")
        try:
            browser.open(url + "/")
            assert browser.js("document.title") == "roadcascade · live"
            browser.wait_for("Number(document.body.dataset.polls || 0) >= 2")
            assert browser.js("document.getElementById('phase').textContent") == "ready"
            # traffic for the live numbers once the page is up: they cover the last 10 s, and on a loaded 2-core
            # machine Chromium's start alone took longer than that (traffic sent before it had left the window)
            rng = np.random.default_rng(0)
            for _ in range(12):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
                assert httpx.post(url + "/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"}).status_code == 200
            browser.wait_for("parseFloat(document.getElementById('throughput').textContent) > 0 && "
                             "parseFloat(document.getElementById('p50').textContent) > 0")
            bars = browser.js("[...document.querySelectorAll('#exit-bars .bar')].map(b => b.dataset.tier)")
            assert bars == ["tiny0", "tiny1", "deadline"]
            assert browser.js("[...document.querySelectorAll('#exit-bars .pct')].map(p => parseFloat(p.textContent)).reduce((a, b) => a + b, 0)") == pytest.approx(100, abs=0.5)
            # the upload form: pick the file, submit, wait for the answer
            root = browser.send("DOM.getDocument")["root"]["nodeId"]
            node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#file"})["nodeId"]
            browser.send("DOM.setFileInputFiles", {"files": [str(image_path)], "nodeId": node})
            browser.js("document.getElementById('upload').requestSubmit()")
            assert browser.wait_for("document.body.dataset.result") == "done"
            shown = float(browser.js("document.getElementById('result-prob').textContent"))
            assert shown == pytest.approx(want["probability"], abs=1e-4)
            assert browser.js("document.getElementById('result-label').textContent") == ("roadwork" if want["label"] else "no roadwork")
            rows = browser.js("[...document.querySelectorAll('#trace tbody tr')].map(r => r.cells[0].textContent)")
            assert rows == want["trace"]["tiers"]
            assert f"rule {want['trace']['rule']}" in browser.js("document.getElementById('trace-meta').textContent")
            browser.wait_for("document.getElementById('preview').complete && document.getElementById('preview').naturalWidth === 200")
            rect = browser.js("(() => { const r = document.getElementById('preview').getBoundingClientRect(); "
                              "window.scrollTo(0, 0); return [r.left, r.top + window.scrollY, r.width, r.height]; })()")
            errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
            assert not errors, errors
            shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        finally:
            browser.close()
    import base64

    png = base64.b64decode(shot)
    (tmp_path / "dashboard.png").write_bytes(png)
    if os.environ.get("ROADCASCADE_SCREENSHOT"):
        Path(os.environ["ROADCASCADE_SCREENSHOT"]).write_bytes(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[1] == VIEW_W and img.shape[0] >= 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # a rendered page, not a blank one
    x, y, w, h = (int(round(v)) for v in rect)
    assert 200 <= w <= 202 and 150 <= h <= 152  # the image at its size, plus a 1 px border
    crop = img[y + 3: y + h - 3, x + 3: x + w - 3].reshape(-1, 3)
    orange = np.all(np.abs(crop.astype(int) - ORANGE) < 40, axis=1).mean()
    assert orange > 0.7, f"the uploaded image is not where the page says it is ({orange:.2f} orange)"

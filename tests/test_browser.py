"""report.html in a real browser: headless Chromium, driven over the DevTools Protocol (stdlib only).

The page is opened from its ``file://`` URL; the test asserts that the gallery and the plots are
there, that every embedded PNG decodes, that the browser reports no error (no exception, no
``console.error``, no error in the ``Log`` domain, e.g. a resource that failed to load), and that a
screenshot of the rendered page is not blank. Skipped, with the reason, when no Chromium is installed
(``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from labelrefine.pipeline import run

#: The whole browser session (start, load, checks, screenshot) must finish within this many seconds.
BROWSER_DEADLINE_S = 30.0
#: No single DevTools command or awaited event may take longer than this.
STEP_TIMEOUT_S = 15.0
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    """``$LABELREFINE_CHROMIUM`` if set, else the first of :data:`CHROMIUM_NAMES` on ``PATH``."""
    if os.environ.get("LABELREFINE_CHROMIUM"):
        return os.environ["LABELREFINE_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium with ``--remote-debugging-pipe``: the browser reads NUL-terminated JSON
    commands on its fd 3 and writes NUL-terminated JSON replies and events on its fd 4.

    Every wait is bounded by both :data:`STEP_TIMEOUT_S` and an overall deadline; :meth:`close`
    always ends the browser's whole process group (it runs in a session of its own).
    """

    def __init__(self, binary: str, profile: Path, log: Path, deadline_s: float = BROWSER_DEADLINE_S):
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s
        self.log = log
        self._next_id = 0
        self._buf = b""
        self.events: list[dict] = []  # every event received so far, in order
        # Two pipes: parent -> browser (browser reads at fd 3), browser -> parent (browser writes at fd 4).
        # Creating them fills any hole at fds 3 and 4 of this process, so subprocess's own error pipe
        # never lands there and pass_fds=(3, 4) names open descriptors.
        child_in, self._to_browser = os.pipe()
        self._from_browser, child_out = os.pipe()

        def onto_3_and_4() -> None:  # runs in the child, between fork and exec
            a, b = os.dup(child_in), os.dup(child_out)  # copies first: child_in/child_out may themselves be 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)  # os.dup2 makes the new descriptors inheritable
            os.close(a)
            os.close(b)

        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-dev-shm-usage", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-breakpad", "--mute-audio", "--hide-scrollbars", "--window-size=1200,900",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self._stderr = log.open("wb")
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                                         preexec_fn=onto_3_and_4, pass_fds=(3, 4), start_new_session=True)
        except BaseException:
            for fd in (child_in, child_out, self._to_browser, self._from_browser):
                os.close(fd)
            self._stderr.close()
            raise
        os.close(child_in)  # the browser's ends: closing ours makes a dead browser read as EOF
        os.close(child_out)

    # -- transport --------------------------------------------------------------------------------

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        text = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return "\n".join(text[-15:]) or "(nothing)"

    def _fail(self, what: str) -> CDPError:
        code = self.proc.poll()
        state = "still running" if code is None else f"exited with code {code}"
        return CDPError(f"{what} (browser {state}); its last output:\n{self._stderr_tail()}")

    def _read_one(self, until: float) -> dict:
        """The next message from the browser, waiting until ``until`` (a ``time.monotonic()``) at most."""
        while b"\0" not in self._buf:
            left = min(until, self.deadline) - time.monotonic()
            if left <= 0:
                raise self._fail("timed out waiting for the browser" if until < self.deadline
                                 else f"the {self.deadline_s:.0f} s browser deadline passed")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise self._fail("the browser closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = STEP_TIMEOUT_S) -> dict:
        """Send a command and return its ``result``; events that arrive meanwhile go to :attr:`events`."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        until = time.monotonic() + timeout
        while data:  # commands are small, but never block forever on a full pipe
            if not select.select([], [self._to_browser], [], max(0.0, min(until, self.deadline) - time.monotonic()))[1]:
                raise self._fail(f"timed out sending {method}")
            data = data[os.write(self._to_browser, data):]
        while True:
            reply = self._read_one(until)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str | None = None, after: int = 0,
                   timeout: float = STEP_TIMEOUT_S) -> dict:
        """The first event ``method`` (of ``session``) at or after index ``after`` of :attr:`events`."""
        until = time.monotonic() + timeout
        k = after
        while True:
            for ev in self.events[k:]:
                if ev["method"] == method and (session is None or ev.get("sessionId") == session):
                    return ev
            k = len(self.events)
            msg = self._read_one(until)
            if "method" in msg:
                self.events.append(msg)

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` (errors that a page reports just after its load event)."""
        until = time.monotonic() + seconds
        try:
            while True:
                msg = self._read_one(until)
                if "method" in msg:
                    self.events.append(msg)
        except CDPError:
            if time.monotonic() >= self.deadline or self.proc.poll() is not None:
                raise

    def close(self) -> None:
        """Ask the browser to quit, then kill its process group whatever happened."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(CDPError, OSError):
                    self.send("Browser.close", timeout=2)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=3)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the browser's own session: its zygote, renderers, ...
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            for fd in (self._to_browser, self._from_browser):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._stderr.close()


def page_errors(events: list[dict], session: str) -> list[str]:
    """The errors the page reported: uncaught exceptions, ``console.error``/``console.assert``, and
    ``Log`` entries of level ``error`` (network failures, blocked resources, ...)."""
    errors = []
    for ev in events:
        if ev.get("sessionId") != session:
            continue
        p = ev.get("params", {})
        if ev["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            errors.append(f"console.{p['type']}: {args}")
        elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".rstrip())
    return errors


CHECKS = """(() => {
  const gallery = document.querySelector('section#gallery');
  const plots = document.querySelector('section#plots');
  const imgs = [...document.images];
  const shown = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  return {
    title: document.title,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    gallery: !!gallery,
    suspects: gallery ? gallery.querySelectorAll('figure.suspect').length : 0,
    suspect_imgs_shown: gallery ? [...gallery.querySelectorAll('figure.suspect img')].filter(shown).length : 0,
    plot_imgs: plots ? plots.querySelectorAll('img').length : 0,
    n_imgs: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
  };
})()"""


def test_report_in_headless_chromium(tiny_config, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(f"no Chromium: none of {', '.join(CHROMIUM_NAMES)} is on PATH and $LABELREFINE_CHROMIUM is "
                    "unset (install Debian's `chromium` package; .ci/run does)")
    # threshold 2.5: the tiny model is weak, so the default threshold would relabel nothing (empty gallery)
    run(tiny_config("method=ours", "refine.threshold=2.5"), tmp_path / "out")
    report = (tmp_path / "out" / "report.html").resolve()

    browser = Browser(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        mark = len(browser.events)
        nav = browser.send("Page.navigate", {"url": report.as_uri()}, session=session)
        assert not nav.get("errorText"), f"navigation to {report.as_uri()} failed: {nav['errorText']}"
        browser.wait_event("Page.loadEventFired", session, after=mark)
        browser.drain(0.5)

        res = browser.send("Runtime.evaluate", {"expression": CHECKS, "returnByValue": True}, session=session)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        page = res["result"]["value"]
        assert page["title"].strip(), "the page has no title"
        assert page["sections"] == ["summary", "gallery", "plots"]
        assert page["gallery"] and page["suspects"] >= 1, "the gallery shows no suspected label error"
        assert page["suspect_imgs_shown"] == page["suspects"], "a gallery thumbnail is not laid out"
        assert page["plot_imgs"] >= 1, "the plots section has no image"
        assert page["n_imgs"] >= page["suspects"] + page["plot_imgs"]
        assert page["broken"] == [], f"images that did not decode: {page['broken']}"

        # The whole page (gallery and plots are below the first screen), at most 10,000 CSS pixels tall.
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 10_000), "scale": 1}
        shot = browser.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                            session=session)
        png = base64.b64decode(shot["data"], validate=True)
        errors = page_errors(browser.events, session)
    finally:
        browser.close()

    assert errors == [], "the browser reported errors:\n" + "\n".join(errors)
    (tmp_path / "screenshot.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(png))
    im.load()
    assert im.width >= 400 and im.height >= 300, im.size
    lo, hi = im.convert("L").getextrema()
    assert hi - lo > 100, f"the screenshot is nearly uniform (gray levels {lo}..{hi}): nothing rendered?"

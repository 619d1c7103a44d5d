"""The state diagram renders in a real browser with the Mermaid the docs site ships.

test_diagram.py proves the Mermaid text is current and says exactly what the Machine says;
only a renderer can say whether a reader sees a diagram or an error box, and whether its
labels can be read. So one headless Chromium serves every test here (a module fixture, one
launch): Mermaid 11 from tools/diagram/node_modules (``npm ci``, run by ``python3 dev.py
test``), driven over the DevTools protocol with ``websockets``. Its host resolver maps every
name but 127.0.0.1 to nothing, so no page can reach a CDN.

Pictures for a reviewer are written to build/diagram/: ``state-diagram.png`` and ``.svg``
(what ``render_mermaid`` makes now) and ``before.png`` and ``.svg`` (the diagram shipped
before it was laid out in boxes, with ERROR declared so that it renders at all).
test_diagram_render_site.py looks at the built docs page the same way.

Without Chromium or Mermaid the tests skip with the reason, except as root or under CI,
where ``python3 dev.py test`` should have installed both: there they fail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from docs_hooks.generate import MERMAID_JS
from qqproto import SessionState, _diagram
from tests.test_diagram import changed_machine

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
PICTURES = ROOT / "build" / "diagram"
DEADLINE = 60.0  # seconds; generous for a cold CI machine, never a pause

# The Mermaid text shipped before the diagram was laid out in boxes, verbatim. It parses, but
# Mermaid 11 (GitHub's, and the docs site's) fails to render it: the note is attached to
# ERROR, which is never declared.
BROKEN_DIAGRAM = """\
stateDiagram-v2
    [*] --> IDLE
    IDLE --> PREPARING : start
    PREPARING --> CONNECTING : prepared
    PREPARING --> BACKOFF : prepare_failed, timer_expired
    CONNECTING --> AWAITING_HELLO : transport_opened
    AWAITING_HELLO --> RESUMING : recv_hello [can_resume]
    AWAITING_HELLO --> IDENTIFYING : recv_hello [not can_resume]
    IDENTIFYING --> CLOSING : recv_hello, recv_reconnect, recv_invalid_session, timer_expired, user_close
    RESUMING --> CLOSING : recv_hello, recv_reconnect, recv_invalid_session, timer_expired, user_close
    READY --> CLOSING : recv_hello, recv_reconnect, recv_invalid_session, user_close
    IDENTIFYING --> READY : recv_ready
    RESUMING --> READY : recv_resumed
    AWAITING_HELLO --> CLOSING : recv_reconnect, timer_expired, user_close
    IDENTIFYING --> ZOMBIE : ack_missed
    RESUMING --> ZOMBIE : ack_missed
    READY --> ZOMBIE : ack_missed
    CONNECTING --> BACKOFF : timer_expired, transport_closed [not stopping]
    ZOMBIE --> STOPPED : timer_expired [stopping], transport_closed [stopping]
    ZOMBIE --> BACKOFF : timer_expired [not stopping], transport_closed [not stopping]
    CLOSING --> STOPPED : timer_expired [stopping], transport_closed [stopping]
    CLOSING --> BACKOFF : timer_expired [not stopping], transport_closed [not stopping]
    BACKOFF --> PREPARING : timer_expired
    CONNECTING --> STOPPED : transport_closed [stopping], user_close
    AWAITING_HELLO --> STOPPED : transport_closed [stopping]
    AWAITING_HELLO --> BACKOFF : transport_closed [not stopping]
    IDENTIFYING --> STOPPED : transport_closed [stopping]
    IDENTIFYING --> BACKOFF : transport_closed [not stopping]
    RESUMING --> STOPPED : transport_closed [stopping]
    RESUMING --> BACKOFF : transport_closed [not stopping]
    READY --> STOPPED : transport_closed [stopping]
    READY --> BACKOFF : transport_closed [not stopping]
    IDLE --> STOPPED : user_close
    PREPARING --> STOPPED : user_close
    BACKOFF --> STOPPED : user_close
    note right of ERROR : fail (from every state)
    STOPPED --> [*]
"""  # noqa: E501 - a verbatim copy

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-port=0",
]

# Renders one diagram into the page and measures what a reader would trip over. Boxes are
# the elements' client rectangles; an edge is sampled every 4 px along its path.
RENDER_JS = r"""
window.renderDiagram = async (id, text, measure) => {
  const out = {ok: false};
  try { await mermaid.parse(text); }
  catch (e) { out.stage = 'parse'; out.error = String(e && e.message || e); return out; }
  let svg;
  try { ({svg} = await mermaid.render(id, text)); }
  catch (e) {
    out.stage = 'render'; out.error = String(e && e.message || e);
    document.getElementById('d' + id)?.remove();
    return out;
  }
  const holder = document.createElement('div');
  holder.style.display = 'inline-block';
  holder.id = 'holder-' + id;
  holder.innerHTML = svg;
  document.body.appendChild(holder);
  const el = holder.querySelector('svg');
  const view = el.viewBox.baseVal;
  el.setAttribute('width', view.width);
  el.setAttribute('height', view.height);
  el.style.maxWidth = 'none';
  const frame = el.getBoundingClientRect();
  out.ok = !svg.includes('aria-roledescription="error"');
  out.svg = svg;
  out.clip = {x: frame.x + scrollX, y: frame.y + scrollY, width: frame.width, height: frame.height};
  out.nodes = [...el.querySelectorAll('g.node')].map(n => n.textContent.trim()).filter(t => t);
  if (!measure) return out;
  const boxes = (sel) => [...el.querySelectorAll(sel)]
    .map(e => ({text: e.textContent.trim(), r: e.getBoundingClientRect(),
                id: e.querySelector('[data-id]')?.getAttribute('data-id')}))
    .filter(b => b.text && b.r.width > 0);
  const labels = boxes('g.edgeLabel');
  const nodes = boxes('g.node');
  const titles = boxes('g.cluster-label');
  const area = (a, b) => Math.max(0, Math.min(a.right, b.right) - Math.max(a.left, b.left))
                       * Math.max(0, Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top));
  const overlaps = [];
  for (let i = 0; i < labels.length; i++)
    for (let j = i + 1; j < labels.length; j++)
      if (area(labels[i].r, labels[j].r) > 4) overlaps.push([labels[i].text, labels[j].text]);
  for (const l of labels)
    for (const n of [...nodes, ...titles])
      if (area(l.r, n.r) > 4) overlaps.push([l.text, n.text]);
  const m = el.getScreenCTM();
  const paths = [...el.querySelectorAll('g.edgePaths path')].map(p => {
    const pts = [];
    for (let t = 0, len = p.getTotalLength(); t <= len; t += 4) {
      const q = p.getPointAtLength(t);
      pts.push([q.x * m.a + m.e, q.y * m.d + m.f]);
    }
    const xs = pts.map(q => q[0]), ys = pts.map(q => q[1]);
    const box = {left: Math.min(...xs), right: Math.max(...xs),
                 top: Math.min(...ys), bottom: Math.max(...ys)};
    return {id: p.getAttribute('data-id') || p.id, pts, box};
  });
  const meets = (a, b) =>
    a.left <= b.right && b.left <= a.right && a.top <= b.bottom && b.top <= a.bottom;
  const side = (a, b, c) => (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]);
  const cross = (p, q, r, s) =>
    side(p, q, r) * side(p, q, s) < 0 && side(r, s, p) * side(r, s, q) < 0;
  let crossings = 0;
  for (let i = 0; i < paths.length; i++)
    for (let j = i + 1; j < paths.length; j++) {
      const a = paths[i].pts, b = paths[j].pts;
      if (!meets(paths[i].box, paths[j].box)) continue;
      for (let x = 1; x < a.length; x++)
        for (let y = 1; y < b.length; y++)
          if (cross(a[x - 1], a[x], b[y - 1], b[y])) crossings++;
    }
  const through = [];
  for (const l of labels)
    for (const p of paths)
      if (p.id !== l.id && p.pts.some(([x, y]) =>
          x > l.r.left + 2 && x < l.r.right - 2 && y > l.r.top + 2 && y < l.r.bottom - 2))
        through.push([l.text, p.id]);
  Object.assign(out, {overlaps, through, crossings, labels: labels.map(l => l.text)});
  return out;
};
"""


def _chromium() -> str | None:
    named = os.environ.get("QQPROTO_CHROMIUM")  # a browser elsewhere
    for name in [named] if named else ["chromium", "chromium-browser", "google-chrome"]:
        if found := shutil.which(name):
            return found
    return None


def _require_renderer() -> str:
    """The Chromium to run; skips (or, as root or in CI, fails) without a renderer."""
    chromium = _chromium()
    problem = None
    if not MERMAID_JS.is_file():
        problem = f"Mermaid is not installed ({MERMAID_JS.relative_to(ROOT)} is missing)"
    elif chromium is None:
        problem = "Chromium is not installed"
    if problem is None and chromium is not None:
        return chromium
    advice = "python3 dev.py test installs it (npm ci in tools/diagram; apt-get as root)"
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root or os.environ.get("CI"):
        pytest.fail(f"{problem}: {advice}", pytrace=False)
    pytest.skip(f"{problem}; {advice}")


class Browser:
    """One headless Chromium and its DevTools connection (flat sessions, one per page)."""

    def __init__(self, executable: str, profile: Path) -> None:
        self._proc = subprocess.Popen(  # noqa: S603 - a browser we found, fixed flags
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: deque[str] = deque(maxlen=40)
        found: queue.Queue[str] = queue.Queue()
        # Read stderr to the end: a full pipe would stall the browser.
        self._reader = threading.Thread(target=self._drain, args=(found,), daemon=True)
        self._reader.start()
        self._stack = contextlib.ExitStack()
        try:
            url = found.get(timeout=DEADLINE)
            self._ws: ClientConnection = self._stack.enter_context(
                connect(url, max_size=None, open_timeout=DEADLINE)
            )
        except BaseException:
            self._stop()
            raise
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def _drain(self, found: queue.Queue[str]) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self.log.append(line.rstrip())
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                found.put(m.group(1))

    def _receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self._ws.recv(timeout=DEADLINE))
        return message

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result, keeping events for later."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        while True:
            reply = self._receive()
            if reply.get("id") != self._next_id:
                self._events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            else:
                result: dict[str, Any] = reply["result"]
                return result

    def events(self, session: str, method: str) -> list[dict[str, Any]]:
        """The parameters of every ``method`` event seen so far on ``session``."""
        return [
            e["params"]
            for e in self._events
            if e.get("sessionId") == session and e.get("method") == method
        ]

    def wait_event(self, session: str, method: str) -> dict[str, Any]:
        """The first ``method`` event on ``session`` (waiting for it if none came yet)."""
        while True:
            for event in self._events:
                if event.get("sessionId") == session and event.get("method") == method:
                    self._events.remove(event)
                    params: dict[str, Any] = event["params"]
                    return params
            self._events.append(self._receive())

    def new_page(self, width: int, height: int) -> Page:
        """A fresh tab with the given viewport, network events recorded."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Network.enable"):
            self.call(method, session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return Page(self, session)

    def close(self) -> None:
        """Close the browser and wait for it to exit."""
        try:
            self.call("Browser.close")
        finally:
            self._stop()

    def _stop(self) -> None:
        self._stack.close()
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        assert self._proc.stderr is not None
        self._proc.stderr.close()


class Page:
    """One tab of :class:`Browser`."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.browser.call("Page.navigate", self.session, url=url)
        self.browser.wait_event(self.session, "Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression, promises awaited."""
        reply = self.browser.call(
            "Runtime.evaluate",
            self.session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression[:60]}...: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, clip: dict[str, float], path: Path, scale: float = 1.0) -> None:
        """Save the ``clip`` rectangle of the page (CSS pixels) as a PNG."""
        shot = self.browser.call(
            "Page.captureScreenshot",
            self.session,
            format="png",
            clip={**clip, "scale": scale},
            captureBeyondViewport=True,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


class Renderer:
    """A page with Mermaid loaded; renders Mermaid text and measures the picture."""

    def __init__(self, page: Page, folder: Path) -> None:
        html = folder / "render.html"
        html.write_text(
            '<!doctype html><meta charset="utf-8"><body style="margin:0;background:#fff">'
            f'<script src="{MERMAID_JS.as_uri()}"></script>'
            f"<script>mermaid.initialize({{startOnLoad: false}});{RENDER_JS}</script>",
            encoding="utf-8",
        )
        self.page = page
        page.open(html.as_uri())
        self._done: dict[tuple[str, bool], dict[str, Any]] = {}

    def render(
        self, text: str, picture: str | None = None, *, measure: bool = False
    ) -> dict[str, Any]:
        """Mermaid's verdict on ``text``, with its layout ``measure``d if asked.

        With ``picture``, the drawing is saved as build/diagram/<picture>.png and .svg.
        """
        key = (text, measure)
        if key not in self._done:
            # An id Mermaid keeps: it drops ids that shadow DOM properties (e.g. "before").
            name = f"qqproto-diagram-{len(self._done)}"
            self._done[key] = self.page.evaluate(
                f"renderDiagram({json.dumps(name)}, {json.dumps(text)}, {json.dumps(measure)})"
            )
        result = self._done[key]
        if picture is not None and result["ok"]:
            svg = PICTURES / f"{picture}.svg"
            svg.parent.mkdir(parents=True, exist_ok=True)
            svg.write_text(result["svg"], encoding="utf-8")
            # Twice the CSS size: labels stay sharp when a reviewer zooms in.
            self.page.screenshot(result["clip"], svg.with_suffix(".png"), scale=2)
        return result


def running_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """A fresh Chromium for a module's tests (one launch), closed after them."""
    chromium = _require_renderer()
    running = Browser(chromium, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    yield from running_browser(tmp_path_factory)


@pytest.fixture(scope="module")
def renderer(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    return Renderer(browser.new_page(2400, 1600), tmp_path_factory.mktemp("render"))


def _declared(text: str) -> str:
    """``text`` with ERROR declared first: the one change the old diagram needed to render."""
    head, _, rest = text.partition("\n")
    return f"{head}\n    ERROR\n{rest}"


def _file_block() -> str:
    markdown = _diagram.DIAGRAM_PATH.read_text(encoding="utf-8")
    match = re.search(r"```mermaid\n(.*?)```", markdown, re.DOTALL)
    assert match is not None
    return match.group(1)


# ------------------------------------------------------------------------------ renders


def test_the_renderer_is_the_mermaid_readers_get() -> None:
    # Material loads mermaid@11 when no Mermaid is shipped; GitHub runs 11 as well.
    _require_renderer()
    package = json.loads((MERMAID_JS.parents[1] / "package.json").read_text(encoding="utf-8"))
    assert package["version"].startswith("11."), package["version"]


def test_the_generated_diagram_renders(renderer: Renderer) -> None:
    result = renderer.render(_diagram.render_mermaid(), picture="state-diagram")
    assert result["ok"], f"{result.get('stage')}: {result.get('error')}"
    drawn = set(result["nodes"])
    assert {state.name for state in SessionState} <= drawn, drawn


def test_the_diagram_github_shows_renders(renderer: Renderer) -> None:
    # GitHub renders state_diagram.md itself, so that text must render, current or not.
    result = renderer.render(_file_block())
    assert result["ok"], f"{result.get('stage')}: {result.get('error')}"


def test_the_old_diagram_fails_to_render(renderer: Renderer) -> None:
    # What readers saw instead of the lifecycle: proof that this test can fail.
    result = renderer.render(BROKEN_DIAGRAM)
    assert not result["ok"]
    assert result["stage"] == "render"
    assert "No such shape: undefined" in result["error"]


def test_diagrams_of_changed_machines_render(renderer: Renderer) -> None:
    # Whatever the state table becomes, `python3 dev.py diagram` must give a diagram that
    # renders (test_diagram.py checks that it says what the table says).
    failed = []
    for seed in range(3):
        result = renderer.render(_diagram.render_mermaid(changed_machine(seed)))
        if not result["ok"]:
            failed.append((seed, result.get("stage"), result.get("error")))
    assert not failed


# ---------------------------------------------------------------------------- legible


def _measure(result: dict[str, Any]) -> str:
    return (
        f"{len(result['overlaps'])} overlapping labels, {len(result['through'])} edges "
        f"through a label, {result['crossings']} edge crossings, "
        f"{result['clip']['width']:.0f} x {result['clip']['height']:.0f} px"
    )


def test_no_label_is_hidden_under_another_or_under_an_edge(renderer: Renderer) -> None:
    result = renderer.render(_diagram.render_mermaid(), picture="state-diagram", measure=True)
    print(f"state diagram: {_measure(result)}")  # noqa: T201 - shown with -s
    look = f"look at {PICTURES.relative_to(ROOT)}/state-diagram.png; the layout rules are in"
    look += " qqproto/_diagram.py"
    assert result["overlaps"] == [], f"labels drawn over labels or states: {look}"
    assert result["through"] == [], f"edges drawn through labels: {look}"


def test_the_old_diagram_was_the_tangle_readers_saw(renderer: Renderer) -> None:
    # Declared so that it renders, the old diagram fails the check above: the check can fail.
    before = renderer.render(_declared(BROKEN_DIAGRAM), picture="before", measure=True)
    after = renderer.render(_diagram.render_mermaid(), measure=True)
    assert before["ok"], before.get("error")
    print(f"before: {_measure(before)}\nafter: {_measure(after)}")  # noqa: T201
    assert before["overlaps"]
    assert before["through"]
    assert after["crossings"] < before["crossings"]

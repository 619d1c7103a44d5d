"""The docs site's state-diagram page renders its diagram offline, with no CDN.

Material fetches Mermaid from unpkg at page load unless the page already has one; the docs
hook ships the pinned copy with the site. This builds the site strictly, serves it on
loopback and opens the page in the headless Chromium of test_diagram_render.py (whose host
resolver reaches nothing but 127.0.0.1), then checks that the diagram became an SVG, that
no request left the site, and saves build/diagram/docs-page.png for a reviewer.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qqproto import SessionState
from tests.test_diagram_render import DEADLINE, PICTURES, Browser, running_browser

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent

# Material attaches each rendered diagram to a *closed* shadow root; open it to look inside.
OPEN_SHADOW_ROOTS_JS = """
const attach = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) {
  return attach.call(this, {...init, mode: 'open'});
};
"""

# Resolves once Material has swapped the diagram's <pre> for a rendered <div>, or at the end of
# a deadline (then with what the page shows instead).
WAIT_FOR_DOCS_DIAGRAM_JS = """
new Promise(resolve => {
  const look = () => {
    const svg = document.querySelector('div.mermaid')?.shadowRoot?.querySelector('svg');
    if (!svg) return false;
    const box = document.querySelector('div.mermaid').getBoundingClientRect();
    resolve({role: svg.getAttribute('aria-roledescription'), text: svg.textContent,
             raw: document.querySelectorAll('pre.mermaid').length,
             height: box.bottom + scrollY});
    return true;
  };
  if (look()) return;
  const watch = new MutationObserver(look);
  watch.observe(document.body, {childList: true, subtree: true});
  setTimeout(() => { watch.disconnect(); resolve({
    role: null, raw: document.querySelectorAll('pre.mermaid').length,
    text: document.querySelector('.mermaid')?.textContent ?? ''}); }, %d);
})
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    yield from running_browser(tmp_path_factory)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture(scope="module")
def served_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The documentation site, built strictly and served on loopback; yields its base URL."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(  # noqa: S603 - our own build, fixed arguments
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    handler = functools.partial(_QuietHandler, directory=str(out))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join(timeout=DEADLINE)


def test_the_docs_page_renders_the_diagram_without_a_cdn(
    browser: Browser, served_site: str
) -> None:
    page = browser.new_page(1280, 900)
    browser.call("Page.addScriptToEvaluateOnNewDocument", page.session, source=OPEN_SHADOW_ROOTS_JS)
    page.open(served_site + "state-diagram/")
    shown = page.evaluate(WAIT_FOR_DOCS_DIAGRAM_JS % (DEADLINE * 1000 / 2))
    requested = [
        e["request"]["url"] for e in browser.events(page.session, "Network.requestWillBeSent")
    ]
    elsewhere = [url for url in requested if not url.startswith((served_site, "data:", "blob:"))]
    assert elsewhere == [], f"the page reached beyond the site: {elsewhere}"
    assert served_site + "javascripts/mermaid.min.js" in requested
    assert shown["role"] == "stateDiagram", f"not rendered; the page shows: {shown['text'][:200]}"
    assert shown["raw"] == 0
    for state in SessionState:
        assert state.name in shown["text"], state
    page.screenshot(
        {"x": 0, "y": 0, "width": 1280, "height": shown["height"] + 24}, PICTURES / "docs-page.png"
    )

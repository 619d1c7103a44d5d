"""The documentation site builds, covers the public API, and its generated pages match the code.

The site is built once (``mkdocs build --strict`` in a subprocess, into a temporary folder)
and the tests read what a reader gets: the objects inventory of the API reference, the
configuration page and the state-diagram page.
"""

from __future__ import annotations

import argparse
import ast
import functools
import html
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from qqproto import _diagram
from qqproto._close_codes import CLOSE_CODE_POLICY
from qqproto_io._cli import _parser

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = ("qqproto", "qqproto.testing", "qqproto_io")
# Set in the build's environment: the CLI parser reads its defaults from QQBOT_* variables,
# and none of these values may reach a page.
SENTINELS = {
    "QQBOT_APP_ID": "sentinel-app-id-5b1f",
    "QQBOT_CLIENT_SECRET": "sentinel-secret-9c2e",
    "QQBOT_PROXY": "http://sentinel-proxy-7d3a:3128",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, **SENTINELS, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(  # noqa: S603 - our own build, fixed arguments
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def _inventory(site: Path) -> set[str]:
    """The object names in the site's Sphinx-style ``objects.inv``."""
    raw = (site / "objects.inv").read_bytes()
    header, _, body = raw.partition(b"zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2"), header[:40]
    lines = zlib.decompress(body).decode("utf-8").splitlines()
    return {line.split(" ", 1)[0] for line in lines if line.strip()}


# --------------------------------------------------------------------- API reference


def test_api_reference_covers_every_public_name(site: Path) -> None:
    documented = _inventory(site)
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if f"{module}.{name}" not in documented
    ]
    assert not missing, f"not in the API reference: {missing}"


def test_each_public_module_has_a_reference_page() -> None:
    pages = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    for module in PUBLIC_MODULES:
        assert re.search(rf"^::: {re.escape(module)}$", pages, re.MULTILINE), module


# ------------------------------------------------------------------------ docstrings


def _own_docstring(obj: object) -> str | None:
    """The docstring written in the source (not a dataclass's or an enum's made-up one)."""
    if inspect.isclass(obj):
        try:
            source = textwrap.dedent(inspect.getsource(obj))
        except (OSError, TypeError):
            return obj.__doc__
        node = ast.parse(source).body[0]
        assert isinstance(node, ast.ClassDef)
        return ast.get_docstring(node)
    return inspect.getdoc(obj)


def _public_methods(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties of ``cls`` and of its bases from this project."""
    found: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith(("qqproto", "qqproto_io")):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            func: object = value
            if isinstance(value, staticmethod | classmethod):
                func = value.__func__
            elif isinstance(value, property):
                func = value.fget
            elif isinstance(value, functools.cached_property):
                func = value.func
            if inspect.isfunction(func):
                found[name] = func
    return sorted(found.items())


def _undocumented() -> list[str]:
    missing: list[str] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue  # constants and type aliases
            where = f"{module_name}.{name}"
            if not (_own_docstring(obj) or "").strip():
                missing.append(f"{where} ({inspect.getsourcefile(obj)})")
            if inspect.isclass(obj):
                for method, func in _public_methods(obj):
                    if not (inspect.getdoc(func) or "").strip():
                        missing.append(f"{where}.{method} ({inspect.getsourcefile(func)})")
    return missing


def test_every_public_name_has_a_docstring() -> None:
    missing = _undocumented()
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


# ------------------------------------------------------------ configuration reference


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    commands = {"qqproto": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[f"qqproto {name}"] = sub
    return commands


def test_configuration_reference_lists_every_option(site: Path) -> None:
    page = html.unescape(_page(site, "configuration"))
    sections = re.split(r"<h3 id=[^>]*>", page)
    commands = _commands(_parser())
    assert len(commands) > 1
    for command, parser in commands.items():
        # The section of this command: its heading, then its table.
        (section,) = [s for s in sections if s.startswith(f"<code>{command}</code>")]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert re.search(rf"<code>{re.escape(option)}[ <]", section), (command, option)
            for variable in re.findall(r"QQBOT_[A-Z_]+", action.help or ""):
                assert f"<code>{variable}</code>" in section, (command, variable)


def test_no_environment_value_reaches_the_site(site: Path) -> None:
    for path in site.rglob("*"):
        if path.suffix in {".html", ".xml", ".json", ".txt"}:
            text = path.read_text(encoding="utf-8", errors="replace")
            for value in SENTINELS.values():
                assert value not in text, (path, value)


# ------------------------------------------------------------- generated diagram pages


def _mermaid_blocks(page: str) -> list[str]:
    blocks = re.findall(r'<pre class="mermaid"><code>(.*?)</code></pre>', page, re.DOTALL)
    return [html.unescape(b) for b in blocks]


def test_diagram_page_equals_the_diagram_source(site: Path) -> None:
    (shown,) = _mermaid_blocks(_page(site, "state-diagram"))
    source = (ROOT / "state_diagram.md").read_text(encoding="utf-8")
    match = re.search(r"```mermaid\n(.*?)```", source, re.DOTALL)
    assert match is not None
    # The fence drops the block's final newline; the text is otherwise the same.
    assert shown == match.group(1).removesuffix("\n")
    assert shown == _diagram.render_mermaid().removesuffix("\n")


def test_state_diagram_page_has_the_generated_tables(site: Path) -> None:
    page = html.unescape(_page(site, "state-diagram"))
    for edge in _diagram.edges():
        assert f"<code>{edge.trigger}</code>" in page, edge
    for heading in ("States", "Guards", "Transitions", "Close-code policy"):
        assert f">{heading}<" in page, heading


def test_concepts_page_renders_the_close_code_table_from_the_code(site: Path) -> None:
    page = html.unescape(_page(site, "concepts"))
    assert "<!-- qqproto:" not in page
    for code, policy in CLOSE_CODE_POLICY.items():
        if code < 4900 or code > 4913:
            assert f"<td>{code}</td>" in page, code
        assert policy.meaning in page, code
    assert "<td>4900-4913</td>" in page


# --------------------------------------------------------------------------- examples


def test_python_examples_on_the_site_pages_compile() -> None:
    # README.md and docs/testing.md run in tests/test_docs.py; the others at least parse.
    for path in sorted((ROOT / "docs").rglob("*.md")):
        if path.name == "testing.md":
            continue
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
            compile(block, str(path), "exec")


def test_an_unknown_marker_fails_the_build() -> None:
    from mkdocs.exceptions import PluginError

    from docs_hooks.generate import replace_markers

    assert replace_markers("no marker here") == "no marker here"
    with pytest.raises(PluginError, match="qqproto:nope"):
        replace_markers("<!-- qqproto:nope -->", "page.md")

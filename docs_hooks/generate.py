# Build-time generation for the documentation site, so that no page can drift from the code.
#
# Pages under docs/ hold marker comments (invisible on GitHub); `on_page_markdown` replaces
# each one with text rendered from the code at build time:
#
#   <!-- qqproto:state-diagram -->  qqproto._diagram.render_markdown(), minus its title
#                                   (the Mermaid diagram, states, guards, transitions)
#   <!-- qqproto:close-codes -->    qqproto._diagram.render_close_codes()
#   <!-- qqproto:cli-options -->    every subcommand and option of qqproto_io._cli._parser()
#
# A marker that is not known fails the build.
# The CLI reference is rendered with every QQBOT_* variable removed from the environment:
# the parser reads its defaults from there, and a secret must never end up in a page.
#
# Mermaid ships with the site. Material renders ```mermaid blocks with a page-global
# `mermaid` when one is loaded, and only otherwise fetches mermaid@11 from unpkg at page
# load: offline, or where unpkg is slow or blocked, readers then saw the diagram's source.
# `on_files` copies the pinned mermaid.min.js (tools/diagram, installed by `npm ci`, which
# `python3 dev.py test` runs) into the site, and `on_post_page` loads it on the pages that
# have a diagram: it is 3.5 MB, and the other pages do not need it. The build fails when it
# is missing rather than quietly publishing pages that depend on a CDN.
"""MkDocs hook: replaces marker comments in docs/ with text generated from the code."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

__all__ = [
    "MARKERS",
    "MERMAID_JS",
    "MERMAID_URI",
    "cli_options",
    "render_cli_reference",
    "replace_markers",
]

MERMAID_JS = (
    Path(__file__).resolve().parent.parent
    / "tools"
    / "diagram"
    / "node_modules"
    / "mermaid"
    / "dist"
    / "mermaid.min.js"
)
"""Mermaid as npm installs it from ``tools/diagram/package-lock.json``."""

MERMAID_URI = "javascripts/mermaid.min.js"
"""Where the site serves it."""

_MARKER = re.compile(r"<!-- qqproto:([a-z-]+) -->")
_ENV = re.compile(r"\bQQBOT_[A-Z_]+\b")
_PROG = "qqproto"


def _state_diagram() -> str:
    from qqproto._diagram import render_markdown  # noqa: PLC0415 - imported at build time

    text = render_markdown()
    # The page has its own title and introduction; keep the generated sections.
    start = text.index("```mermaid")
    return text[start:]


def _close_codes() -> str:
    from qqproto._diagram import render_close_codes  # noqa: PLC0415

    return render_close_codes()


def _parser() -> argparse.ArgumentParser:
    from qqproto_io._cli import _parser as cli_parser  # noqa: PLC0415

    # The defaults come from QQBOT_* variables: render what a clean environment gets.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        return cli_parser()


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, Any]]:
    """(name, help, parser) of every subcommand, in declaration order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]


def cli_options() -> dict[str, list[argparse.Action]]:
    """Every option of the ``qqproto`` parser, keyed by command (``qqproto`` = global)."""
    parser = _parser()
    result = {_PROG: _options(parser)}
    for name, _help, sub in _subcommands(parser):
        result[f"{_PROG} {name}"] = _options(sub)
    return result


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    # Python-Markdown's tables do not split at a pipe inside a code span: no escaping there.
    return "`" + text.replace("\n", " ") + "`"


def _default(action: argparse.Action) -> str:
    if "secret" in action.dest:
        return "—"  # never a secret's value, whatever the parser holds
    option = getattr(action, "option", None)
    if option is not None:  # qqproto_io._options: the one declaration of the option
        if option.switch:
            return "off"
        return "—" if option.default is None else _code(option.default)
    if isinstance(action, argparse._VersionAction):
        return "—"
    if isinstance(action, argparse._StoreTrueAction):
        return "off" if action.default is False else _code(str(action.default))
    default = action.default
    if default is None or default == [] or default is argparse.SUPPRESS:
        return "—"
    return _code(str(default))


def _meaning(action: argparse.Action) -> str:
    option = getattr(action, "option", None)
    if option is not None:
        return _cell(option.help)
    text = action.help or ""
    if text == argparse.SUPPRESS:
        text = ""
    if action.choices is not None:
        text += " (one of " + ", ".join(_code(str(c)) for c in action.choices) + ")"
    if isinstance(action, argparse._AppendAction) and "repeatable" not in text:
        text += " (repeatable)"
    if action.type is not None:
        text += f" (type: {getattr(action.type, '__name__', str(action.type))})"
    return _cell(text.strip()) or "—"


def _flag(action: argparse.Action) -> str:
    takes_value = action.nargs != 0
    metavar = action.metavar or action.dest.upper()
    names = []
    for option in action.option_strings:
        shown = f"{option} {metavar}" if takes_value and option.startswith("--") else option
        names.append(_code(shown))
    return ", ".join(names)


def _environment(action: argparse.Action) -> str:
    option = getattr(action, "option", None)
    if option is not None:
        return _code(option.env) if option.env else "—"
    names = sorted(set(_ENV.findall(action.help or "")))
    return ", ".join(_code(n) for n in names) or "—"


def render_cli_reference() -> str:
    """The configuration reference: a table per command, from ``_parser()`` itself."""
    parser = _parser()
    out: list[str] = []
    helps = {name: text for name, text, _ in _subcommands(parser)}
    for command, actions in cli_options().items():
        out += [f"### `{command}`", ""]
        if command == _PROG:
            out += [_cell(parser.description or ""), ""]
        else:
            out += [_cell(helps.get(command.removeprefix(f"{_PROG} "), "")), ""]
        out += ["| flag | environment | default | meaning |", "|---|---|---|---|"]
        out += [
            f"| {_flag(a)} | {_environment(a)} | {_default(a)} | {_meaning(a)} |" for a in actions
        ]
        out.append("")
    return "\n".join(out)


MARKERS: dict[str, Callable[[], str]] = {
    "state-diagram": _state_diagram,
    "close-codes": _close_codes,
    "cli-options": render_cli_reference,
}
"""Marker name -> the function that renders its replacement."""


def replace_markers(markdown: str, where: str = "<page>") -> str:
    """Replace every ``<!-- qqproto:NAME -->`` marker; an unknown name is a ``PluginError``."""

    def render(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in MARKERS:
            raise PluginError(f"{where}: unknown marker qqproto:{name}")
        return MARKERS[name]().rstrip("\n")

    return _MARKER.sub(render, markdown)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001
    """MkDocs event: generate the marked parts of a page from the code."""
    return replace_markers(markdown, page.file.src_uri)


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    """MkDocs event: add the pinned Mermaid to the site."""
    if not MERMAID_JS.is_file():
        raise PluginError(
            f"{MERMAID_JS} is missing: run `npm ci` in tools/diagram "
            "(python3 dev.py test does), so that the site renders its diagrams without a CDN"
        )
    files.append(File.generated(config, MERMAID_URI, abs_src_path=str(MERMAID_JS)))
    return files


def on_post_page(output: str, *, page: Page, config: MkDocsConfig) -> str:  # noqa: ARG001
    """MkDocs event: load Mermaid on a page with a diagram, before Material looks for it."""
    if '<pre class="mermaid">' not in output:
        return output
    src = get_relative_url(MERMAID_URI, page.url)
    # A plain (blocking) script at the end of the body runs before DOMContentLoaded, which
    # is when Material's bundle mounts its components and checks for a global `mermaid`.
    head, body_end, tail = output.rpartition("</body>")
    if not body_end:
        raise PluginError(f"{page.file.src_uri}: no </body> to load Mermaid before")
    return f'{head}<script src="{src}"></script>\n{body_end}{tail}'

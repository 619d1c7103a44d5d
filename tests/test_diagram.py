"""state_diagram.md is generated from the state table and is never stale."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

from qqproto import GatewayConnection, SessionState, _diagram, _states
from tests.helpers import Driver

ROOT = Path(__file__).resolve().parent.parent
DIAGRAM = ROOT / "state_diagram.md"


def _mermaid_block(text: str) -> str:
    match = re.search(r"```mermaid\n(.*?)```", text, re.DOTALL)
    assert match is not None, "no mermaid block"
    return match.group(1)


def test_state_diagram_md_is_up_to_date() -> None:
    assert DIAGRAM == _diagram.DIAGRAM_PATH
    current = DIAGRAM.read_text(encoding="utf-8")
    assert current == _diagram.render_markdown(), (
        "state_diagram.md is stale: run `python3 dev.py diagram`"
    )


def test_check_command_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qqproto._diagram", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mermaid_block_shape() -> None:
    block = _mermaid_block(_diagram.render_markdown())
    lines = block.splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert "    [*] --> IDLE" in lines
    assert block == _diagram.render_mermaid()
    for state in SessionState:
        assert re.search(rf"\b{state.name}\b", block), state
    assert "[can_resume]" in block
    assert "[not can_resume]" in block
    assert "[stopping]" in block
    assert "[not stopping]" in block
    # The guarded Hello branches go where the table says.
    assert "AWAITING_HELLO --> RESUMING : recv_hello [can_resume]" in block
    assert "AWAITING_HELLO --> IDENTIFYING : recv_hello [not can_resume]" in block


def test_markdown_documents_every_state_and_guard() -> None:
    text = _diagram.render_markdown()
    for state in SessionState:
        assert f"| `{state.name}` | {_states.STATE_DOCS[state]} |" in text
    for guard, meaning in _states.GUARDS.items():
        assert f"| `{guard}` | {meaning} |" in text


def test_rendering_is_deterministic() -> None:
    assert _diagram.render_markdown() == _diagram.render_markdown()
    assert _diagram.render_mermaid() == _diagram.render_mermaid()
    fresh = GatewayConnection(rng=random.Random(123))._machine
    assert _diagram.render_markdown(fresh) == _diagram.render_markdown()


def test_rendering_ignores_the_current_state() -> None:
    drv = Driver()
    drv.connect_ready()
    assert drv.conn.state is SessionState.READY
    machine = drv.conn._machine
    assert _diagram.render_markdown(machine) == _diagram.render_markdown()
    assert _diagram.render_markdown(machine) == DIAGRAM.read_text(encoding="utf-8")
    # ... and rendering does not move the model either.
    assert drv.conn.state is SessionState.READY
    drv.server_close(1006)
    assert drv.conn.state is SessionState.BACKOFF
    assert _diagram.render_mermaid(drv.conn._machine) == _diagram.render_mermaid()


def _spec_keys() -> set[tuple[str, str, str | None, tuple[str, ...]]]:
    keys: set[tuple[str, str, str | None, tuple[str, ...]]] = set()
    for spec in _states.TRANSITIONS:
        dest = spec["dest"]
        dest_name = dest.name if isinstance(dest, SessionState) else None
        guards = tuple(str(c) for c in spec.get("conditions", []))
        for source in spec["source"]:
            assert isinstance(source, SessionState)
            keys.add((spec["trigger"], source.name, dest_name, guards))
    return keys


def test_every_edge_comes_from_a_spec_and_every_spec_is_drawn() -> None:
    specs = _spec_keys()
    drawn: set[tuple[str, str, str | None, tuple[str, ...]]] = set()
    for edge in _diagram.edges():
        # A drawn guard is either the spec's own guard or the negation of an earlier one
        # (the unguarded fallback); match on the spec's own guards.
        own = () if not edge.guard or edge.guard.startswith("not ") else (edge.guard,)
        key = (edge.trigger, edge.source, edge.dest, own)
        assert key in specs, edge
        drawn.add(key)
    assert drawn == specs


def test_fallback_edges_name_the_negated_guard() -> None:
    for edge in _diagram.edges():
        if edge.guard.startswith("not "):
            guarded = [
                e
                for e in _diagram.edges()
                if (e.trigger, e.source) == (edge.trigger, edge.source)
                and e.guard == edge.guard.removeprefix("not ")
            ]
            assert guarded, edge


def test_every_transition_line_of_the_table_is_in_the_markdown() -> None:
    text = _diagram.render_markdown()
    for edge in _diagram.edges():
        dest = f"`{edge.dest}`" if edge.dest is not None else "(unchanged)"
        guard = f"`{edge.guard}`" if edge.guard else ""
        assert f"| `{edge.trigger}` | `{edge.source}` | {dest} | {guard} |" in text

"""state_diagram.md is generated from the state table and is never stale."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from transitions import Machine

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
        # Declared, not only named: a note about an undeclared state does not render.
        assert re.search(rf"^ +{state.name}$", block, re.MULTILINE), state
    # The guarded Hello branches go where the table says, through one choice.
    assert "    AWAITING_HELLO --> if_can_resume : recv_hello" in lines
    assert "    if_can_resume --> RESUMING : [can_resume]" in lines
    assert "    if_can_resume --> IDENTIFYING : [not can_resume]" in lines
    assert "    if_stopping --> STOPPED : [stopping]" in lines
    assert "    if_stopping --> BACKOFF : [not stopping]" in lines


def test_shared_exits_are_drawn_once_from_a_box() -> None:
    block = _diagram.render_mermaid()
    # Named after the groups of qqproto/_states.py with the same members.
    assert 'state "linked" as LINKED {' in block
    assert "LINKED --> CLOSING : recv_reconnect, user_close" in block
    assert "CLOSABLE --> if_stopping : transport_closed" in block
    assert "transport_closed" not in block.replace(
        "CLOSABLE --> if_stopping : transport_closed", ""
    )
    # Reached from every state: a note, not an arrow from each.
    assert "note right of ERROR : fail from every state" in block
    assert "--> ERROR" not in block
    assert "--> STOPPED : user_close" not in block


def test_notes_are_written_in_their_states_box() -> None:
    # Mermaid 10 moves a state to the block its note is written in, out of its box.
    lines = _diagram.render_mermaid().splitlines()
    declared = {line.strip(): line for line in lines if re.fullmatch(r" +\w+", line)}
    notes = [line for line in lines if line.strip().startswith("note right of ")]
    assert notes
    for note in notes:
        state = note.split()[3]
        indent = len(declared[state]) - len(declared[state].lstrip())
        assert len(note) - len(note.lstrip()) == indent, note


def test_the_happy_path_is_highlighted() -> None:
    (line,) = [x for x in _diagram.render_mermaid().splitlines() if x.startswith("    class ")]
    assert line == (
        "    class IDLE, PREPARING, CONNECTING, AWAITING_HELLO, IDENTIFYING, RESUMING, READY main"
    )


# ----------------------------------------------------------- the picture is the machine


Transition = tuple[str, str, str, str]  # trigger, source, dest, guard


def expand(mermaid: str) -> set[Transition]:
    """Read the generated Mermaid back into transitions, boxes, choices and notes undone.

    Independent of the generator: it knows only what the notation means (an arrow from a
    box leaves every state inside it; a choice's arrows carry the guards; a note lists
    sources), so a wrong picture cannot be read back as the right table.
    """
    members: dict[str, set[str]] = {}  # box id -> states inside (at any depth)
    states: list[str] = []
    choices: set[str] = set()
    arrows: list[tuple[str, str, list[str]]] = []
    notes: list[tuple[str, str]] = []
    open_boxes: list[str] = []
    lines = iter(mermaid.splitlines()[1:])
    for raw in lines:
        line = raw.strip()
        if m := re.fullmatch(r'state "[^"]+" as (\w+) \{', line):
            open_boxes.append(m.group(1))
            members[m.group(1)] = set()
        elif line == "}":
            open_boxes.pop()
        elif m := re.fullmatch(r"state (\w+) <<choice>>", line):
            choices.add(m.group(1))
        elif re.fullmatch(r"\w+", line):
            states.append(line)
            for box in open_boxes:
                members[box].add(line)
        elif m := re.fullmatch(r"(\w+) --> (\w+) : (.+)", line):
            arrows.append((m.group(1), m.group(2), m.group(3).split(", ")))
        elif m := re.fullmatch(r"note right of (\w+) : (.+)", line):
            notes.append((m.group(1), m.group(2)))
        elif m := re.fullmatch(r"note right of (\w+)", line):
            state = m.group(1)
            notes += [(state, text) for text in iter(lambda: next(lines).strip(), "end note")]
        else:
            assert line.startswith(("classDef ", "class ", "[*] --> ")) or line.endswith(
                " --> [*]"
            ), line

    def leaves(node: str) -> set[str]:
        return members.get(node, {node})

    def split(label: str) -> tuple[str, str]:
        m = re.fullmatch(r"(\w+)(?: \[(.+)\])?", label)
        assert m is not None, label
        return m.group(1), m.group(2) or ""

    out_of: dict[str, list[tuple[str, str]]] = {}
    for src, dst, labels in arrows:
        if src in choices:
            for label in labels:
                guard = re.fullmatch(r"\[(.+)\]", label)
                assert guard is not None, label
                out_of.setdefault(src, []).append((guard.group(1), dst))
    found: set[Transition] = set()
    for src, dst, labels in arrows:
        if src in choices:
            continue
        for label in labels:
            trigger, guard = split(label)
            for source in leaves(src):
                if dst in choices:
                    assert not guard, label
                    found |= {(trigger, source, d, g) for g, d in out_of[dst]}
                else:
                    found.add((trigger, source, dst, guard))
    for dst, text in notes:
        label, _, sources = text.rpartition(" from ")
        trigger, guard = split(label)
        names = [s for s in states if s != dst] if sources == "every state" else sources.split(", ")
        found |= {(trigger, source, dst, guard) for source in names}
    return found


def _table(machine: Machine | None = None) -> set[Transition]:
    return {
        (e.trigger, e.source, e.dest, e.guard)
        for e in _diagram.edges(machine)
        if e.dest is not None
    }


class _Model:
    """A bare model: the diagram only reads the Machine's tables, never a guard."""


def changed_machine(seed: int) -> Machine:
    """A Machine built from TRANSITIONS with a few random specs dropped, added or redirected.

    Stands in for whatever the state table becomes: the generator may rely on no edge of
    today's table.
    """
    rng = random.Random(seed)
    specs = [dict(spec) for spec in _states.TRANSITIONS]
    states = list(SessionState)
    triggers = sorted({str(spec["trigger"]) for spec in specs})
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["drop", "add", "add_guarded", "redirect"])
        if kind == "drop" and len(specs) > 1:
            specs.pop(rng.randrange(len(specs)))
        elif kind == "redirect":
            spec = rng.choice(specs)
            spec["dest"] = rng.choice([*states, None])
        else:
            trigger = rng.choice([*triggers, "extra_input"])
            sources = rng.sample(states, rng.randint(1, 6))
            dest = rng.choice(states)
            at = rng.randrange(len(specs) + 1)
            added: list[dict[str, Any]] = [{"trigger": trigger, "source": sources, "dest": dest}]
            if kind == "add_guarded":
                added[0]["conditions"] = [rng.choice(sorted(_states.GUARDS))]
                if rng.random() < 0.7:  # usually with its fallback, as the table does
                    added.append(
                        {"trigger": trigger, "source": sources, "dest": rng.choice(states)}
                    )
            specs[at:at] = added
    return Machine(
        model=_Model(),
        states=SessionState,
        transitions=specs,
        initial=SessionState.IDLE,
        auto_transitions=False,
    )


def test_the_layout_does_not_depend_on_string_hashing() -> None:
    # The layout works with sets of state names; their order must never reach the text.
    script = (
        "from qqproto import _diagram; from tests.test_diagram import changed_machine; "
        "print(_diagram.render_mermaid()); "
        "[print(_diagram.render_mermaid(changed_machine(seed))) for seed in range(40)]"
    )
    outputs = {
        subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_the_picture_holds_exactly_the_state_changing_transitions() -> None:
    assert expand(_diagram.render_mermaid()) == _table()


def test_the_picture_stays_exact_when_the_table_changes() -> None:
    for seed in range(300):
        machine = changed_machine(seed)
        text = _diagram.render_mermaid(machine)
        assert expand(text) == _table(machine), f"seed {seed}:\n{text}"


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

# The layout of state_diagram.md, computed from the Machine a GatewayConnection really runs.
#
# We walk the plain pytransitions Machine (events -> sources -> transitions, in declaration
# order) instead of using GraphMachine: that keeps graph extensions out of the runtime, and
# GraphMachine's output is one arrow per transition, styled after the model's *current*
# state, so it is both unreadable at this size and changes as the model moves. A guarded
# transition followed by an unguarded one for the same trigger and source means `[guard]` /
# `[not guard]`, which is what pytransitions evaluates.
#
# Drawn as a transition table, the lifecycle is ~60 arrows, most of them the same few exits
# repeated from every state. So the picture is laid out from the machine's data by rules that
# name no state or trigger, and must keep working whatever TRANSITIONS becomes:
#
# - Transitions that share trigger, guard and destination form a group with a set of sources.
#   A source set becomes a composite state (a box), and each group leaving from all of it one
#   arrow from the box. Boxes nest but never overlap, chosen greedily by how many arrows they
#   save; a box is named after the `_states` list with the same members.
# - A `[g]` / `[not g]` pair for one trigger and source set becomes one arrow into a choice
#   diamond, shared by every trigger that splits on the same guard to the same two states.
# - A group that would still need three or more arrows (the application's close from the
#   unconnected states; `fail`, from every state) is written as a note on its destination.
# - The happy path (shortest paths from the initial state to the states nested deepest,
#   i.e. the live session) is highlighted.
# - Mermaid's dagre layout routes an arrow from a box as if it left the box's first
#   declared member, so members are declared last-first: shared exits then start below the
#   box instead of cutting through it.
#
# Every transition is still listed in the table below the picture, and the render test
# (tests/test_diagram_render.py) draws the picture with the same Mermaid the docs site ships.
"""Edges of the lifecycle Machine, and how the diagram groups them into boxes and notes."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qqproto import _states
from qqproto._connection import GatewayConnection
from qqproto._states import SessionState

if TYPE_CHECKING:
    from transitions import Machine
    from transitions.core import Transition

__all__ = ["Edge", "edges"]

# A group still needing this many arrows after boxing is written as a note instead.
_NOTE_FROM = 3
# A box must save at least this many arrows, or it only adds a frame to look at. One is
# enough: boxed, ZOMBIE and CLOSING sit side by side with one exit (measured in Chromium:
# a third narrower, a third of the crossings, no edge through a label).
_MIN_SAVING = 1
# Deeper nesting than this is no longer read at a glance.
_MAX_DEPTH = 3
# Explicit text colour too: GitHub and the docs site may draw the diagram on a dark page.
_MAIN_STYLE = "fill:#dbeafe,stroke:#1d4ed8,stroke-width:2px,color:#0c2a6b,font-weight:bold"


@dataclass(frozen=True, slots=True)
class Edge:
    """One transition as drawn: ``dest`` is ``None`` for an internal (no-change) transition."""

    trigger: str
    source: str
    dest: str | None
    guard: str


def _machine() -> Machine:
    # The Machine of a real connection: the same object code and tests run.
    return GatewayConnection(rng=random.Random(0))._machine  # noqa: S311 - jitter only


def edges(machine: Machine | None = None) -> list[Edge]:
    """Every transition of ``machine`` (default: a fresh connection's), in declaration order."""
    machine = machine if machine is not None else _machine()
    result: list[Edge] = []
    # Through the Machine's public queries (get_triggers, get_transitions): any Machine a
    # test builds renders, not only the shared one.
    for trigger in machine.get_triggers(*machine.states):
        by_source: dict[str, list[Transition]] = {}
        for transition in machine.get_transitions(trigger):
            by_source.setdefault(transition.source, []).append(transition)
        for source, transitions in by_source.items():
            earlier: list[str] = []
            for transition in transitions:
                names = [
                    str(c.func) if c.target else f"not {c.func}" for c in transition.conditions
                ]
                guard = " and ".join(names)
                if not names and earlier:
                    guard = " and ".join(f"not {g}" for g in earlier)
                earlier.extend(names)
                result.append(Edge(trigger, source, transition.dest, guard))
    return result


@dataclass(frozen=True, slots=True)
class _Group:
    """Transitions sharing trigger, guard and destination; ``first`` orders the drawing."""

    trigger: str
    guard: str
    dest: str
    sources: frozenset[str]
    first: int


@dataclass(frozen=True, slots=True)
class _Item:
    """What is drawn for a group: arrows from ``sources`` to ``target`` (a state or choice)."""

    sources: frozenset[str]
    target: str
    label: str
    first: int


@dataclass(slots=True)
class _Layout:
    """Everything the Mermaid text is written from."""

    states: list[str]
    initial: str
    boxes: list[frozenset[str]] = field(default_factory=list)
    box_ids: dict[frozenset[str], str] = field(default_factory=dict)
    box_titles: dict[frozenset[str], str] = field(default_factory=dict)
    # choice id -> (states its arrows come from or go to), to declare it in the right box
    choices: dict[str, set[str]] = field(default_factory=dict)
    # (from, to) -> labels, in drawing order
    arrows: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    terminal: list[str] = field(default_factory=list)
    main: list[str] = field(default_factory=list)


def _groups(all_edges: list[Edge]) -> list[_Group]:
    found: dict[tuple[str, str, str], tuple[list[str], int]] = {}
    for index, edge in enumerate(all_edges):
        if edge.dest is None:
            continue
        sources, _ = found.setdefault((edge.trigger, edge.guard, edge.dest), ([], index))
        sources.append(edge.source)
    return [
        _Group(trigger, guard, dest, frozenset(sources), first)
        for (trigger, guard, dest), (sources, first) in found.items()
    ]


def _label(trigger: str, guard: str) -> str:
    return trigger + (f" [{guard}]" if guard else "")


def _items(groups: list[_Group], taken: set[str]) -> tuple[list[_Item], dict[str, set[str]]]:
    """Groups as drawn items; complementary guard pairs go through shared choice nodes.

    Returns the items (arrows into choices and the choices' own arrows included) and, per
    choice id, the states it connects. ``taken`` holds ids already in use.
    """
    items: list[_Item] = []
    choices: dict[str, set[str]] = {}
    by_split: dict[tuple[str, str, str], str] = {}
    paired: set[_Group] = set()
    for group in groups:
        if not group.guard or " " in group.guard or group in paired:
            continue
        fallback = [
            g
            for g in groups
            if (g.trigger, g.sources, g.guard)
            == (group.trigger, group.sources, f"not {group.guard}")
        ]
        if len(fallback) != 1:
            continue
        other = fallback[0]
        split = (group.guard, group.dest, other.dest)
        choice = by_split.get(split)
        if choice is None:
            choice = _fresh_id(f"if_{group.guard}", taken)
            by_split[split] = choice
            choices[choice] = {group.dest, other.dest}
            first = min(group.first, other.first)
            items.append(_Item(frozenset([choice]), group.dest, f"[{group.guard}]", first))
            items.append(_Item(frozenset([choice]), other.dest, f"[not {group.guard}]", first))
        choices[choice] |= group.sources
        items.append(_Item(group.sources, choice, group.trigger, group.first))
        paired |= {group, other}
    items += [
        _Item(g.sources, g.dest, _label(g.trigger, g.guard), g.first)
        for g in groups
        if g not in paired
    ]
    # Into a choice before out of it: the layout ranks the diamond below its sources.
    items.sort(key=lambda item: (item.first, not item.sources.isdisjoint(choices)))
    return items, choices


def _fresh_id(wanted: str, taken: set[str]) -> str:
    candidate, n = wanted, 1
    while candidate in taken:
        n += 1
        candidate = f"{wanted}_{n}"
    taken.add(candidate)
    return candidate


def _laminar(a: frozenset[str], b: frozenset[str]) -> bool:
    return a <= b or b <= a or not a & b


def _boxes(items: list[_Item], states: list[str], initial: str) -> list[frozenset[str]]:
    """The composite states: source sets shared by several items, nested, never overlapping."""
    everything = frozenset(states)
    saving: dict[frozenset[str], int] = {}
    for item in items:
        if len(item.sources) < 2 or not item.sources < everything:
            continue
        saving[item.sources] = saving.get(item.sources, 0) + len(item.sources) - 1
    # A choice's arrows start from its id, not from states: where the choice leads.
    leads: dict[str, set[str]] = {}
    for item in items:
        for choice in item.sources - everything:
            leads.setdefault(choice, set()).add(item.target)
    chosen: list[frozenset[str]] = []
    ranked = sorted(saving.items(), key=lambda kv: (-kv[1], -len(kv[0]), sorted(kv[0])))
    for box, saved in ranked:
        if saved < _MIN_SAVING or initial in box:
            continue
        # An arrow from a box to one of its own members (a choice declared inside it, too)
        # reads as nonsense, and Mermaid's layout may reject it.
        if any(
            item.sources == box and leads.get(item.target, {item.target}) <= box for item in items
        ):
            continue
        if not all(_laminar(box, other) for other in chosen):
            continue
        nest = [*chosen, box]
        if max(_nesting(state, nest) for state in box) > _MAX_DEPTH:
            continue
        chosen.append(box)
    return chosen


def _nesting(state: str, boxes: list[frozenset[str]]) -> int:
    return sum(1 for box in boxes if state in box)


def _cover(
    sources: frozenset[str], boxes: list[frozenset[str]], states: list[str]
) -> list[frozenset[str]]:
    """``sources`` as the fewest boxes (the largest inside it) plus states left over."""
    inside = [box for box in boxes if box <= sources]
    largest = [box for box in inside if not any(box < other for other in inside)]
    rest = sources.difference(*largest)
    # In the machine's order (a choice node, not a state, sorts last): never a set's order.
    ranked = sorted(rest, key=lambda s: (states.index(s) if s in states else len(states), s))
    return largest + [frozenset([state]) for state in ranked]


def _box_names(boxes: list[frozenset[str]], taken: set[str]) -> dict[frozenset[str], str]:
    # The state table names its groups of states (`LINKED = (...)`); a box with the same
    # members is called the same. Any other box gets a neutral name.
    named: dict[frozenset[str], str] = {}
    for name, value in vars(_states).items():
        grouped = isinstance(value, tuple | frozenset) and len(value) > 1
        if grouped and all(isinstance(v, SessionState) for v in value):
            named.setdefault(frozenset(v.name for v in value), name.strip("_"))
    return {box: _fresh_id(named.get(box, f"GROUP_{i}"), taken) for i, box in enumerate(boxes, 1)}


def _on_shortest_paths(start: str, targets: set[str], steps: list[tuple[str, str]]) -> set[str]:
    """Every state on some shortest path from ``start`` to a state in ``targets``."""
    after: dict[str, list[str]] = {}
    for src, dst in steps:
        after.setdefault(src, []).append(dst)
    distance = {start: 0}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for there in after.get(here, []):
            if there not in distance:
                distance[there] = distance[here] + 1
                queue.append(there)
    found = {t for t in targets if t in distance}
    frontier = list(found)
    while frontier:
        dst = frontier.pop()
        for src, dsts in after.items():
            on_path = src in distance and distance[src] + 1 == distance[dst]
            if dst in dsts and on_path and src not in found:
                found.add(src)
                frontier.append(src)
    return found


def _layout(machine: Machine) -> _Layout:
    all_edges = edges(machine)
    states = list(machine.states)
    layout = _Layout(states=states, initial=str(machine.initial))
    groups = _groups(all_edges)
    everywhere = [g for g in groups if g.sources == set(states) - {g.dest}]
    groups = [g for g in groups if g not in everywhere]
    taken = set(states)
    items, layout.choices = _items(groups, taken)
    layout.boxes = _boxes(items, states, layout.initial)
    layout.box_ids = _box_names(layout.boxes, taken)
    layout.box_titles = {
        box: name.lower().replace("_", " ") for box, name in layout.box_ids.items()
    }
    order = {state: i for i, state in enumerate(states)}
    for item in items:
        cover = _cover(item.sources, layout.boxes, states)
        if len(cover) >= _NOTE_FROM and item.target in order:
            names = ", ".join(sorted(item.sources, key=order.__getitem__))
            layout.notes.setdefault(item.target, []).append(f"{item.label} from {names}")
            continue
        for part in cover:
            start = layout.box_ids[part] if len(part) > 1 else next(iter(part))
            labels = layout.arrows.setdefault((start, item.target), [])
            if item.label not in labels:
                labels.append(item.label)
    for group in everywhere:
        layout.notes.setdefault(group.dest, []).append(f"{group.trigger} from every state")
    leaving = {source for group in groups for source in group.sources}
    layout.terminal = [state for state in states if state not in leaving]
    if layout.boxes:
        deepest = max(_nesting(state, layout.boxes) for state in states)
        live = {state for state in states if _nesting(state, layout.boxes) == deepest}
        steps = [(s, d) for g in groups for s in g.sources for d in [g.dest]]
        on_path = _on_shortest_paths(layout.initial, live, steps)
        layout.main = [state for state in states if state in on_path]
    return layout


def _innermost(members: set[str], boxes: list[frozenset[str]]) -> frozenset[str] | None:
    around = [box for box in boxes if members <= box]
    return min(around, key=len) if around else None


def _declare(layout: _Layout, box: frozenset[str] | None, indent: str, out: list[str]) -> None:
    """Declare what lives directly in ``box`` (``None``: the top level), boxes recursively."""
    order = {state: i for i, state in enumerate(layout.states)}
    children: list[tuple[int, str | frozenset[str]]] = [
        (order[state], state) for state in layout.states if _innermost({state}, layout.boxes) == box
    ]
    children += [
        (min(order[s] for s in inner), inner)
        for inner in layout.boxes
        if inner != box and _innermost(set(inner), [b for b in layout.boxes if b != inner]) == box
    ]
    children.sort(key=lambda child: child[0], reverse=box is not None)
    for _, child in children:
        if isinstance(child, str):
            out.append(f"{indent}{child}")
            continue
        out.append(f'{indent}state "{layout.box_titles[child]}" as {layout.box_ids[child]} {{')
        _declare(layout, child, indent + "    ", out)
        out.append(f"{indent}}}")
    # Last, so that a diamond is never the member an arrow from the box is routed from.
    for choice, touching in layout.choices.items():
        if _innermost(touching, layout.boxes) == box:
            out.append(f"{indent}state {choice} <<choice>>")
    # In its state's box: Mermaid 10 moves a state to wherever its note is written.
    for state, texts in layout.notes.items():
        if _innermost({state}, layout.boxes) != box:
            continue
        if len(texts) == 1:
            out.append(f"{indent}note right of {state} : {texts[0]}")
        else:
            out += [f"{indent}note right of {state}", *(f"{indent}    {t}" for t in texts)]
            out.append(f"{indent}end note")

"""The lifecycle is declared once, in qqproto/_states.py: every state is classified there.

A state added to ``SessionState`` and to no group, no deadline or no trigger's sources makes
one of these fail, so that the gating the connection derives from the groups covers it.
"""

from __future__ import annotations

import random
from typing import get_args

from qqproto import GatewayConnection, SessionState, _states
from qqproto._states import Deadline


def test_every_state_has_exactly_one_transport_group() -> None:
    for state in SessionState:
        holders = [g for g in _states.TRANSPORT_PARTITION if state in g]
        assert len(holders) == 1, f"{state.name} is in {len(holders)} transport groups"


def test_every_state_runs_under_exactly_one_deadline() -> None:
    assert list(_states.DEADLINES) == list(SessionState)  # one entry each, in order


def test_every_deadline_has_a_handler_and_no_handler_is_idle() -> None:
    conn = GatewayConnection(rng=random.Random(0))
    handled = set(conn._on_due)
    used = set(_states.DEADLINES.values())
    assert handled == used - {Deadline.NONE}
    assert set(Deadline) == used, "a declared Deadline no state runs under"


def test_a_deadline_only_where_a_timer_expiry_is_a_transition() -> None:
    timed = {s for s, d in _states.DEADLINES.items() if d is not Deadline.NONE}
    assert timed == _states.ALLOWED["timer_expired"]


def test_every_state_has_an_entry_action_or_is_initial_or_an_error() -> None:
    conn = GatewayConnection(rng=random.Random(0))
    assert set(conn._entry) == set(SessionState) - {SessionState.IDLE, SessionState.ERROR}


def test_derived_groups_follow_the_partition() -> None:
    assert frozenset(_states.LINKED) | frozenset(_states.WINDING_DOWN) == _states.RECEIVING
    assert _states.DELIVERING <= _states.RECEIVING
    assert set(_states.HEARTBEATING) <= set(_states.LINKED)
    assert set(_states.CLOSABLE) == set(SessionState) - set(_states.NO_TRANSPORT)


def test_allowed_is_computed_for_every_trigger_and_every_state_can_fail() -> None:
    assert set(_states.ALLOWED) == set(get_args(_states.Trigger))
    assert _states.ALLOWED["fail"] == frozenset(SessionState) - {SessionState.ERROR}
    reachable = set().union(*_states.ALLOWED.values())
    assert reachable == set(SessionState) - {SessionState.ERROR}

"""Tests for qqproto._dedup.SeenIds: the answer depends on an id's age alone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qqproto._dedup import SeenIds


def test_an_id_is_a_duplicate_up_to_max_age_and_new_after_it():
    seen = SeenIds(max_items=100, max_age=60.0)
    assert seen.check_and_add("a", 0.0) is False
    assert seen.check_and_add("a", 60.0) is True  # exactly max_age old: still a duplicate
    # A little older: new again, although the memory has not let go of it yet (batches).
    assert seen.check_and_add("a", 60.5) is False
    assert seen.check_and_add("a", 61.0) is True  # and remembered from its new sighting


def test_memory_lets_go_in_batches_within_the_slack():
    seen = SeenIds(max_items=10_000, max_age=64.0)
    for t in range(200):  # one new id a second
        seen.check_and_add(f"id{t}", float(t))
    # 64 s of ids are young enough; at most 1/64 of the age (1 s) more may linger.
    assert 65 <= len(seen) <= 66


def test_the_count_bound_holds_at_every_step():
    seen = SeenIds(max_items=50, max_age=1e9)
    for i in range(500):
        seen.check_and_add(f"id{i}", float(i))
        assert len(seen) <= 50
    assert seen.check_and_add("id499", 500.0) is True
    assert seen.check_and_add("id0", 500.0) is False  # pushed out by the count bound


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.floats(0.0, 5.0, allow_nan=False)),
        max_size=80,
    )
)
def test_answers_match_a_plain_model(steps):
    # Without a count bound, "seen?" is exactly "was it added within max_age?".
    seen = SeenIds(max_items=10_000, max_age=3.0)
    last_added: dict[str, float] = {}
    now = 0.0
    for key, step in steps:
        now += step
        expected = key in last_added and now - last_added[key] <= 3.0
        assert seen.check_and_add(key, now) is expected
        if not expected:
            last_added[key] = now

"""The fake gateway's wire text: what it encodes once and splices per session is exactly
what encoding the whole envelope would give."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from qqproto.testing._fake_gateway import _envelope_parts


@given(
    t=st.text(min_size=1, max_size=30),
    d=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    ),
    event_id=st.none() | st.text(max_size=30),
    seq=st.integers(1, 2**53),
)
def test_a_spliced_dispatch_is_the_very_envelope_orjson_writes(t, d, event_id, seq):
    # The fake encodes an event once and splices each session's seq in: the bytes must be
    # those of the whole envelope encoded at once, whatever the event.
    head, tail = _envelope_parts(t, d, event_id)
    envelope = {"op": 0, "s": seq, "t": t, "d": d}
    if event_id is not None:
        envelope["id"] = event_id
    assert f"{head}{seq}{tail}" == orjson.dumps(envelope).decode()

# The checks every verb applies to its arguments before anything changes.
#
# A wrong argument is a misuse: LocalProtocolError, raised before the connection moves. These
# are functions rather than `isinstance` calls in place so that checking an argument annotated
# `str` is not "always true" to mypy, and so that bool (an int subclass) is never a number.
"""Argument checks shared by the connection's verbs."""

from __future__ import annotations

from qqproto._errors import LocalProtocolError
from qqproto._rest import SessionStartLimit

__all__ = [
    "MAX_TIME",
    "check_attempt",
    "check_start_limit",
    "is_int",
    "is_number",
    "is_text",
    "seconds",
]

# Beyond 2**40 s (35,000 years) float seconds lose sub-millisecond resolution; such a `now`
# is a unit bug in the caller (nanoseconds?), not a time.
MAX_TIME = float(2**40)


def is_text(value: object) -> bool:
    return type(value) is str


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_attempt(attempt: object) -> int:
    if type(attempt) is not int:
        raise LocalProtocolError("attempt must be the int from OpenConnection.attempt")
    return attempt


def check_start_limit(limit: object) -> None:
    if type(limit) is not SessionStartLimit:
        raise LocalProtocolError("session_start_limit must be a SessionStartLimit or None")
    counts = (limit.total, limit.remaining, limit.max_concurrency)
    if not all(is_int(n) for n in counts):
        raise LocalProtocolError("session_start_limit counts must be ints")
    seconds("session_start_limit.reset_after", limit.reset_after)


def seconds(name: str, value: float) -> float:
    if not is_number(value):
        raise LocalProtocolError(f"{name} must be a number of seconds")
    if not 0 <= value <= MAX_TIME:  # NaN fails too
        raise LocalProtocolError(f"{name} must be between 0 and 2**40 seconds")
    return float(value)

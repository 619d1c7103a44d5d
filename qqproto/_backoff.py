# Reconnect delays: "full jitter" exponential backoff (the AWS architecture blog's name).
#
# The window doubles with each consecutive failure up to a cap, and the delay is drawn
# uniformly from [0, window). Full jitter spreads many shards (or many bots behind one NAT)
# that lost their links at the same moment, which a fixed ladder (hermes' 2/5/10/30/60 s)
# does not; discord.py does the same. The first window is `base` (1 s): the first retry is
# fast, because most drops are one-off.
#
# The random source is injected: the core never touches the global `random`.
"""Full-jitter exponential backoff."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random

__all__ = ["backoff_window", "full_jitter_delay"]

# 2**62 seconds is far beyond any cap; bounding the exponent keeps the float finite.
_MAX_EXPONENT = 62


def backoff_window(failures: int, *, base: float, cap: float) -> float:
    """Upper bound of the delay after ``failures`` consecutive failures (``failures >= 1``)."""
    exponent = min(max(failures - 1, 0), _MAX_EXPONENT)
    return min(cap, base * (2.0**exponent))


def full_jitter_delay(failures: int, rng: random.Random, *, base: float, cap: float) -> float:
    """A delay drawn uniformly from ``[0, backoff_window(failures))``."""
    return rng.random() * backoff_window(failures, base=base, cap=cap)

"""Benchmark: one gateway session through a virtual day on the simulator.

The scenario of tests/test_simulate_day.py: 41.25 s heartbeats, op 7 then 4009 every 30
minutes, one message per second, a half-open link every 3 hours (from 1.5 h on), trace off.
It prints the CPU time (``time.process_time``) against the goal of a virtual day in under one
CPU second (virtual / CPU >= 86,400x), the dispatches delivered, and the peak memory traced
by ``tracemalloc`` in a separate run (tracing slows the simulation down). Times are printed,
never asserted: the exit status is 0.

    .venv/bin/python benchmarks/simulate_day.py            # 24 virtual hours
    .venv/bin/python benchmarks/simulate_day.py --quick    # 1 virtual hour: a CI smoke run
    .venv/bin/python benchmarks/simulate_day.py --profile  # and the top 15 functions (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import tracemalloc
from typing import NamedTuple

from qqproto.testing import FakeGatewayConfig, Simulation

GOAL_RATIO = 86_400.0
"""Virtual seconds per CPU second: a virtual day in under one CPU second."""

SEED = 86_400
INTERVAL_MS = 41_250
ROTATE_EVERY = 1800.0
HALF_OPEN_EVERY = 3 * 3600.0
FIRST_HALF_OPEN = 1.5 * 3600.0
FULL_HOURS, QUICK_HOURS = 24.0, 1.0
PROFILE_TOP = 15


class Outcome(NamedTuple):
    virtual_seconds: float
    delivered: int
    produced: int
    resumes: int
    identifies: int


def simulate(hours: float, seed: int = SEED) -> Outcome:
    """Run the day scenario for ``hours`` virtual hours."""
    end = hours * 3600.0
    gateway = FakeGatewayConfig(hello_interval_ms=INTERVAL_MS, rotate_every=ROTATE_EVERY)
    sim = Simulation(seed=seed, gateway=gateway, trace=False, record=False)
    client = sim.add_client()
    client.start()
    sim.messages_every(1.0, start=1.0)
    sim.every(HALF_OPEN_EVERY, lambda: sim.half_open(client), start=FIRST_HALF_OPEN)
    sim.run_until(end)
    return Outcome(
        virtual_seconds=end,
        delivered=client.delivered,
        produced=sim.gateway.dispatched,
        resumes=len(sim.gateway.resumes),
        identifies=len(sim.gateway.identifies),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 virtual hour: a CI smoke run")
    parser.add_argument(
        "--profile", action="store_true", help=f"also print the top {PROFILE_TOP} by tottime"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="simulation seed")
    args = parser.parse_args(argv)
    hours = QUICK_HOURS if args.quick else FULL_HOURS

    start = time.process_time()
    outcome = simulate(hours, args.seed)
    cpu = time.process_time() - start

    tracemalloc.start()
    try:
        simulate(hours, args.seed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    ratio = outcome.virtual_seconds / cpu if cpu > 0 else float("inf")
    verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
    print(
        f"scenario: one session for {hours:g} virtual hours, {INTERVAL_MS / 1000:g} s beats, "
        f"op 7 + 4009 every {ROTATE_EVERY:g} s, 1 message/s, a half-open link every "
        f"{HALF_OPEN_EVERY / 3600:g} h from {FIRST_HALF_OPEN / 3600:g} h; seed {args.seed}"
        f"{'  [--quick: numbers are noise]' if args.quick else ''}"
    )
    print(
        f"outcome: {outcome.produced:,} messages produced; resumes: {outcome.resumes}, "
        f"identifies: {outcome.identifies}"
    )
    print()
    print(f"{'virtual seconds':<22}{outcome.virtual_seconds:>14,.0f}")
    print(f"{'CPU seconds':<22}{cpu:>14.3f}  (time.process_time, trace off)")
    print(f"{'virtual / CPU':<22}{ratio:>13,.0f}x")
    print(f"{'dispatches delivered':<22}{outcome.delivered:>14,}")
    print(f"{'peak traced memory':<22}{peak / 2**20:>14.2f}  MiB (tracemalloc, separate run)")
    print()
    print(
        f"goal: virtual / CPU >= {GOAL_RATIO:,.0f}x (a virtual day in under one CPU second): "
        f"{ratio:,.0f}x  {verdict}"
    )

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        simulate(hours, args.seed)
        profiler.disable()
        print()
        print(f"profile: top {PROFILE_TOP} functions by tottime (cProfile, separate run)")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats(pstats.SortKey.TIME).print_stats(PROFILE_TOP)
    return 0


if __name__ == "__main__":
    sys.exit(main())

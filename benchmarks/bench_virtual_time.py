"""Benchmark: the ping bot (examples/ping_bot.py, unchanged) through a virtual day of faults.

The real ``GatewayClient`` (transports, httpx/httpcore, h11, wsproto, token source, the
bot's own handler) against the fake gateway over ``qqproto_io.testing``'s in-memory
network, on a virtual clock. The day (the scenario tests/test_virtual_time.py runs too): a
user message every 5 minutes in the four scenes (two in three say "ping"), op 7 every hour,
every resume replaying two events already delivered, and every 12 hours a half-open link, a
server close 4009, a token endpoint that hangs for 90 s while the token expires, a 90 s
partition, a 60 s outage of the API host (connections refused, links reset), a 15 s process
stall and a slow-loris token answer that outlasts the client's bound on a request.

It prints virtual seconds per wall-clock (and CPU) second, for the QQ heartbeat (41.25 s)
and for 1 s heartbeats (``--beat 1``). Times are printed, never asserted.

    .venv/bin/python benchmarks/bench_virtual_time.py             # a day, 41.25 s beats
    .venv/bin/python benchmarks/bench_virtual_time.py --beat 1    # a day, 1 s beats
    .venv/bin/python benchmarks/bench_virtual_time.py --hours 1 --backend trio
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qqproto.testing import FakeGatewayConfig
from qqproto_io.testing import API_HOST, TOKEN_HOST, VirtualGateway, run

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from qqproto.testing import MessageKind, UserMessage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCENES: tuple[MessageKind, ...] = ("c2c", "group", "guild", "direct")
MESSAGE_EVERY = 300.0
CYCLE = 12 * 3600.0


def load_ping_bot() -> ModuleType:
    """examples/ping_bot.py as ``qqproto run --app`` loads it: from its own file."""
    spec = importlib.util.spec_from_file_location("ping_bot", EXAMPLES / "ping_bot.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def day_config(beat_ms: int = 41_250) -> FakeGatewayConfig:
    """The platform of the day: ``beat_ms`` heartbeats, op 7 every hour."""
    return FakeGatewayConfig(hello_interval_ms=beat_ms, rotate_every=3600.0)


@dataclass
class Day:
    """What the day sent the bot, and what the gateway saw."""

    sent: list[UserMessage]
    trace_digest: str
    resumes: int
    identifies: int
    refused: int
    token_requests: int


def _faults(qq: VirtualGateway) -> list[tuple[float, Callable[[], object]]]:
    """One cycle's faults, at their offsets in the cycle."""
    return [
        (1.2 * 3600, qq.half_open),
        (2.4 * 3600, lambda: qq.close(4009, "session timed out")),
        # Tokens live two hours: the one fetched at 4 h has expired by then, so the reply
        # to the ping at 4 h and the resume after the drop wait for the endpoint to answer.
        (4 * 3600 - 30, lambda: qq.token_outage(90)),
        (4 * 3600 + 10, qq.drop),
        (5.5 * 3600, lambda: qq.partition(90)),
        (7.1 * 3600, lambda: qq.outage(60, host=API_HOST)),
        (8.6 * 3600, lambda: qq.stall(15)),
        # The token answer at 6 h trickles for longer than the client's 30 s bound on a
        # request: the fetch times out and is retried until the trickle stops.
        (6 * 3600 - 5, lambda: qq.slow_loris(0.3, host=TOKEN_HOST)),
        (6 * 3600 + 55, lambda: qq.slow_loris(0)),
    ]


async def day_of_faults(qq: VirtualGateway, ping_bot: ModuleType, hours: float = 24.0) -> Day:
    """Run the day on ``qq`` (entered, on virtual time) with the bot's ``setup``."""
    qq.faults.replay_overlap = 2  # every resume replays two events already delivered
    await qq.start(ping_bot.setup)
    end = hours * 3600.0
    acts: list[tuple[float, int, Callable[[], object]]] = []
    cycle_start = 0.0
    while cycle_start < end:
        acts += [(cycle_start + at, len(acts), act) for at, act in _faults(qq)]
        cycle_start += CYCLE
    n = 0
    sent: list[UserMessage] = []

    def message() -> None:
        nonlocal n
        text = "ping" if n % 3 else "hello"
        sent.append(qq.user_message(SCENES[n % len(SCENES)], text))
        n += 1

    at = MESSAGE_EVERY
    while at < end:
        acts.append((at, len(acts), message))
        at += MESSAGE_EVERY
    for when, _, act in sorted(acts, key=lambda a: (a[0], a[1])):
        if when < end:
            await qq.sleep_until(when)
            act()
    # Long enough for the last reply, its retries and a resume after the last fault.
    await qq.sleep_until(end + 600.0)
    return Day(
        sent,
        qq.trace_digest(),
        len(qq.gateway.resumes),
        len(qq.gateway.identifies),
        len(qq.network.refused),
        len(qq.gateway.token_requests),
    )


def pongs(qq: VirtualGateway) -> Counter[str]:
    """How many accepted "pong" sends each msg_id got."""
    return Counter(
        str(body.get("msg_id"))
        for _, _, body in qq.rest_posts
        if isinstance(body, dict) and body.get("content") == "pong"
    )


async def _measured(hours: float, beat_ms: int, trace: bool) -> tuple[Day, Counter[str]]:
    async with VirtualGateway(day_config(beat_ms), seed=1, trace=trace) as qq:
        day = await day_of_faults(qq, load_ping_bot(), hours)
        return day, pongs(qq)


def main(argv: list[str] | None = None) -> int:
    """Run the day and print virtual ÷ wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--beat", type=float, default=41.25, help="heartbeat, in seconds")
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--trace", action="store_true", help="record the trace as tests do")
    args = parser.parse_args(argv)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    beat_ms = round(args.beat * 1000)
    for backend in backends:
        wall, cpu = time.perf_counter(), time.process_time()
        day, counted = run(_measured, args.hours, beat_ms, args.trace, backend=backend)  # type: ignore[arg-type]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        virtual = args.hours * 3600.0 + 600.0
        pings = [s for s in day.sent if s.d.get("content", "").strip().endswith("ping")]
        once = all(counted[s.msg_id] == 1 for s in pings) and sum(counted.values()) == len(pings)
        print(
            f"{backend:7} {args.hours:g} h, {args.beat:g} s beats: {wall:6.2f} s wall, "
            f"{cpu:6.2f} s CPU; virtual/wall = {virtual / wall:,.0f}x, "
            f"virtual/CPU = {virtual / cpu:,.0f}x; {len(pings)} pings, "
            f"{'each answered once' if once else 'NOT each answered once'}; "
            f"{day.resumes} resumes, {day.identifies} identify, {day.refused} refused connects"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

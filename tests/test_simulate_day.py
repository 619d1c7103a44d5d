"""One session through 24 virtual hours, checked end to end; and a smoke run of its benchmark.

The day: 41.25 s heartbeats, op 7 then 4009 every 30 minutes (``rotate_every=1800``), one
message per second, and a half-open link every 3 hours (at 1.5 h, 4.5 h, ..., 22.5 h: eight
of them, each with time to be found before the day ends). It runs with the trace off and
takes a few CPU seconds, so it is part of the default suite (no marker: CI runs it).
``benchmarks/simulate_day.py`` times the same scenario.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qqproto import (
    Disconnected,
    HeartbeatAcknowledged,
    HelloReceived,
    SessionConfig,
    SessionInvalidated,
    ZombieDetected,
)
from qqproto.testing import FakeGatewayConfig, SimClient, Simulation

if TYPE_CHECKING:
    import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "simulate_day.py"

SEED = 86_400
DAY = 86_400.0
INTERVAL = 41.25
ROTATE_EVERY = 1800.0
HALF_OPEN_EVERY = 3 * 3600.0
FIRST_HALF_OPEN = 1.5 * 3600.0
PROBE_EVERY = 10.0
ALLOWANCE = 0.5  # network latency slack in the detection bound
CONFIG = SessionConfig()

# Pinned for SEED: 39 routine rotations + 8 zombie reconnects. 48 rotations would fit in a
# day of uninterrupted connections, but each zombie throws away the part of a 30 minute
# rotation period its dead connection had run, and the new connection starts a full one.
EXPECTED_RESUMES = 47
EXPECTED_ZOMBIES = 8


@dataclass
class Day:
    sim: Simulation
    client: SimClient
    half_opens: list[tuple[float, int]] = field(default_factory=list)  # (time, events index)
    max_sessions: int = 0
    max_live: int = 0
    max_seen_events: int = 0
    max_seen_messages: int = 0

    def probe(self) -> None:
        conn = self.client.conn
        self.max_sessions = max(self.max_sessions, len(self.sim.gateway.sessions))
        self.max_live = max(self.max_live, len(self.sim.gateway.live))
        self.max_seen_events = max(self.max_seen_events, len(conn._dedup.events))
        self.max_seen_messages = max(self.max_seen_messages, len(conn._dedup.messages))

    def half_open(self) -> None:
        self.half_opens.append((self.sim.now, len(self.client.events)))
        self.sim.half_open(self.client)


def run_day(seed: int = SEED, *, hours: float = 24.0) -> Day:
    end = hours * 3600.0
    gateway = FakeGatewayConfig(hello_interval_ms=int(INTERVAL * 1000), rotate_every=ROTATE_EVERY)
    sim = Simulation(seed=seed, gateway=gateway, trace=False)
    client = sim.add_client()
    day = Day(sim, client)
    client.start()
    sim.messages_every(1.0, start=1.0)
    sim.every(HALF_OPEN_EVERY, day.half_open, start=FIRST_HALF_OPEN)
    sim.every(PROBE_EVERY, day.probe, start=PROBE_EVERY / 2)
    sim.run_until(end)
    return day


def test_a_virtual_day_of_one_session() -> None:
    day = run_day()
    sim, client = day.sim, day.client
    gateway = sim.gateway
    produced = gateway.dispatched
    assert produced == int(DAY)  # message n is produced at t = n

    # Every message exactly once, in order, except those still in flight at the end.
    delivered = [int(d.event_id[-8:]) for d in client.dispatches if d.event_id is not None]
    assert len(delivered) == len(client.dispatches)
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    assert delivered == sorted(delivered)
    in_flight = {n for n in range(1, produced + 1) if n > DAY - 1.0}
    missing = set(range(1, produced + 1)) - set(delivered)
    assert missing <= in_flight, sorted(missing)[:20]
    assert not [e for _, e in client.events if isinstance(e, SessionInvalidated)]

    # One Identify all day; every reconnect (rotations and zombies) Resumed.
    assert len(gateway.identifies) == 1
    zombies = [t for t, e in client.events if isinstance(e, ZombieDetected)]
    assert len(zombies) == EXPECTED_ZOMBIES
    assert len(day.half_opens) == EXPECTED_ZOMBIES
    assert len(gateway.resumes) == EXPECTED_RESUMES
    rotations = len(gateway.resumes) - len(zombies)
    assert 36 <= rotations <= 48  # 39 for SEED

    # Each half-open link is given up within two intervals + close_timeout: of the fault,
    # and, tighter, of the last ACKed beat before it.
    for at, index in day.half_opens:
        before = client.events[:index]
        hello = max(t for t, e in before if isinstance(e, HelloReceived))
        acked = [
            t - e.latency for t, e in before if isinstance(e, HeartbeatAcknowledged) and t >= hello
        ]
        last_acked_beat = acked[-1] if acked else hello
        given_up = next(t for t, e in client.events[index:] if isinstance(e, Disconnected))
        bound = 2 * INTERVAL + CONFIG.close_timeout + ALLOWANCE
        assert given_up - at <= bound
        assert given_up - last_acked_beat <= bound

    # Memory stays bounded: the dedup windows and the gateway's sessions.
    assert day.max_seen_events <= CONFIG.dedup_max_ids
    assert day.max_seen_messages <= CONFIG.dedup_max_ids
    assert len(client.conn._dedup.events) <= CONFIG.dedup_max_ids
    assert day.max_sessions <= 2
    assert day.max_live <= 1


def _load_benchmark() -> object:
    spec = importlib.util.spec_from_file_location("qqproto_benchmarks_simulate_day", BENCHMARK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_day_benchmark_quick_run_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    module = _load_benchmark()
    assert module.main(["--quick"]) == 0  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    for label in (
        "virtual seconds",
        "CPU seconds",
        "virtual / CPU",
        "dispatches delivered",
        "peak traced memory",
        "MiB",
        "goal",
    ):
        assert label in out, label
    assert "3,600" in out  # one virtual hour
    verdicts = [line for line in out.splitlines() if line.rstrip().endswith("met")]
    assert len(verdicts) == 1

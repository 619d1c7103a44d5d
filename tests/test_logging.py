"""Tests for qqproto_io._logging: per-shard event records and the CLI's two formats."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from qqproto import (
    Dispatch,
    Event,
    FatalStop,
    HeartbeatAcknowledged,
    Ready,
    SessionState,
    StateChanged,
    ZombieDetected,
)
from qqproto_io._logging import (
    EventLogger,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    shard_logger,
)

SESSION = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def dispatch(seq: int) -> Dispatch:
    return Dispatch(type="C2C_MESSAGE_CREATE", seq=seq, event_id=f"E{seq}", data={"c": "x"})


@pytest.fixture
def records():
    """Every record of shard 3's logger, at DEBUG."""
    logger = shard_logger(3)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_each_shard_has_its_own_logger():
    assert shard_logger(0).name == "qqproto_io.shard.0"
    assert shard_logger(12) is logging.getLogger("qqproto_io.shard.12")


def test_events_carry_their_fields_and_the_state_after_them(records):
    log = EventLogger(3)
    log(StateChanged(old=SessionState.IDENTIFYING, new=SessionState.READY, reason="READY"))
    log(Ready(session_id=SESSION, seq=1, data={}))
    log(dispatch(2))
    assert [r.levelno for r in records] == [logging.DEBUG, logging.INFO, logging.DEBUG]
    ready = records[1].qqproto  # type: ignore[attr-defined]
    assert ready == {
        "event": "ready",
        "shard": 3,
        "state": "READY",
        "session_id": SESSION[:8] + "…",
        "seq": 1,
    }
    assert SESSION not in records[1].getMessage()
    assert records[2].qqproto["event_id"] == "E2"  # type: ignore[attr-defined]


def test_a_dispatch_nobody_logs_costs_no_record(records):
    shard_logger(3).setLevel(logging.INFO)
    log = EventLogger(3)
    log(dispatch(1))
    log(HeartbeatAcknowledged(latency=0.01, mean_latency=0.01))
    log(ZombieDetected(since_last_ack=82.5, interval=41.25))
    assert [r.qqproto["event"] for r in records] == ["zombie"]  # type: ignore[attr-defined]


def make_record(fields=None, msg="hello %s", args=("world",)) -> logging.LogRecord:
    record = logging.LogRecord("qqproto_io.x", logging.WARNING, __file__, 1, msg, args, None)
    if fields is not None:
        record.qqproto = fields
    return record


def test_json_format_of_an_event_and_of_a_plain_record():
    fmt = JsonFormatter()
    event = json.loads(fmt.format(make_record({"event": "zombie", "shard": 1, "t": 7.25})))
    assert event == {"t": 7.25, "event": "zombie", "level": "WARNING", "shard": 1}
    plain = json.loads(fmt.format(make_record()))
    assert plain["event"] == "log"
    assert plain["message"] == "hello world"
    assert plain["logger"] == "qqproto_io.x"
    assert "shard" not in plain
    assert plain["t"] >= 0


def test_text_format_names_the_shard():
    line = TextFormatter().format(make_record({"event": "zombie", "shard": 4, "t": 1.5}))
    assert line == "[    1.500s] WARNING shard 4: hello world"
    assert TextFormatter().format(make_record()).endswith("WARNING hello world")


def test_the_console_shows_info_and_life_signs_and_everything_when_verbose():
    def shown(verbose: bool, life_signs: bool = False) -> list[str]:
        out = io.StringIO()
        handler = configure_logging(out, "json", verbose=verbose, life_signs=life_signs)
        try:
            log = EventLogger(9)
            log(dispatch(1))
            log(StateChanged(old=SessionState.READY, new=SessionState.ZOMBIE, reason="x"))
            log(ZombieDetected(since_last_ack=3.0, interval=1.0))
            log(FatalStop(code=4915, reason="banned", hint="appeal"))
        finally:
            logging.getLogger("qqproto_io").removeHandler(handler)
            handler.close()
        return [json.loads(line)["event"] for line in out.getvalue().splitlines()]

    assert shown(verbose=False) == ["zombie", "fatal"]  # INFO and above
    assert shown(verbose=False, life_signs=True) == ["dispatch", "zombie", "fatal"]  # a demo
    assert shown(verbose=True) == ["dispatch", "state", "zombie", "fatal"]


def test_a_reader_that_left_silences_the_console_instead_of_a_traceback_per_record(capfd):
    read, write = os.pipe()
    os.close(read)  # nobody will read: every write raises BrokenPipeError
    out = os.fdopen(write, "w")
    handler = configure_logging(out, "text")
    try:
        log = EventLogger(9)
        for _ in range(3):
            log(ZombieDetected(since_last_ack=3.0, interval=1.0))
    finally:
        logging.getLogger("qqproto_io").removeHandler(handler)
        handler.close()
        out.close()
    assert "Traceback" not in capfd.readouterr().err
    assert handler.level > logging.CRITICAL


def test_the_json_log_of_a_real_session_names_the_state_after_each_event():
    # The core's own output stream, logged as the driver logs it: every line's `state` is
    # the state after its event, and a disconnect is logged before what it caused.
    from tests.helpers import Driver

    drv = Driver(seed=1)
    drv.connect_ready()
    drv.server_close(4006)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = shard_logger(9)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        log = EventLogger(9)
        for out in drv.outputs:
            if isinstance(out, Event):
                log(out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {line["event"]: line for line in lines}
    assert by_event["hello"]["state"] == "IDENTIFYING"
    assert by_event["ready"]["state"] == "READY"
    assert by_event["disconnected"]["state"] == "BACKOFF"
    names = [line["event"] for line in lines]
    assert names.index("disconnected") < names.index("session_invalidated")
    assert names.index("session_invalidated") < names.index("reconnect")
    times = [line["t"] for line in lines]
    assert times == sorted(times)


def test_pytransitions_does_not_flood_an_info_log():
    # A program with logging.basicConfig(level=INFO) sees no `transitions.core` lines per
    # state change, unless it asked for them by setting that logger's level itself.
    import subprocess
    import sys

    code = (
        "import logging, random; logging.basicConfig(level=logging.INFO);"
        "from qqproto import GatewayConnection; c = GatewayConnection(rng=random.Random(1));"
        "c.start(0.0); c.close(1.0)"
    )
    proc = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "transitions" not in proc.stderr

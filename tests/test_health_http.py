# The health/metrics HTTP endpoints served for real on loopback, on asyncio and trio. The
# client is a few lines over anyio.connect_tcp that reads until EOF: a response that arrives
# at all proves the server closed the connection after it. Health values are built directly
# and handed to the server through a mutable probe; the stall monitor is never started, its
# public attributes are set by hand (what its watcher thread would do).
"""Tests for qqproto_io._health: Metrics and the HealthServer endpoints."""

from __future__ import annotations

import time

import anyio
import orjson
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from qqproto import (
    Disconnected,
    Dispatch,
    DuplicateDropped,
    Health,
    HeartbeatAcknowledged,
    NextStep,
    Ready,
    Resumed,
    SessionInvalidated,
    SessionState,
    StateChanged,
    ZombieDetected,
)
from qqproto_io._health import HealthServer, Metrics
from qqproto_io._stall import StallMonitor
from tests.loopback import anyio_backend  # noqa: F401 - fixtures

READY = Health(live=True, ready=True, reason="", since_live=None, last_ack_age=3.0)
BACKOFF = Health(
    live=True, ready=False, reason="BACKOFF for 12 s", since_live=12.0, last_ack_age=None
)

DISPATCH = Dispatch(type="C2C_MESSAGE_CREATE", seq=1, event_id="e1", data={})
READY_EVENT = Ready(session_id="s", seq=None, data={})
ZOMBIE = ZombieDetected(since_last_ack=82.5, interval=41.25)
ACK = HeartbeatAcknowledged(latency=0.04, mean_latency=0.04)


def samples(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: bytes | str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def get(port: int, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request; returns status, headers and body once the server closes the socket."""
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(f"{method} {target} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
            data = b""
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


# ------------------------------------------------------------------------ Metrics alone


def test_registry_is_private():
    a, b = Metrics(), Metrics()
    a.observe(0, DISPATCH)
    assert value(a.render({}), "qqproto_dispatches_total", shard="0") == 1
    assert value(b.render({}), "qqproto_dispatches_total", shard="0") is None


def test_counters_follow_events():
    m = Metrics()
    for event in (DISPATCH, DISPATCH, READY_EVENT, ZOMBIE, ACK):
        m.observe(0, event)
    m.observe(0, Resumed(replayed=2, seq=9))
    m.observe(0, DuplicateDropped(type="C2C_MESSAGE_CREATE", seq=1, key="seq"))
    m.observe(0, SessionInvalidated(session_id="s", last_seq=9, reason="op 9"))
    m.observe(1, DISPATCH)
    text = m.render({0: READY, 1: BACKOFF})
    assert value(text, "qqproto_dispatches_total", shard="0") == 2
    assert value(text, "qqproto_dispatches_total", shard="1") == 1
    assert value(text, "qqproto_identifies_total", shard="0") == 1
    assert value(text, "qqproto_resumes_total", shard="0") == 1
    assert value(text, "qqproto_zombies_total", shard="0") == 1
    assert value(text, "qqproto_duplicates_dropped_total", shard="0") == 1
    assert value(text, "qqproto_events_possibly_lost_total", shard="0") == 1
    assert value(text, "qqproto_heartbeat_latency_seconds_count", shard="0") == 1
    assert value(text, "qqproto_heartbeat_latency_seconds_sum", shard="0") == pytest.approx(0.04)
    assert value(text, "qqproto_heartbeat_latency_seconds_count", shard="1") == 0
    # The ACK age is a scrape-time gauge: present only when the shard has had an ACK.
    assert value(text, "qqproto_ack_age_seconds", shard="0") == 3.0
    assert value(text, "qqproto_ack_age_seconds", shard="1") is None


def test_reconnects_are_labelled_by_next_step():
    m = Metrics()
    for step in (NextStep.RESUME, NextStep.RESUME, NextStep.IDENTIFY, NextStep.STOP):
        m.observe(
            0,
            Disconnected(
                code=4009,
                reason="free text, not a label",
                by_server=True,
                next_step=step,
                reconnect_at=None if step is NextStep.STOP else 1.0,
            ),
        )
    text = m.render({})
    assert value(text, "qqproto_reconnects_total", shard="0", reason="resume") == 2
    assert value(text, "qqproto_reconnects_total", shard="0", reason="identify") == 1
    reasons = {
        dict(labels)["reason"] for name, labels in samples(text) if name.startswith("qqproto_rec")
    }
    assert reasons == {"resume", "identify"}


def test_shard_state_is_one_hot():
    m = Metrics()
    m.observe(0, StateChanged(old=SessionState.IDLE, new=SessionState.PREPARING, reason="start"))
    m.observe(0, StateChanged(old=SessionState.IDENTIFYING, new=SessionState.READY, reason="r"))
    states = {
        dict(labels)["state"]: v
        for (name, labels), v in samples(m.render({})).items()
        if name == "qqproto_shard_state"
    }
    assert states == {s.value: (1.0 if s is SessionState.READY else 0.0) for s in SessionState}


def test_stalls_are_counted_once():
    m = Metrics()
    stall = StallMonitor()
    stall.stalls.append(2.5)
    m.render({}, stall=stall)
    stall.stalls.append(4.0)
    text = m.render({}, stall=stall)
    assert value(text, "qqproto_loop_stalls_total") == 2
    assert value(text, "qqproto_loop_stall_seconds_count") == 2
    assert value(text, "qqproto_loop_stall_seconds_sum") == 6.5


# --------------------------------------------------------------------------- the server


@pytest.mark.anyio
async def test_healthz_follows_the_stall_monitor():
    stall = StallMonitor()
    async with HealthServer(dict, Metrics(), stall=stall) as server:
        assert server.port != 0
        status, headers, body = await get(server.port, "/healthz")
        assert (status, orjson.loads(body)) == (200, {"status": "ok"})
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        stall.stalled_since = time.monotonic() - 3.0
        status, _, body = await get(server.port, "/healthz")
        assert status == 503
        assert orjson.loads(body)["status"] == "stalled"
        assert "stalled for 3" in orjson.loads(body)["reason"]


@pytest.mark.anyio
async def test_readyz_follows_the_probe():
    healths = {0: READY, 1: BACKOFF}
    async with HealthServer(lambda: healths, Metrics()) as server:
        status, _, body = await get(server.port, "/readyz")
        assert status == 503
        assert orjson.loads(body) == {
            "status": "not ready",
            "shards": {
                "0": {"live": True, "ready": True, "reason": ""},
                "1": {"live": True, "ready": False, "reason": "BACKOFF for 12 s"},
            },
        }
        healths[1] = READY
        status, _, body = await get(server.port, "/readyz?verbose=1")
        assert status == 200
        assert orjson.loads(body)["status"] == "ready"
        healths.clear()  # no shard at all is not ready
        status, _, _ = await get(server.port, "/readyz")
        assert status == 503


@pytest.mark.anyio
async def test_metrics_endpoint():
    metrics = Metrics()
    stall = StallMonitor()
    async with HealthServer(lambda: {0: READY}, metrics, stall=stall) as server:
        for event in (DISPATCH, READY_EVENT, ZOMBIE, ACK):
            metrics.observe(0, event)
        stall.stalls.append(2.5)
        status, headers, body = await get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert value(body, "qqproto_dispatches_total", shard="0") == 1
    assert value(body, "qqproto_identifies_total", shard="0") == 1
    assert value(body, "qqproto_zombies_total", shard="0") == 1
    assert value(body, "qqproto_heartbeat_latency_seconds_count", shard="0") == 1
    assert value(body, "qqproto_ack_age_seconds", shard="0") == 3.0
    assert value(body, "qqproto_loop_stalls_total") == 1


@pytest.mark.anyio
async def test_unknown_paths_methods_and_bad_requests():
    async with HealthServer(lambda: {0: READY}, Metrics()) as server:
        status, _, _ = await get(server.port, "/")
        assert status == 404
        status, _, _ = await get(server.port, "/metrics/extra")
        assert status == 404
        status, _, _ = await get(server.port, "/healthz", method="POST")
        assert status == 405
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(b"NOT HTTP AT ALL\r\n\r\n")
                reply = await stream.receive()
        assert reply.startswith(b"HTTP/1.1 400 ")


@pytest.mark.anyio
async def test_failing_probe_is_a_500_not_a_crash(caplog):
    def probe() -> dict[int, Health]:
        raise RuntimeError("boom")

    async with HealthServer(probe, Metrics()) as server:
        status, _, _ = await get(server.port, "/readyz")
        assert status == 500
        status, _, _ = await get(server.port, "/healthz")  # still serving
        assert status == 200
    assert "boom" in caplog.text


@pytest.mark.anyio
async def test_silent_client_is_cut_after_the_read_timeout():
    async with HealthServer(dict, Metrics(), read_timeout=0.2) as server:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()


def test_metrics_show_the_time_since_the_last_ack_of_any_connection():
    from qqproto_io._health import Metrics

    metrics = Metrics()
    healthy = Health(
        live=True, ready=False, reason="x", since_live=None, last_ack_age=1.0, since_ack=250.0
    )
    text = metrics.render({0: healthy}).decode()
    assert 'qqproto_since_last_ack_seconds{shard="0"} 250.0' in text
    assert 'qqproto_ack_age_seconds{shard="0"} 1.0' in text

"""The ping bot's own module, on the real client, through virtual days of faults.

``qqproto_io.testing`` runs the production ``GatewayClient`` against the fake gateway over
in-memory links that carry real HTTP and WebSocket bytes, on a virtual clock (asyncio and
trio). The day is ``benchmarks/bench_virtual_time.py``'s scenario, which times it. Sleeps
here are virtual: they move the clock on once every task is waiting, so they order nothing
by luck.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qqproto import (
    CLOSE_CODE_POLICY,
    Disconnected,
    FatalStop,
    NextStep,
    Ready,
    ReconnectScheduled,
    Resumed,
    SessionConfig,
    ZombieDetected,
)
from qqproto.testing import RestFault
from qqproto_io.testing import TOKEN_HOST, VirtualGateway, run, virtual_time

if TYPE_CHECKING:
    from types import ModuleType

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["asyncio", "trio"]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load(ROOT / "benchmarks" / "bench_virtual_time.py", "bench_virtual_time")


@pytest.fixture(params=BACKENDS)
def anyio_backend(request):
    return virtual_time(request.param)


@pytest.fixture
def ping_bot():
    return bench.load_ping_bot()


def is_ping(sent) -> bool:
    return sent.d["content"].strip().endswith("ping")


# ----------------------------------------------------------------- a day of faults


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ping_bot_answers_every_ping_exactly_once_through_a_day_of_faults(backend):
    async def day():
        async with VirtualGateway(bench.day_config(), seed=1) as qq:
            outcome = await bench.day_of_faults(qq, bench.load_ping_bot(), 24)
            return outcome, bench.pongs(qq), qq.events, qq.rest_posts

    outcome, pongs, events, posts = run(day, backend=backend, seed=1)
    pings = [s for s in outcome.sent if is_ping(s)]
    others = [s for s in outcome.sent if not is_ping(s)]
    assert len(pings) == 191  # every 5 minutes, two in three
    assert {s.kind for s in pings} == {"c2c", "group", "guild", "direct"}
    assert all(pongs[s.msg_id] == 1 for s in pings)  # each ping: exactly one pong
    assert not any(pongs[s.msg_id] for s in others)  # and nothing else answered
    assert len(posts) == len(pings)
    # Each reply went where the platform said, with the message it answers.
    by_id = {s.msg_id: s for s in pings}
    assert all(path == by_id[body["msg_id"]].reply_path for _, path, body in posts)
    # The faults happened, and the session lived through all of them.
    assert outcome.identifies == 1
    # op 7 comes an hour after each connection opens, so faults push rotations back.
    assert outcome.resumes >= 24
    assert sum(isinstance(e, ZombieDetected) for _, e in events) >= 2
    assert outcome.refused >= 2
    assert outcome.token_requests >= 12  # tokens live 2 h, and fetches were retried


# ----------------------------------------------------------------- reproducible


async def _two_hours(seed: int) -> str:
    async with VirtualGateway(bench.day_config(), seed=seed) as qq:
        await bench.day_of_faults(qq, bench.load_ping_bot(), 8.7)
        return qq.format_trace()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_seed_gives_the_same_trace_byte_for_byte(backend):
    first = run(_two_hours, 3, backend=backend, seed=3)
    again = run(_two_hours, 3, backend=backend, seed=3)
    other = run(_two_hours, 4, backend=backend, seed=4)
    assert len(first) > 100_000
    assert first == again
    assert first != other  # the seed is not ignored: ids, tokens and jitter follow it


# ----------------------------------------------------------------- no wall clock

# The only reads of the machine's clocks on a virtual run, each of a value nothing acts on:
# httpx times each response for `Response.elapsed` (the client never reads it) and reads
# the time for the cookie jar (the fake sets no cookie), httpcore
# stamps an idle connection's age (its keep-alive expiry is off: the network expires them
# on the virtual clock), and logging stamps its records (none is part of the trace).
INERT_READS = {
    ("httpx/_client.py", "_send_single_request"),
    ("httpx/_client.py", "aclose"),
    ("_async/http11.py", "has_expired"),  # httpcore's
    ("http/cookiejar.py", "make_cookies"),  # httpx looks for cookies in every answer
    ("logging/__init__.py", "__init__"),
    ("_core/_mock_clock.py", "rate"),  # trio's MockClock, made at rate 0, before it is set
}


def _callers(monkeypatch, *, leap: float) -> set[tuple[str, str]]:
    """Replace the wall and monotonic clocks with ones that record who reads them and leap
    ``leap`` seconds at every read."""
    seen: set[tuple[str, str]] = set()
    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "perf_counter_ns"):
        real = getattr(time, name)
        state = {"offset": 0}

        def read(real=real, state=state, name=name):
            ns = name.endswith("_ns")
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename)
            seen.add((f"{path.parent.name}/{path.name}", frame.f_code.co_name))
            state["offset"] += leap
            return real() + (int(state["offset"] * 1e9) if ns else state["offset"])

        monkeypatch.setattr(time, name, read)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_wall_clock_is_read_and_a_leaping_one_changes_nothing(backend, monkeypatch):
    steady = run(_two_hours, 5, backend=backend, seed=5)
    with monkeypatch.context() as patch:
        callers = _callers(patch, leap=1000.0)
        leaping = run(_two_hours, 5, backend=backend, seed=5)
    assert leaping == steady  # a clock that jumps 1000 s at every read changed no byte
    assert callers <= INERT_READS, callers - INERT_READS
    # The recorder works: httpx's timing of every response is always there.
    assert ("httpx/_client.py", "_send_single_request") in callers


# ----------------------------------------------------------------- the fixture and faults


async def test_a_dead_link_is_found_within_two_beats_and_resumed(qq, ping_bot):
    await qq.start(ping_bot.setup)
    interval = qq.gateway.config.hello_interval_ms / 1000
    await qq.sleep(300)
    dead_at = qq.now
    qq.half_open()
    lost = qq.user_message("c2c", "ping")
    await qq.wait_for(ZombieDetected)
    assert qq.now - dead_at <= 2 * interval
    resumed = await qq.wait_for(Resumed)
    assert resumed.replayed == 1
    await qq.sleep(120)
    assert [body["msg_id"] for body in qq.replies_to(lost.msg_id)] == [lost.msg_id]


@pytest.mark.parametrize("code", [4009, 4900, 4006, 4914])
async def test_a_close_with_any_code_is_followed_by_its_next_step(qq, ping_bot, code):
    await qq.start(ping_bot.setup)
    qq.close(code)
    disconnected = await qq.wait_for(Disconnected)
    assert disconnected.code == code
    assert disconnected.by_server
    step = CLOSE_CODE_POLICY[code].step
    assert disconnected.next_step is step
    if step is NextStep.STOP:
        await qq.sleep(60)
        [stopped] = qq.stopped
        assert stopped.code == code
        assert qq.count(FatalStop) == 1
        return
    # A resume keeps the session; an identify starts a new one. Either way, back in it:
    resumes = step is NextStep.RESUME
    await qq.wait_for(Resumed if resumes else Ready, count=1 if resumes else 2)
    sent = qq.user_message("group", "ping")
    await qq.sleep(60)
    assert len(qq.replies_to(sent.msg_id)) == 1
    assert len(qq.gateway.identifies) == (1 if resumes else 2)


async def test_a_refused_api_host_delays_the_resume_until_it_is_back(qq, ping_bot):
    await qq.start(ping_bot.setup)
    qq.outage(120, host="api.sgroup.qq.com")
    sent = qq.user_message("c2c", "ping")  # its link was reset: replayed on resume
    await qq.wait_for(Resumed)
    assert qq.now >= 120
    assert len(qq.network.refused) >= 2
    await qq.sleep(60)
    assert len(qq.replies_to(sent.msg_id)) == 1


async def test_a_hanging_token_endpoint_holds_the_bot_back_not_forever(qq, ping_bot):
    bot = await qq.start(ping_bot.setup, config=SessionConfig(http_timeout=10.0))
    qq.token_outage(100)
    qq.close(4004, "authentication failed")  # the bot must fetch a new token to go on
    await qq.wait_for(ReconnectScheduled, count=2)  # the first fetch timed out
    await qq.wait_for(Ready, count=2, within=600)
    assert qq.now >= 100  # not before the endpoint answered again
    sent = qq.user_message("c2c", "ping")
    await qq.sleep(60)
    assert len(qq.replies_to(sent.msg_id)) == 1
    assert bot.connection.state.name == "READY"


async def test_a_slow_loris_token_answer_is_cut_off_by_the_request_bound(qq, ping_bot):
    await qq.start(ping_bot.setup, config=SessionConfig(http_timeout=10.0))
    qq.slow_loris(1.0, host=TOKEN_HOST)  # ~120 bytes: two minutes per answer
    qq.close(4004, "authentication failed")
    await qq.wait_for(ReconnectScheduled, count=2)  # the first fetch timed out
    assert qq.count(Ready) == 1
    qq.slow_loris(0)
    await qq.wait_for(Ready, count=2, within=600)


async def test_a_partition_holds_the_bytes_and_delivers_them_in_order(qq, ping_bot):
    await qq.start(ping_bot.setup)
    qq.partition(20)  # shorter than a beat: nobody notices but the user
    sent = [qq.user_message("c2c", "ping"), qq.user_message("group", "ping")]
    await qq.sleep(19)
    assert qq.rest_posts == []
    await qq.sleep(2)
    assert [body["msg_id"] for _, _, body in qq.rest_posts] == [s.msg_id for s in sent]
    assert not qq.count(Disconnected)


async def test_replays_and_a_lost_answer_still_give_one_pong(qq, ping_bot):
    await qq.start(ping_bot.setup)
    qq.faults.replay_overlap = 3
    qq.faults.replay_reversed = True
    sent = [qq.user_message("c2c", "ping") for _ in range(3)]
    await qq.sleep(1)
    qq.rest_faults.append(RestFault(lose=True))  # accepted, then the answer is lost
    late = qq.user_message("c2c", "ping")
    qq.rotate()
    await qq.wait_for(Resumed)
    await qq.sleep(120)
    for message in [*sent, late]:
        assert len(qq.replies_to(message.msg_id)) == 1


async def test_a_process_stall_longer_than_the_server_waits_ends_in_a_resume(qq, ping_bot):
    await qq.start(ping_bot.setup)
    timeout = qq.gateway.config.heartbeat_timeout
    assert timeout is not None
    qq.stall(timeout + 30)  # the server gives up on the link first
    await qq.wait_for(Resumed)
    sent = qq.user_message("c2c", "ping")
    await qq.sleep(60)
    assert len(qq.replies_to(sent.msg_id)) == 1


@pytest.mark.parametrize("anyio_backend", BACKENDS)  # the real clocks
async def test_the_gateway_refuses_to_run_on_real_time():
    with pytest.raises(RuntimeError, match="virtual time"):
        async with VirtualGateway():
            pass


# ----------------------------------------------------------------- the docs lead with it

_PY_BLOCK = re.compile(r"```py\n(.*?)```", re.DOTALL)


def test_the_testing_guide_example_runs_as_a_test_and_is_short(tmp_path):
    (block,) = _PY_BLOCK.findall((ROOT / "docs" / "testing.md").read_text(encoding="utf-8"))
    test_lines = block[block.index("async def test_") :].strip().splitlines()
    assert len(test_lines) < 30
    (tmp_path / "test_ping_bot.py").write_text(block, encoding="utf-8")
    (tmp_path / "conftest.py").write_text(
        'pytest_plugins = ["qqproto_io.testing.pytest_plugin"]\n', encoding="utf-8"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{ROOT / 'examples'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b2 passed\b", proc.stdout), proc.stdout

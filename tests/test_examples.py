# The examples in examples/, run for real against the loopback fake gateway.
#
# The threaded and asyncio clients run as subprocesses (`python examples/X.py`, configured
# through the QQBOT_* environment like a user would), against a FakeGatewayServer served
# from a background thread through an anyio blocking portal; the test drives the server's
# controls through the portal and reads the client's stdout, one printed event per line.
# Ordering comes from what the client prints (a line proves the event before it), never
# from sleeping; every wait is bounded by BOUND, generous for a loaded machine.
#
# The ping bot runs in-process, on the same event loop as the fake server, so that the test
# sees the messages it handles and the replies it posts.
"""Tests for examples/: the threaded and asyncio clients and the ping bot against the fake."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from qqproto import Message, Ready
from qqproto.testing import FakeGatewayConfig
from qqproto_io import FakeGatewayServer, GatewayClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BOUND = 30.0  # seconds any one wait may take before the test fails
# The core floors Hello's interval at 1 s: beats (and ACKs) come at least once a second.
GATEWAY = FakeGatewayConfig(hello_interval_ms=1000)
DISPATCH = re.compile(r"Dispatch\(type='(\w+)', seq=(\d+), event_id='([^']*)'\)")


def message_id(n: int) -> str:
    return f"C2C_MESSAGE_CREATE:fake{n:08d}"


class Served:
    """A FakeGatewayServer running on an event loop in a background thread."""

    def __init__(self, portal, server: FakeGatewayServer) -> None:
        self.portal = portal
        self.server = server
        self.gateway = server.gateway

    def call(self, func, *args):
        """Run ``func(*args)`` on the server's loop (its controls need the loop's clock)."""
        return self.portal.call(func, *args)

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("QQBOT_") and "proxy" not in k.lower()
        }
        env.update(
            # The tree under test, not whatever `qqproto` the venv would import.
            PYTHONPATH=str(EXAMPLES.parent),
            QQBOT_API_BASE=self.server.http_base,
            QQBOT_TOKEN_URL=self.server.token_url,
            QQBOT_APP_ID=self.gateway.config.app_id,
            QQBOT_CLIENT_SECRET=self.gateway.config.client_secret,
            PYTHONUNBUFFERED="1",
        )
        return env


@pytest.fixture
def served():
    with start_blocking_portal("asyncio") as portal:
        server = FakeGatewayServer(GATEWAY)
        with portal.wrap_async_context_manager(server):
            yield Served(portal, server)


class Example:
    """``python examples/<name> ARGS`` with its stdout read line by line on a thread."""

    def __init__(self, name: str, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our interpreter, our script
            [sys.executable, "-W", "default", str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    def of(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]

    def expect(self, prefix: str, count: int = 1) -> str:
        """Wait until ``count`` lines starting with ``prefix`` were printed; the last one."""
        deadline = time.monotonic() + BOUND
        while len(self.of(prefix)) < count:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {count} x {prefix!r} within {BOUND} s: {self.lines}")
            if line is None:
                self.proc.wait(BOUND)
                pytest.fail(f"exited before {count} x {prefix!r}: {self.lines} {self._stderr}")
            self.lines.append(line)
        return self.of(prefix)[count - 1]

    def finish(self, returncode: int = 0) -> None:
        """Wait for a clean exit, with everything it printed read."""
        deadline = time.monotonic() + BOUND
        while (line := self._queue.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            self.lines.append(line)
        assert self.proc.wait(max(0.0, deadline - time.monotonic())) == returncode, self._stderr
        assert self._stderr == []  # no traceback, no warning (ResourceWarning included)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def examples():
    started: list[Example] = []

    def start(name: str, env: dict[str, str], *args: str) -> Example:
        example = Example(name, env, *args)
        started.append(example)
        return example

    yield start
    for example in started:
        example.kill()


def dispatches(example: Example) -> list[tuple[str, int, str]]:
    found = [DISPATCH.match(line) for line in example.of("Dispatch(")]
    assert all(found), example.of("Dispatch(")
    return [(m[1], int(m[2]), m[3]) for m in found if m]


def assert_no_secret(example: Example, served: Served) -> None:
    output = "\n".join(example.lines + example._stderr)
    assert served.gateway.config.client_secret not in output
    assert "fake-token-" not in output


def assert_one_session_resumed_once(served: Served) -> None:
    gateway = served.gateway
    assert len(gateway.identifies) == 1
    assert len(gateway.resumes) == 1
    first, second = gateway.connections
    assert first.received[0][1] == 2  # Identify
    assert second.received[0][1] == 6  # Resume
    assert second.received[0][2]["session_id"] == first.session.id


# ------------------------------------------------------------------- threaded client


def test_threaded_client_survives_a_4009_and_loses_no_event(served, examples):
    client = examples("threaded_client.py", served.env(), "--dispatches", "4")
    client.expect("Ready(")
    client.expect("HeartbeatAcknowledged(")
    served.call(lambda: [served.server.message(n) for n in (1, 2)])
    client.expect("Dispatch(", 2)

    def rotate() -> None:
        # The session has no connection once the close is out: message 3 waits in the
        # server's replay buffer, and only a correct Resume gets it to the client.
        served.server.close_all(4009, "session timed out")
        served.server.message(3)

    served.call(rotate)
    resumed = client.expect("Resumed(")
    assert "replayed=1" in resumed
    served.call(served.server.message, 4)
    client.finish()

    assert dispatches(client) == [
        ("C2C_MESSAGE_CREATE", 2, message_id(1)),
        ("C2C_MESSAGE_CREATE", 3, message_id(2)),
        ("C2C_MESSAGE_CREATE", 4, message_id(3)),
        ("C2C_MESSAGE_CREATE", 6, message_id(4)),
    ]
    gone = client.of("Disconnected(")
    assert gone[0].startswith("Disconnected(code=4009, ")
    assert "next_step=<NextStep.RESUME" in gone[0]
    assert "closed by the application" in gone[-1]  # --dispatches 4 reached: a clean stop
    assert len(client.of("Ready(")) == 1
    assert_one_session_resumed_once(served)
    assert_no_secret(client, served)


# -------------------------------------------------------------------- asyncio client


def test_asyncio_client_survives_an_op7_rotation_and_loses_no_event(served, examples):
    client = examples("asyncio_client.py", served.env(), "--dispatches", "4")
    client.expect("Ready(")
    client.expect("HeartbeatAcknowledged(")
    served.call(served.server.message, 1)
    client.expect("Dispatch(")

    def rotate() -> None:
        # Op 7, then a message on the same connection: it arrives while the client closes.
        served.server.reconnect_all()
        served.server.message(2)

    served.call(rotate)
    gone = client.expect("Disconnected(")
    # Reconnected already or not yet: message 3 goes live or waits for the Resume.
    served.call(served.server.message, 3)
    client.expect("Resumed(")
    served.call(served.server.message, 4)
    client.finish()

    assert [event_id for _, _, event_id in dispatches(client)] == [
        message_id(n) for n in (1, 2, 3, 4)
    ]
    seqs = [seq for _, seq, _ in dispatches(client)]
    assert seqs == sorted(set(seqs))
    # We closed the rotated connection ourselves, with a code that keeps the session.
    assert gone.startswith("Disconnected(code=4000, reason='server requested a reconnect (op 7)'")
    assert len(client.of("Ready(")) == 1
    assert_one_session_resumed_once(served)
    assert_no_secret(client, served)


# ------------------------------------------------------------- failures they survive


@pytest.mark.parametrize("name", ["threaded_client.py", "asyncio_client.py"])
def test_wrong_credentials_stop_the_example_with_a_fatal_stop(served, examples, name):
    # The token endpoint answers 100016: no retry can help, so the example must not retry
    # forever but stop, say why, and exit non-zero.
    env = {**served.env(), "QQBOT_CLIENT_SECRET": "not-the-secret"}
    client = examples(name, env)
    fatal = client.expect("FatalStop(")
    assert "the token endpoint rejected the credentials" in fatal
    assert "check the app id and client secret" in fatal  # the hint
    client.finish(returncode=1)
    assert len(served.gateway.token_requests) == 1
    assert served.gateway.connections == []  # no gateway request, no socket
    assert "not-the-secret" not in "\n".join(client.lines + client._stderr)


@pytest.mark.parametrize("name", ["threaded_client.py", "asyncio_client.py"])
def test_an_oversized_message_is_dropped_and_reported_on_a_connection_kept(served, examples, name):
    # Closing with 1009 would not help: the server would replay it on the Resume.
    client = examples(name, served.env(), "--dispatches", "2")
    client.expect("Ready(")
    served.call(served.server.message, 1)
    client.expect("Dispatch(")
    served.call(lambda: served.server.message(2, content="x" * (1 << 20)))
    violation = client.expect("ProtocolViolation(")
    assert "PayloadTooLarge(" in violation  # error.reason "too_large"
    served.call(served.server.message, 3)
    client.finish()

    assert [event_id for _, _, event_id in dispatches(client)] == [message_id(1), message_id(3)]
    assert len(client.of("Disconnected(")) == 1  # the final, clean stop
    assert len(served.gateway.connections) == 1


@pytest.mark.parametrize("name", ["threaded_client.py", "asyncio_client.py"])
def test_ctrl_c_closes_cleanly_and_keeps_the_session(served, examples, name, tmp_path):
    snapshot = tmp_path / "session.json"
    client = examples(name, served.env(), "--snapshot", str(snapshot))
    client.expect("Ready(")
    client.expect("HeartbeatAcknowledged(")
    client.proc.send_signal(signal.SIGINT)
    gone = client.expect("Disconnected(")
    client.finish()

    assert gone.startswith("Disconnected(code=4000, reason='closed by the application'")
    assert snapshot.exists()  # a restart Resumes
    (connection,) = served.gateway.connections
    assert connection.closed


# -------------------------------------------------------------------------- ping bot


def load_example(name: str, monkeypatch):
    # Run as a script, an example finds its shared helpers (examples/_common.py) on sys.path.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_the_ping_bot_answers_each_ping_once_in_every_scene(monkeypatch):
    # The module as `qqproto run --app ping_bot:setup` loads it, on a client of our own.
    ping_bot = load_example("ping_bot", monkeypatch)
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(GATEWAY) as server:
            cfg = server.gateway.config
            client = GatewayClient(
                app_id=cfg.app_id,
                client_secret=cfg.client_secret,
                api_base=server.http_base,
                token_url=server.token_url,
            )
            ping_bot.setup(client)
            ready, seen = anyio.Event(), anyio.Event()
            handled: list[str] = []

            @client.on(Ready)
            async def on_ready(_event: Ready) -> None:
                ready.set()

            @client.on(Message)  # registered after the bot's: runs after it, per message
            async def after(message: Message) -> None:
                handled.append(message.content)
                if len(handled) == 5:
                    seen.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(client.run)
                await ready.wait()
                sent = [
                    server.user_message("c2c", "ping"),
                    server.user_message("group", " ping"),  # the space where the @ was
                    server.user_message("guild", "hello"),
                    server.user_message("guild", "PING"),
                    server.user_message("c2c", "pong?"),
                ]
                await seen.wait()
                await client.close()
    posts = server.gateway.rest_posts
    assert [(path, body.get("msg_id"), body["content"]) for _, path, body in posts] == [
        (sent[0].reply_path, sent[0].msg_id, "pong"),
        (sent[1].reply_path, sent[1].msg_id, "pong"),
        (sent[3].reply_path, sent[3].msg_id, "pong"),
    ]
    assert [body.get("msg_seq") for _, _, body in posts] == [1, 1, None]  # no seq in guilds


def test_the_ping_bot_is_a_dozen_lines():
    code = [
        line
        for line in (EXAMPLES / "ping_bot.py").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    body = code[code.index("from qqproto import Message") :]
    assert len(body) <= 12


@pytest.mark.parametrize("name", ["threaded_client.py", "asyncio_client.py"])
def test_examples_run_as_scripts_and_ask_for_credentials(name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
    proc = subprocess.run(  # noqa: S603 - our interpreter, our script
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BOUND,
        check=False,
    )
    assert proc.returncode == 2
    assert "QQBOT_APP_ID and QQBOT_CLIENT_SECRET" in proc.stderr

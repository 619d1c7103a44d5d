"""GatewayClient(transport="webhook") and `qqproto run --webhook`: one option switches a bot
from the WebSocket to the platform's signed callbacks, and nothing else changes.

The fake platform (FakeGatewayServer for the REST side, FakeWebhookPoster for the callbacks)
posts each of its dispatches to the client's endpoint, signed, retrying a slow or failed
ack with the same bytes, as the platform does. Every wait is on an event, bounded by BOUND.
"""

from __future__ import annotations

import importlib.util
import json
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
import httpx
import pytest

from qqproto import Dispatch, Message
from qqproto.testing import FakeGatewayConfig, WebhookSigner
from qqproto_io import FakeGatewayServer, FakeWebhookPoster, GatewayClient
from tests.loopback import anyio_backend  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

BOUND = 20.0
ROOT = Path(__file__).resolve().parent.parent
PATH = "/qqbot"


def webhook_client(server: FakeGatewayServer, **kwargs) -> GatewayClient:
    cfg = server.gateway.config
    return GatewayClient(
        app_id=cfg.app_id,
        client_secret=cfg.client_secret,
        api_base=server.http_base,
        token_url=server.token_url,
        transport="webhook",
        webhook="127.0.0.1:0",
        webhook_path=PATH,
        **kwargs,
    )


def signer_for(server: FakeGatewayServer) -> WebhookSigner:
    cfg = server.gateway.config
    return WebhookSigner(app_id=cfg.app_id, secret=cfg.client_secret)


def load_ping_bot():
    spec = importlib.util.spec_from_file_location("ping_bot_webhook", ROOT / "examples/ping_bot.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_ping_bot_answers_over_webhooks_unchanged_and_a_retry_is_answered_once():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(FakeGatewayConfig()) as server:
            client = webhook_client(server)
            load_ping_bot().setup(client)
            done = anyio.Event()
            seen: list[Message] = []

            @client.on(Message)  # after the bot's own handler
            async def after(message: Message) -> None:
                seen.append(message)
                if len(seen) == 2:
                    done.set()

            assert client.webhook is not None
            assert not client.healths()[0].ready  # not listening before it is entered
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.run)
                await client.webhook.listening.wait()
                assert client.healths()[0].ready
                url = client.webhook.url + PATH
                async with FakeWebhookPoster(url, signer_for(server)) as poster:
                    assert await poster.validate()
                    tg.start_soon(poster.feed, server.gateway)
                    await anyio.wait_all_tasks_blocked()
                    ping = server.user_message("c2c", "ping")
                    other = server.user_message("group", " hello")
                    await done.wait()
                    # The platform retries a callback whose ack it missed: same bytes again.
                    again = signer_for(server).dispatch(ping.type, ping.d, event_id=ping.event_id)
                    assert (await poster.deliver(again)).acked
                    await client.close()
                    tg.cancel_scope.cancel()  # the feed runs until cancelled
    assert [m.id for m in seen] == [ping.msg_id, other.msg_id]  # the retry was not delivered
    assert [m.raw["id"] for m in seen] == [ping.msg_id, other.msg_id]
    posts = server.gateway.rest_posts
    assert [(path, body["msg_id"], body["content"]) for _, path, body in posts] == [
        (ping.reply_path, ping.msg_id, "pong")
    ]
    assert client.webhook.inbox.counts.get("duplicate") == 1


async def test_the_events_are_the_gateways_dispatches_with_the_callbacks_envelope():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(FakeGatewayConfig()) as server:
            client = webhook_client(server)
            assert client.webhook is not None
            async with client:
                await client.webhook.listening.wait()
                url = client.webhook.url + PATH
                async with FakeWebhookPoster(url, signer_for(server)) as poster:
                    request = signer_for(server).dispatch(
                        "GROUP_AT_MESSAGE_CREATE", {"id": "M1", "group_openid": "G1"}, seq=7
                    )
                    assert (await poster.deliver(request)).acked
                    unnumbered = signer_for(server).dispatch("FRIEND_ADD", {"openid": "U1"})
                    assert (await poster.deliver(unnumbered)).acked
                first = await client.__anext__()
                second = await client.__anext__()
    assert first == Dispatch(
        type="GROUP_AT_MESSAGE_CREATE",
        seq=7,
        event_id=request.event_id,
        data={"id": "M1", "group_openid": "G1"},
    )
    assert isinstance(second, Dispatch)
    assert (second.type, second.seq) == ("FRIEND_ADD", None)


async def test_an_application_that_falls_behind_gets_retries_not_losses():
    # Client queue 1, inbox 1: the third event waits in the inbox and the fourth is refused
    # with 503 d:1 until the application reads again; the platform's retry then gets in.
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(FakeGatewayConfig()) as server:
            client = webhook_client(server, max_queued_events=1)
            assert client.webhook is not None
            signer = signer_for(server)
            requests = [signer.message(f"m{n}") for n in range(4)]
            async with client:
                await client.webhook.listening.wait()
                url = client.webhook.url + PATH
                async with FakeWebhookPoster(url, signer) as poster:
                    answers = []
                    for request in requests:
                        answers.append((await poster.post(request)).status)
                        await anyio.wait_all_tasks_blocked()
                    assert answers[:3] == [200, 200, 200]
                    assert answers[3] == 503
                    got = [await client.__anext__() for _ in range(3)]
                    assert (await poster.deliver(requests[3])).acked
                    got.append(await client.__anext__())
    ids = [e.event_id for e in got if isinstance(e, Dispatch)]
    assert ids == [r.event_id for r in requests]
    assert client.webhook.inbox.counts.get("queue_full") == 1


async def test_a_forged_callback_is_refused_and_never_delivered():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(FakeGatewayConfig()) as server:
            client = webhook_client(server)
            assert client.webhook is not None
            async with client:
                await client.webhook.listening.wait()
                url = client.webhook.url + PATH
                signer = signer_for(server)
                async with FakeWebhookPoster(url, signer) as poster:
                    forged = signer.forge(signer.message("ping"), secret="not-the-secret")
                    assert (await poster.post(forged)).status == 401
                    real = signer.message("ping")
                    assert (await poster.post(real)).status == 200
                event = await client.__anext__()
    assert isinstance(event, Dispatch)
    assert event.event_id == real.event_id  # the forged one never reached the queue


def test_transport_must_be_one_of_the_two():
    with pytest.raises(ValueError, match="transport"):
        GatewayClient(app_id="1", client_secret="s", transport="carrier-pigeon")
    with pytest.raises(ValueError, match="HOST:PORT"):
        GatewayClient(app_id="1", client_secret="s", transport="webhook", webhook="8080")


# ---------------------------------------------------------------------------- the CLI

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}


class _Child:
    """A `qqproto run` child process whose stdout lines are read on a thread, so that every
    wait on it is bounded."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        code = "import sys; from qqproto_io._cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-c", code, "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # The tree under test first (a child may run elsewhere, e.g. examples/).
            env={**CLEAN, "PYTHONPATH": str(ROOT)},
            cwd=cwd,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, pattern: str, deadline: float) -> re.Match[str]:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found
        pytest.fail(f"{pattern!r} not printed in time:\n{''.join(self.seen)}")

    def stop(self) -> str:
        """SIGINT, then its exit; returns its stderr. Every stdout line is in ``seen``."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=BOUND)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        with self.proc.stderr:
            err = self.proc.stderr.read()
        while (line := self.lines.get(timeout=BOUND)) is not None:
            self.seen.append(line)
        self.proc.stdout.close()  # read to its end by then
        return err


def test_run_fake_webhook_serves_the_ping_bot_end_to_end():
    """`qqproto run --fake --webhook`: the fake validates the endpoint, a user's ping reaches
    the bot as a signed callback, and its pong reaches the fake's REST side; the JSON log
    has the same dispatch records as over the WebSocket."""
    args = ["--fake", "--webhook", "127.0.0.1:0", "--webhook-path", PATH]
    args += ["--app", "ping_bot:setup", "--log-format", "json", "-v"]
    child = _Child(*args, cwd=ROOT / "examples")  # where ping_bot is found
    deadline = time.monotonic() + 3 * BOUND  # for the whole exchange, however chatty
    try:
        fake = child.until(r"fake gateway listening on (http://127\.0\.0\.1:\d+)", deadline)
        child.until(r"fake webhook: validation of http://127\.0\.0\.1:\d+/qqbot passed", deadline)
        ping = {"kind": "c2c", "content": "ping"}
        answer = httpx.post(f"{fake.group(1)}/_fake/messages", json=ping)
        assert answer.status_code == 200
        child.until(r"POST /v2/users/FAKEUSEROPENID0001/messages -> 200", deadline)
    finally:
        err = child.stop()
    assert child.proc.returncode == 0, err
    records = [json.loads(line) for line in child.seen if line.startswith("{")]
    dispatches = [r for r in records if r.get("event") == "dispatch"]
    assert dispatches
    assert all(r["state"] == "WEBHOOK" and r["seq"] is None for r in dispatches)
    assert "Traceback" not in err


def test_two_processes_behind_one_url_deliver_a_retried_event_once(redis_server):
    """Behind a load balancer the platform's retry may reach another process: with
    --redis-url they share the delivery record, so exactly one of them handles it."""
    cfg = FakeGatewayConfig()
    common = ["--webhook", "127.0.0.1:0", "--redis-url", redis_server.url, "-v"]
    common += ["--app-id", cfg.app_id, "--client-secret", cfg.client_secret]
    common += ["--app", "tests.webhook_recorder:setup", "--api-base", "http://127.0.0.1:9"]
    deadline = time.monotonic() + 3 * BOUND
    children = [_Child(*common), _Child(*common)]
    try:
        urls = [
            c.until(r"listening on (http://127\.0\.0\.1:\d+)", deadline).group(1) for c in children
        ]
        signer = WebhookSigner(app_id=cfg.app_id, secret=cfg.client_secret)
        event = signer.message("ping")
        with httpx.Client(timeout=BOUND) as http:
            for url in urls:  # the first try, then the platform's retry through the other
                answer = http.post(url, content=event.body, headers=list(event.headers))
                assert answer.status_code == 200  # both acknowledge it
        first = children[0].until(rf"handled {re.escape(event.event_id)}|duplicate", deadline)
        second = children[1].until(rf"handled {re.escape(event.event_id)}|duplicate", deadline)
        handled = [m.group(0) for m in (first, second) if m.group(0).startswith("handled")]
    finally:
        errors = [c.stop() for c in children]
    assert len(handled) == 1, [c.seen for c in children]
    assert all("Traceback" not in e for e in errors), errors

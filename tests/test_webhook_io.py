"""Webhook delivery over real sockets (h11 endpoint) and through the ASGI application.

Ordering is asserted with anyio Events and recorded sequences, never with sleeps; the only
timeouts are upper bounds that a correct implementation never reaches.
"""

from __future__ import annotations

import uuid

import anyio
import h11
import httpx
import pytest
import redis.asyncio as aioredis

from qqproto import Dispatch, DuplicateDropped, WebhookReceiver, WebhookRouter
from qqproto._webhook_answers import ACK_BODY, RETRY_BODY
from qqproto.testing._fake_webhook import SignedRequest, WebhookRetryPolicy, WebhookSigner
from qqproto_io._asgi import WebhookApp
from qqproto_io._fake_webhook import FakeWebhookPoster
from qqproto_io._webhook import WebhookInbox, WebhookServer
from qqproto_io._webhook_redis import RedisDeliveryClaims
from tests.loopback import anyio_backend  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

APP = "102000001"
SECRET = "DG5g3B4j9X2KOErG"
BOUND = 10.0  # generous upper bound on anything that should be immediate


@pytest.fixture(autouse=True)
def _close_inboxes(monkeypatch):
    """Close every inbox a test made (its memory streams warn when left open)."""
    made: list[WebhookInbox] = []
    original = WebhookInbox.__init__

    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(WebhookInbox, "__init__", init)
    yield
    for inbox in made:
        inbox._send.close()
        inbox._receive.close()


def make_inbox(**kwargs) -> WebhookInbox:
    return WebhookInbox(WebhookReceiver(app_id=APP, secret=SECRET), **kwargs)


def signer() -> WebhookSigner:
    return WebhookSigner(app_id=APP, secret=SECRET)


def take(inbox: WebhookInbox) -> list[tuple[str, object]]:
    """Everything queued right now, without waiting."""
    out = []
    while True:
        try:
            out.append(inbox._receive.receive_nowait())
        except anyio.WouldBlock:
            return out


def dispatches(items) -> list[Dispatch]:
    return [e for _, e in items if isinstance(e, Dispatch)]


class Client:
    """A keep-alive HTTP/1.1 client on one raw connection (h11), for exact control."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await anyio.connect_tcp("127.0.0.1", port))

    async def request(self, request: SignedRequest, *, target: str = "/") -> tuple[int, bytes]:
        headers = [("Host", "localhost"), ("Content-Length", str(len(request.body)))]
        headers += list(request.headers)
        data = self.conn.send(h11.Request(method="POST", target=target, headers=headers))
        data += self.conn.send(h11.Data(data=request.body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send(data)
        status, body = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, body

    async def aclose(self) -> None:
        await self.stream.aclose()


async def read_all(stream) -> bytes:
    out = b""
    with anyio.fail_after(BOUND):
        while True:
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return out


# ----------------------------------------------------------------------- h11 endpoint


async def test_validation_and_a_dispatch_over_the_wire():
    inbox = make_inbox()
    async with WebhookServer(inbox) as server, FakeWebhookPoster(server.url, signer()) as poster:
        assert await poster.validate()
        request = signer().dispatch("C2C_MESSAGE_CREATE", {"id": "m", "content": "hi"})
        report = await poster.deliver(request)
    assert report.acked
    assert len(report.attempts) == 1
    assert report.attempts[0].body == ACK_BODY
    (app_id, event), *rest = take(inbox)
    assert rest == []
    assert app_id == APP
    assert event == Dispatch(
        type="C2C_MESSAGE_CREATE",
        seq=None,
        event_id=request.event_id,
        data={"id": "m", "content": "hi"},
    )


async def test_forged_tampered_truncated_are_refused_over_the_wire():
    inbox = make_inbox()
    request = signer().dispatch("GROUP_ADD_ROBOT", {})
    async with WebhookServer(inbox) as server, FakeWebhookPoster(server.url, signer()) as poster:
        for bad in (
            WebhookSigner.forge(request),
            WebhookSigner.tamper(request),
            WebhookSigner.truncate(request),
        ):
            attempt = await poster.post(bad)
            assert attempt.status == 401
    assert take(inbox) == []
    assert inbox.counts == {"bad_signature": 3}


async def test_slow_handler_is_acked_first():
    """The ack is written before the event is queued, and the handler starts after that."""
    order: list[str] = []
    started, release = anyio.Event(), anyio.Event()

    class Recording(WebhookInbox):
        def deliver(self, handled) -> None:
            order.append("deliver")
            super().deliver(handled)

    inbox = Recording(WebhookReceiver(app_id=APP, secret=SECRET))

    async def handler(app_id, event) -> None:
        order.append("handler")
        started.set()
        await release.wait()  # a handler that takes for ever

    async with WebhookServer(inbox) as server:
        original = server._write

        async def write(stream, data) -> None:
            await original(stream, data)
            order.append("ack written")

        server._write = write
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.run, handler)
            client = await Client.connect(server.port)
            with anyio.fail_after(BOUND):
                status, body = await client.request(signer().dispatch("GROUP_ADD_ROBOT", {}))
                await started.wait()
            # Acked although the handler has not finished (it waits for `release`).
            assert (status, body) == (200, ACK_BODY)
            assert not release.is_set()
            # A second event is acked too while the first handler still runs.
            with anyio.fail_after(BOUND):
                status2, _ = await client.request(signer().dispatch("GROUP_ADD_ROBOT", {}))
            assert status2 == 200
            release.set()
            await client.aclose()
            inbox.close()
    assert order[:3] == ["ack written", "deliver", "handler"]


async def test_sequential_and_concurrent_retries_delivered_once():
    inbox = make_inbox()
    request = signer().dispatch("C2C_MESSAGE_CREATE", {"id": "m-1"})
    statuses: list[int | None] = []
    async with WebhookServer(inbox) as server, FakeWebhookPoster(server.url, signer()) as poster:
        statuses.extend([(await poster.post(request)).status for _ in range(4)])

        async def once() -> None:
            statuses.append((await poster.post(request)).status)

        concurrent = signer().dispatch("C2C_MESSAGE_CREATE", {"id": "m-2"})
        request = concurrent
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(once)
    assert statuses == [200] * 14
    items = take(inbox)
    assert [d.data for d in dispatches(items)] == [{"id": "m-1"}, {"id": "m-2"}]
    assert sum(isinstance(e, DuplicateDropped) for _, e in items) == 12


async def test_platform_retries_a_slow_ack_and_the_event_is_delivered_once():
    """The first attempt's ack is held up (a slow shared claim) past the platform's
    timeout; the retry, same id, finds the id recorded and is acked at once."""
    release = anyio.Event()
    calls: list[str] = []

    class SlowClaims:
        async def claim(self, app_id: str, event_id: str) -> bool:
            calls.append(event_id)
            await release.wait()
            return True

    inbox = make_inbox(claims=SlowClaims(), claim_timeout=BOUND * 2)
    policy = WebhookRetryPolicy(retries=3, ack_timeout=2.0)
    request = signer().dispatch("GROUP_ADD_ROBOT", {})
    async with (
        WebhookServer(inbox) as server,
        FakeWebhookPoster(server.url, signer(), policy=policy) as poster,
    ):
        report = await poster.deliver(request)
        release.set()
        with anyio.fail_after(BOUND):
            items = [await inbox.__anext__() for _ in range(2)]
    assert report.acked
    assert [a.status for a in report.attempts] == [None, 200]
    assert calls == [request.event_id]  # the retry never got as far as claiming
    assert take(inbox) == []
    assert len(dispatches(items)) == 1
    assert [type(e).__name__ for _, e in items] == ["DuplicateDropped", "Dispatch"]


async def test_queue_full_answers_503_and_the_retry_is_delivered():
    inbox = make_inbox(queue_size=1)
    first = signer().dispatch("GROUP_ADD_ROBOT", {"n": 1})
    second = signer().dispatch("GROUP_ADD_ROBOT", {"n": 2})
    async with WebhookServer(inbox) as server, FakeWebhookPoster(server.url, signer()) as poster:
        assert (await poster.deliver(first)).acked
        report = await poster.deliver(second)
        assert not report.acked
        assert [(a.status, a.body) for a in report.attempts] == [(503, RETRY_BODY)] * 4
        assert inbox.counts["queue_full"] == 4
        assert len(take(inbox)) == 1  # the application catches up
        assert (await poster.deliver(second)).acked
    assert [d.data for d in dispatches(take(inbox))] == [{"n": 2}]


async def test_limits_over_the_wire():
    inbox = make_inbox()
    async with WebhookServer(inbox) as server:
        # A GET is answered 405.
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            await s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_all(s)).startswith(b"HTTP/1.1 405 ")
        # A 2 MiB body announced: 413 after the head alone, before a byte of the body.
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            head = f"POST / HTTP/1.1\r\nHost: x\r\nX-Bot-Appid: {APP}\r\n"
            await s.send((head + f"Content-Length: {2 << 20}\r\n\r\n").encode())
            assert (await read_all(s)).startswith(b"HTTP/1.1 413 ")
        # Chunked, no length: refused once past the limit, without reading the rest.
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            await s.send((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
            chunk = b"x" * 65536
            with pytest.raises((anyio.BrokenResourceError, OSError)):  # noqa: PT012
                for _ in range(200):  # 12.5 MiB if the server read it all
                    await s.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            assert inbox.counts.get("too_large") == 1
        # Not HTTP at all: 400 or a close, and the server carries on.
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            await s.send(b"\x16\x03\x01 hello tls\r\n\r\n")
            reply = await read_all(s)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 400 ")
        # Signed but not JSON: 400; wrong app id: 403 (each closes its connection).
        wrong_app = signer().dispatch("X", {}).with_header("X-Bot-Appid", "1")
        for request, status in ((signer().signed(b"not json"), 400), (wrong_app, 403)):
            client = await Client.connect(server.port)
            assert (await client.request(request))[0] == status
            await client.aclose()
        # And a good request is still served.
        client = await Client.connect(server.port)
        assert await client.request(signer().dispatch("GROUP_ADD_ROBOT", {})) == (200, ACK_BODY)
        await client.aclose()


async def test_a_stalled_connection_times_out_without_disturbing_others():
    inbox = make_inbox()
    async with (
        WebhookServer(inbox, request_timeout=1.0) as server,
        await anyio.connect_tcp("127.0.0.1", server.port) as stalled,
    ):
        head = f"POST / HTTP/1.1\r\nHost: x\r\nX-Bot-Appid: {APP}\r\nContent-Length: 50\r\n\r\n"
        await stalled.send(head.encode() + b"{")  # and never the rest
        client = await Client.connect(server.port)
        with anyio.fail_after(BOUND):
            for _ in range(5):
                request = signer().dispatch("GROUP_ADD_ROBOT", {})
                assert (await client.request(request))[0] == 200
        await client.aclose()
        assert (await read_all(stalled)).startswith(b"HTTP/1.1 408 ")
    assert len(dispatches(take(inbox))) == 5


async def test_500_events_from_20_connections_each_delivered_once():
    inbox = make_inbox(queue_size=1000)
    s = signer()
    requests = [s.message(f"n{i}") for i in range(500)]
    statuses: list[int] = []

    async def connection(batch: list[SignedRequest]) -> None:
        client = await Client.connect(server.port)
        for request in batch:
            status, body = await client.request(request)
            statuses.append(status)
            assert body == ACK_BODY
        await client.aclose()

    async with WebhookServer(inbox) as server:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for c in range(20):
                    tg.start_soon(connection, requests[c::20])
            # The platform's retry of every one of them: all acked, none delivered again.
            async with anyio.create_task_group() as tg:
                for c in range(20):
                    tg.start_soon(connection, requests[c::20])
    assert statuses == [200] * 1000
    delivered = dispatches(take(inbox))
    assert sorted(d.event_id for d in delivered) == sorted(r.event_id for r in requests)
    assert inbox.counts == {"delivered": 500, "duplicate": 500}


async def test_several_bots_on_one_url():
    a = WebhookReceiver(app_id="1", secret="secret-one")
    b = WebhookReceiver(app_id="2", secret="secret-two")
    inbox = WebhookInbox(WebhookRouter([a, b], path="/qq/callback"))
    sa = WebhookSigner(app_id="1", secret="secret-one")
    sb = WebhookSigner(app_id="2", secret="secret-two")
    async with WebhookServer(inbox) as server:
        url = server.url + "/qq/callback"
        async with FakeWebhookPoster(url, sa) as pa, FakeWebhookPoster(url, sb) as pb:
            assert await pa.validate()
            assert await pb.validate()
            assert (await pa.deliver(sa.dispatch("GROUP_ADD_ROBOT", {"bot": 1}))).acked
            assert (await pb.deliver(sb.dispatch("GROUP_ADD_ROBOT", {"bot": 2}))).acked
        async with FakeWebhookPoster(server.url + "/elsewhere", sa) as wrong:
            assert (await wrong.post(sa.dispatch("X", {}))).status == 404
    assert [(app, e.data) for app, e in take(inbox)] == [("1", {"bot": 1}), ("2", {"bot": 2})]


async def test_a_failing_claim_store_delivers_unclaimed():
    class Down:
        async def claim(self, app_id: str, event_id: str) -> bool:
            raise ConnectionError("redis is down")

    inbox = make_inbox(claims=Down())
    async with WebhookServer(inbox) as server, FakeWebhookPoster(server.url, signer()) as poster:
        assert (await poster.deliver(signer().dispatch("GROUP_ADD_ROBOT", {}))).acked
    assert len(dispatches(take(inbox))) == 1
    assert inbox.counts["claim_failed"] == 1


# ------------------------------------------------------------------------------- ASGI


async def test_asgi_app_through_httpx():
    inbox = make_inbox()
    app = WebhookApp(inbox)
    transport = httpx.ASGITransport(app=app)
    s = signer()
    async with httpx.AsyncClient(transport=transport, base_url="http://bot") as http:
        poster = FakeWebhookPoster("http://bot/qq", s, client=http)
        async with poster:
            assert await poster.validate()
            request = s.dispatch("C2C_MESSAGE_CREATE", {"id": "m"})
            assert (await poster.deliver(request)).acked
            assert (await poster.deliver(request)).acked  # a retry
            assert (await poster.post(WebhookSigner.forge(request))).status == 401
        assert (await http.get("/qq")).status_code == 405
        big = await http.post("/qq", content=b"x" * ((1 << 20) + 1), headers={"X-Bot-Appid": APP})
        assert big.status_code == 413
    items = take(inbox)
    assert len(dispatches(items)) == 1
    assert isinstance(items[1][1], DuplicateDropped)


async def test_asgi_answer_is_sent_before_delivery_and_body_read_in_pieces():
    order: list[str] = []

    class Recording(WebhookInbox):
        def deliver(self, handled) -> None:
            order.append("deliver")
            super().deliver(handled)

    inbox = Recording(WebhookReceiver(app_id=APP, secret=SECRET))
    request = signer().dispatch("GROUP_ADD_ROBOT", {"x": "y" * 100})
    pieces = [request.body[:10], request.body[10:50], request.body[50:]]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < 2} for i, p in enumerate(pieces)
    ]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            order.append("body sent")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers],
    }
    await WebhookApp(inbox)(scope, receive, send)
    assert order == ["body sent", "deliver"]
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == ACK_BODY
    assert len(dispatches(take(inbox))) == 1


async def test_asgi_refuses_an_oversized_body_without_reading_it_all():
    inbox = make_inbox()
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"x-bot-appid", b"1")]}
    inbox = WebhookInbox(WebhookReceiver(app_id="1", secret=SECRET))
    with anyio.fail_after(BOUND):
        await WebhookApp(inbox)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert reads == 17  # 1 MiB + one piece, then it stopped


async def test_asgi_lifespan_is_acknowledged():
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0)

    async def send(message) -> None:
        sent.append(message)

    await WebhookApp(make_inbox())({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# ------------------------------------------------------------------------------ Redis


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio runs on asyncio only
async def test_two_receivers_share_deliveries_through_redis(redis_server, anyio_backend):  # noqa: F811
    """Two endpoints, each with its own memory, one Redis: the same event posted to both
    (concurrently, then again) is delivered by exactly one of them."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    c1 = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    c2 = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    inboxes = [
        make_inbox(claims=RedisDeliveryClaims(c1, prefix=prefix)),
        make_inbox(claims=RedisDeliveryClaims(c2, prefix=prefix)),
    ]
    s = signer()
    requests = [s.message(f"n{i}") for i in range(50)]
    try:
        async with WebhookServer(inboxes[0]) as one, WebhookServer(inboxes[1]) as two:
            p1 = FakeWebhookPoster(one.url, s)
            p2 = FakeWebhookPoster(two.url, s)
            async with p1, p2:
                acked: list[bool] = []

                async def post(poster, request) -> None:
                    acked.append((await poster.deliver(request)).acked)

                async with anyio.create_task_group() as tg:
                    for request in requests:
                        tg.start_soon(post, p1, request)
                        tg.start_soon(post, p2, request)
                for request in requests[:10]:  # later retries, to either
                    await post(p2, request)
                    await post(p1, request)
        key = RedisDeliveryClaims(c1, prefix=prefix).key(APP, requests[0].event_id or "")
        ttl = await c1.pttl(key)
    finally:
        await c1.aclose()
        await c2.aclose()
    assert acked == [True] * 120
    delivered = [d.event_id for inbox in inboxes for d in dispatches(take(inbox))]
    assert sorted(delivered) == sorted(r.event_id for r in requests)
    lost = sum(inbox.counts.get("claim_lost", 0) for inbox in inboxes)
    assert lost == 50  # every event: the concurrent loser (later retries stop locally or lose)
    assert 3_500_000 < ttl <= 3_600_000

"""Ack latency and throughput of qqproto_io's webhook endpoint (h11 on anyio), on loopback.

A client and the server run in one process (one event loop), like the tests: the numbers
include the client's own cost, so they are a floor on what the endpoint can do, not a
ceiling. Every request is a fresh, validly signed ``C2C_MESSAGE_CREATE``; the signatures
are made before timing starts, so what is measured is the server: HTTP parsing, Ed25519
verification, dedup, the ack, and queueing for a consumer that drains the queue.

    python benchmarks/bench_webhook.py --events 5000 --connections 20 --backend asyncio

prints the ack latency (median and p99, one request at a time on one keep-alive
connection) and the throughput (signed events per second over N concurrent connections).
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import h11

from qqproto._webhook import WebhookReceiver
from qqproto.testing._fake_webhook import SignedRequest, WebhookSigner
from qqproto_io._webhook import WebhookInbox, WebhookServer

APP = "102000001"
SECRET = "bench-secret-0123456789"  # noqa: S105 - a throwaway benchmark key


class _Client:
    def __init__(self, stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def post(self, request: SignedRequest) -> int:
        headers = [("Host", "localhost"), ("Content-Length", str(len(request.body)))]
        headers += list(request.headers)
        data = self.conn.send(h11.Request(method="POST", target="/", headers=headers))
        data += self.conn.send(h11.Data(data=request.body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send(data)
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status


async def _drain(inbox: WebhookInbox) -> None:
    async for _ in inbox:
        pass


async def _run(events: int, connections: int, latency_samples: int) -> None:
    signer = WebhookSigner(app_id=APP, secret=SECRET)
    latency_requests = [signer.message(f"l{i}") for i in range(latency_samples)]
    requests = [signer.message(f"t{i}") for i in range(events)]
    inbox = WebhookInbox(WebhookReceiver(app_id=APP, secret=SECRET), queue_size=65536)
    async with WebhookServer(inbox) as server, anyio.create_task_group() as tg:
        tg.start_soon(_drain, inbox)
        # Latency: one request at a time, so each number is one request's round trip.
        client = _Client(await anyio.connect_tcp("127.0.0.1", server.port))
        samples = []
        for request in latency_requests:
            started = time.perf_counter()
            status = await client.post(request)
            samples.append(time.perf_counter() - started)
            assert status == 200, status
        await client.stream.aclose()
        samples.sort()
        median = statistics.median(samples) * 1e3
        p99 = samples[int(len(samples) * 0.99) - 1] * 1e3
        print(f"ack latency: median {median:.3f} ms, p99 {p99:.3f} ms ({len(samples)} requests)")

        # Throughput: N keep-alive connections, each posting its share back to back.
        async def connection(batch: list[SignedRequest]) -> None:
            c = _Client(await anyio.connect_tcp("127.0.0.1", server.port))
            for request in batch:
                assert await c.post(request) == 200
            await c.stream.aclose()

        started = time.perf_counter()
        async with anyio.create_task_group() as load:
            for n in range(connections):
                load.start_soon(connection, requests[n::connections])
        elapsed = time.perf_counter() - started
        print(
            f"throughput: {events / elapsed:,.0f} signed events/s "
            f"({events} events, {connections} connections, {elapsed:.2f} s)"
        )
        delivered = inbox.counts.get("delivered", 0)
        print(f"delivered once each: {delivered == events + latency_samples}")
        inbox.close()
        tg.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--latency-samples", type=int, default=1000)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(_run, args.events, args.connections, args.latency_samples, backend=args.backend)


if __name__ == "__main__":
    main()

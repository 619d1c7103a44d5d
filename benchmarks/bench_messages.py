"""What typed messages cost on the receive path: nothing unless a handler asks for them.

    .venv/bin/python benchmarks/bench_messages.py [--quick]

The same unique ~1 KB GROUP_AT_MESSAGE_CREATE dispatches as figure 2 of run.py go through
the core (`receive()` + `drain()`) and then through GatewayClient's handler lookup, the step
that turns a dispatch into the calls of its handlers, in three set-ups, interleaved over
rounds (medians; GC off):

    (a) the core alone (the baseline);
    (b) + the lookup for a client with a raw handler (`on("GROUP_AT_MESSAGE_CREATE")`):
        nothing is parsed;
    (c) + the lookup for a client with a typed handler (`on(Message)`): each dispatch is
        parsed once into a GroupMessage.

(b) / (a) is the price of the lookup alone (the goal: the typed layer adds nothing there);
(c) - (b) is what parsing a message costs when a bot asks for it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import dispatch_texts
from run import Scripted

from qqproto import Dispatch, Message
from qqproto_io import GatewayClient


class _NoSends:
    """Has a responder's verbs; the benchmark never calls them."""

    async def reply(self, *_args: object) -> None:
        raise AssertionError

    async def upload(self, *_args: object) -> None:
        raise AssertionError

    async def acknowledge(self, *_args: object) -> None:
        raise AssertionError


def _client(typed: bool) -> GatewayClient:
    client = GatewayClient(app_id="1", client_secret="s")  # noqa: S106 - never used

    async def handler(_event: object) -> None:  # never awaited: only looked up
        return None

    client.on(Message if typed else "GROUP_AT_MESSAGE_CREATE")(handler)
    return client


def _run(texts: list[str], lookup: object) -> float:
    scripted = Scripted().start()
    conn, attempt = scripted.conn, scripted.attempt
    receive, drain = conn.receive, conn.drain
    now = 1.0
    gc.disable()
    try:
        start = time.perf_counter()
        if lookup is None:
            for text in texts:
                receive(text, now, attempt=attempt)
                drain()
        else:
            for text in texts:
                receive(text, now, attempt=attempt)
                for event in drain():
                    if type(event) is Dispatch:
                        lookup(event)  # type: ignore[operator]
        return time.perf_counter() - start
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (noise)")
    args = parser.parse_args(argv)
    count = 2_000 if args.quick else 20_000
    rounds = 3 if args.quick else 7
    texts = dispatch_texts(count)
    raw, typed = _client(typed=False), _client(typed=True)
    # The client is not entered (no sockets here), so it gets a stand-in for the Messenger
    # its messages are bound to: binding is a field, whoever the responder is.
    typed.messenger = _NoSends()  # type: ignore[assignment]
    timings: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for _ in range(rounds):
        timings["a"].append(_run(texts, None))
        timings["b"].append(_run(texts, raw._handlers_for))
        timings["c"].append(_run(texts, typed._handlers_for))
    per = {k: statistics.median(v) / count * 1e6 for k, v in timings.items()}
    print(f"typed messages on the receive path: {count:,} dispatches x {rounds} rounds, median")
    print(f"(a) core receive()+drain()                    {per['a']:7.2f} µs/dispatch")
    print(f"(b) + handler lookup, raw handler (no parse)   {per['b']:7.2f} µs/dispatch")
    print(f"(c) + handler lookup, on(Message) (parsed)     {per['c']:7.2f} µs/dispatch")
    print(f"(b) / (a)  the lookup without typed handlers   {per['b'] / per['a']:7.2f}x")
    print(f"(c) - (b)  parsing one message when asked      {per['c'] - per['b']:7.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

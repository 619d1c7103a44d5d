"""The client side of the loopback benchmarks: one client per process, one JSON result line.

Each mode connects to ``bench_server.py`` on ``--port``, counts dispatches, and prints
``RESULT {json}`` on stdout. The measured window runs from the first dispatch counted to the
last one (``count - 1`` dispatches), so start-up, imports and the handshake are left out of
the rates; ``maxrss`` is the process's own peak (``ru_maxrss``), whole life included.

Modes:
    bare      anyio + wsproto + json.loads; no protocol logic (the baseline)
    websockets  the same bare loop on the `websockets` library (an anchor)
    qqproto   qqproto_io.GatewayClient, iterating events and counting Dispatch
    shards    one GatewayClient running ``--shards`` shards, ``--count`` dispatches each
    botpy     the official SDK (qq-botpy), its base URLs patched here at run time
    bytes     a raw socket counting bytes (shows the server is not the bottleneck)
    idle      GatewayClient connected and idle; CPU and event-loop wake-ups per beat
    botpy-idle  botpy connected and idle, until killed (for its RSS)

    python benchmarks/bench_clients.py qqproto --port 40000 --count 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import time
from typing import Any

EVENT_TYPE = "GROUP_AT_MESSAGE_CREATE"
APP_ID = "102000001"
SECRET = "bench-secret"  # noqa: S105 - the bench server accepts anything


class Meter:
    """Counts dispatches; times the window from the first to the last."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.t0 = self.cpu0 = self.t1 = self.cpu1 = 0.0

    def tick(self) -> bool:
        """Count one dispatch; True when the last one has arrived."""
        self.seen += 1
        if self.seen == 1:
            self.t0, self.cpu0 = time.perf_counter(), _cpu()
        elif self.seen == self.count:
            self.t1, self.cpu1 = time.perf_counter(), _cpu()
            return True
        return False

    def result(self, **extra: object) -> dict[str, object]:
        n = self.count - 1
        wall = self.t1 - self.t0
        return {
            "dispatches": self.seen,
            "wall": wall,
            "rate": n / wall if wall > 0 else 0.0,
            "cpu_per_10k": (self.cpu1 - self.cpu0) / n * 10_000 if n else 0.0,
            "maxrss": _maxrss(),
            **extra,
        }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def emit(result: dict[str, object]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def _identify() -> str:
    d = {"token": "QQBot BENCH-TOKEN", "intents": 1 << 25, "shard": [0, 1]}
    return json.dumps({"op": 2, "d": d})


# ------------------------------------------------------------------------------- bare


async def run_bare(port: int, count: int) -> dict[str, object]:
    import anyio
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Request, TextMessage

    meter = Meter(count)
    stream = await anyio.connect_tcp("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send(ws.send(Request(host=f"127.0.0.1:{port}", target="/websocket")))
    pieces: list[str] = []
    loads = json.loads
    while True:
        ws.receive_data(await stream.receive(65536))
        for event in ws.events():
            if not isinstance(event, TextMessage):
                continue
            pieces.append(event.data)
            if not event.message_finished:
                continue
            msg = loads("".join(pieces))
            pieces.clear()
            op = msg["op"]
            if op == 0 and msg["t"] != "READY":
                if meter.tick():
                    await stream.aclose()
                    return meter.result()
            elif op == 10:
                await stream.send(ws.send(TextMessage(data=_identify())))


async def run_websockets(port: int, count: int) -> dict[str, object]:
    """The same bare loop on the `websockets` library (its C-accelerated frame reader)."""
    from websockets.asyncio.client import connect

    meter = Meter(count)
    loads = json.loads
    # No compression (the bench server offers none) and no size limit, as the bare client.
    async with connect(
        f"ws://127.0.0.1:{port}/websocket", compression=None, max_size=None, ping_interval=None
    ) as ws:
        async for text in ws:
            msg = loads(text)
            op = msg["op"]
            if op == 0 and msg["t"] != "READY":
                if meter.tick():
                    return meter.result()
            elif op == 10:
                await ws.send(_identify())
    return meter.result()


# ------------------------------------------------------------------------------ bytes


def run_bytes(port: int, count: int) -> dict[str, object]:
    import base64

    from bench_server import _Reader, client_frame

    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    reader = _Reader(sock)
    reader.until(b"\r\n\r\n")
    reader.frame()  # Hello
    sock.sendall(client_frame(_identify().encode()))
    _, ready = reader.frame()
    total = json.loads(ready)["d"]["bench_total_bytes"]
    received = len(reader.buf)
    t0, cpu0 = time.perf_counter(), _cpu()
    buf = bytearray(1 << 20)
    while received < total:
        n = sock.recv_into(buf)
        if not n:
            break
        received += n
    t1, cpu1 = time.perf_counter(), _cpu()
    sock.close()
    wall = t1 - t0
    return {
        "dispatches": count if received >= total else 0,
        "wall": wall,
        "rate": count / wall if wall > 0 else 0.0,
        "cpu_per_10k": (cpu1 - cpu0) / count * 10_000,
        "maxrss": _maxrss(),
        "bytes": received,
    }


# ---------------------------------------------------------------------------- qqproto


def _gateway_client(port: int, client: dict[str, Any] | None = None, **config: Any) -> Any:
    from qqproto import Intents, SessionConfig
    from qqproto_io import GatewayClient

    base = f"http://127.0.0.1:{port}"
    cfg = SessionConfig(intents=Intents.DEFAULT, **config)
    return GatewayClient(
        app_id=APP_ID,
        client_secret=SECRET,
        config=cfg,
        api_base=base,
        token_url=base + "/app/getAppAccessToken",
        proxy=None,
        **(client or {}),
    )


async def run_qqproto(port: int, count: int) -> dict[str, object]:
    from qqproto import Dispatch

    meter = Meter(count)
    client = _gateway_client(port)
    async with client:
        async for event in client:
            if type(event) is Dispatch and meter.tick():
                break
        dropped = client.dropped_events
    return meter.result(dropped=dropped)


async def run_shards(port: int, shards: int, count: int) -> dict[str, object]:
    """``shards`` shards in one client; the window spans every shard's dispatches."""
    from qqproto import Dispatch
    from qqproto_io._stores import LocalIdentifyLimiter

    meter = Meter(shards * count)
    # No 5 s identify spacing: the server holds the dispatches until every shard is READY,
    # so the spacing would only make the run longer. The queue holds every dispatch: at full
    # blast, 100 shard tasks each queue a whole read per turn of the loop, the one reader
    # takes 64 events per turn, and the default bound (10,000) drops events.
    options = {
        "shards": str(shards),
        "limiter": LocalIdentifyLimiter(window=0.0),
        "max_queued_events": shards * count + 1_000,
    }
    client = _gateway_client(port, options)
    async with client:
        async for event in client:
            if type(event) is Dispatch and meter.tick():
                break
        dropped = client.dropped_events
    return meter.result(dropped=dropped, shards=len(client.shard_ids))


class CountingLoop(asyncio.SelectorEventLoop):
    """An asyncio loop that counts its iterations (one per wake-up from the selector)."""

    wakeups = 0

    def _run_once(self) -> None:
        CountingLoop.wakeups += 1
        super()._run_once()  # type: ignore[misc]


async def run_idle(port: int, seconds: float) -> dict[str, object]:
    import anyio

    from qqproto import HeartbeatAcknowledged

    client = _gateway_client(port)
    beats = 0
    start_beats = 2  # settle: Hello, READY and the first ACKs are not idle time
    window: dict[str, float] = {}
    async with client:
        async for event in client:
            if type(event) is not HeartbeatAcknowledged:
                continue
            beats += 1
            if beats == start_beats:
                window = {"t0": time.perf_counter(), "cpu0": _cpu(), "w0": CountingLoop.wakeups}
            elif beats > start_beats and time.perf_counter() - window["t0"] >= seconds:
                break
        wall = time.perf_counter() - window["t0"]
        cpu = _cpu() - window["cpu0"]
        wakeups = CountingLoop.wakeups - window["w0"]
        await anyio.lowlevel.checkpoint()
    counted = beats - start_beats
    return {
        "wall": wall,
        "cpu": cpu,
        "beats": counted,
        "wakeups": wakeups,
        "wakeups_per_beat": wakeups / counted if counted else 0.0,
        "cpu_per_beat": cpu / counted if counted else 0.0,
        "maxrss": _maxrss(),
    }


# ------------------------------------------------------------------------------ botpy


def _patch_botpy(port: int) -> Any:
    """Point botpy at the bench server, from outside: its files are left untouched."""
    import aiohttp
    import botpy
    from botpy import http as botpy_http
    from botpy import robot as botpy_robot

    base = f"http://127.0.0.1:{port}"
    botpy_http.Route.SCHEME = "http"
    botpy_http.Route.DOMAIN = botpy_http.Route.SANDBOX_DOMAIN = f"127.0.0.1:{port}"

    class _RedirectingSession:
        # The token URL is a literal inside Token.update_access_token, which builds its own
        # aiohttp session: give that module a session that sends the POST to our server.
        def __init__(self) -> None:
            self._session = aiohttp.ClientSession()

        def post(self, url: str, **kwargs: Any) -> Any:
            path = url.split("://", 1)[-1].partition("/")[2]
            return self._session.post(f"{base}/{path}", **kwargs)

        async def close(self) -> None:
            await self._session.close()

    class _AiohttpShim:
        ClientSession = _RedirectingSession
        ClientTimeout = aiohttp.ClientTimeout

    botpy_robot.aiohttp = _AiohttpShim  # type: ignore[assignment]
    return botpy


def _botpy_client(botpy: Any, on_ready: Any, on_message: Any) -> Any:
    class BenchClient(botpy.Client):  # type: ignore[misc,name-defined]
        async def on_ready(self) -> None:
            on_ready()

        async def on_group_at_message_create(self, message: Any) -> None:
            on_message(message)

    intents = botpy.Intents(public_messages=True)
    return BenchClient(intents=intents, bot_log=None, ext_handlers=False, log_level=40)


async def run_botpy(port: int, count: int) -> None:
    botpy = _patch_botpy(port)
    meter = Meter(count)

    def on_message(_message: object) -> None:
        if meter.tick():
            emit(meter.result())
            os._exit(0)

    client = _botpy_client(botpy, lambda: None, on_message)
    async with client:
        await client.start(appid=APP_ID, secret=SECRET)


async def run_botpy_idle(port: int) -> None:
    botpy = _patch_botpy(port)

    def on_ready() -> None:
        print("CONNECTED", flush=True)

    client = _botpy_client(botpy, on_ready, lambda _m: None)
    async with client:
        await client.start(appid=APP_ID, secret=SECRET)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode",
        choices=(
            "bare",
            "websockets",
            "qqproto",
            "shards",
            "botpy",
            "bytes",
            "idle",
            "botpy-idle",
        ),
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=1, help="shards: how many")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle: the window")
    parser.add_argument("--profile", help="qqproto: write cProfile stats to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # noqa: PTH100, PTH120

    if args.mode == "bytes":
        emit(run_bytes(args.port, args.count))
    elif args.mode == "bare":
        import anyio

        emit(anyio.run(run_bare, args.port, args.count))
    elif args.mode == "websockets":
        emit(asyncio.run(run_websockets(args.port, args.count)))
    elif args.mode == "qqproto":
        import anyio

        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            result = anyio.run(run_qqproto, args.port, args.count)
            profiler.disable()
            profiler.dump_stats(args.profile)
        else:
            result = anyio.run(run_qqproto, args.port, args.count)
        emit(result)
    elif args.mode == "shards":
        import anyio

        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            result = anyio.run(run_shards, args.port, args.shards, args.count)
            profiler.disable()
            profiler.dump_stats(args.profile)
        else:
            result = anyio.run(run_shards, args.port, args.shards, args.count)
        emit(result)
    elif args.mode == "idle":
        import anyio

        emit(
            anyio.run(
                run_idle,
                args.port,
                args.seconds,
                backend_options={"loop_factory": CountingLoop},
            )
        )
    elif args.mode == "botpy":
        asyncio.run(run_botpy(args.port, args.count))
    else:
        asyncio.run(run_botpy_idle(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

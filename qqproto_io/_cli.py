# The `qqproto` command line.
#
# `qqproto run` is the project's main job. With QQBOT_APP_ID and QQBOT_CLIENT_SECRET it keeps
# a real gateway session alive. Without them it starts the embedded fake gateway on loopback
# and connects to it over real sockets, so a newcomer sees a live session (Hello, READY,
# beats with latencies, dispatches, a server rotation with its Resume) within seconds.
# `qqproto simulate` plays a whole session on the virtual clock instead, including a dead
# link found by the ACK watchdog, in well under a second. `qqproto fake-gateway` serves the
# fake gateway alone, for other clients to test against.
#
# Every option is a flag and an environment variable (QQBOT_*), flag first.
"""The ``qqproto`` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import anyio

from qqproto import FatalStop, Intents, SessionConfig, __version__
from qqproto_io._http import DEFAULT_API_BASE, DEFAULT_TOKEN_URL, SANDBOX_API_BASE
from qqproto_io._logging import ROOT_LOGGER, EventLogger, configure_logging
from qqproto_io._shards import ShardPlan

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from typing import TextIO

    from qqproto import Event, Health
    from qqproto.testing import SimClient
    from qqproto_io._client import GatewayClient
    from qqproto_io._stores import IdentifyLimiter, SnapshotStore

__all__ = ["EXIT_CONFIG", "EXIT_FATAL", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
"""The session was stopped by the user (SIGINT/SIGTERM) or the demo ended."""
EXIT_USAGE = 2
"""Bad command line or environment."""
EXIT_FATAL = 3
"""The platform stopped the bot: 4914 (delisted, sandbox only) or 4915 (banned)."""
EXIT_CONFIG = 4
"""A fatal close that points at the configuration or a bug: 4001/4002/4010-4014."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value or default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qqproto", description="Keep QQ Bot gateway sessions alive."
    )
    parser.add_argument("--version", action="version", version=f"qqproto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("QQBOT_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per event (env QQBOT_LOG_FORMAT)",
    )
    output.add_argument(
        "--verbose", "-v", action="store_true", help="also show state changes and duplicates"
    )

    run = commands.add_parser(
        "run",
        parents=[output],
        help="keep a gateway session alive (no credentials: against the embedded fake gateway)",
    )
    run.add_argument("--app-id", default=_env("QQBOT_APP_ID"), help="env QQBOT_APP_ID")
    run.add_argument(
        "--client-secret",
        default=_env("QQBOT_CLIENT_SECRET"),
        help="env QQBOT_CLIENT_SECRET (prefer the environment: flags show in `ps`)",
    )
    run.add_argument(
        "--api-base", default=_env("QQBOT_API_BASE"), help="REST base (env QQBOT_API_BASE)"
    )
    run.add_argument(
        "--token-url",
        default=_env("QQBOT_TOKEN_URL", DEFAULT_TOKEN_URL),
        help="token endpoint (env QQBOT_TOKEN_URL)",
    )
    run.add_argument(
        "--sandbox",
        action="store_true",
        default=_env("QQBOT_SANDBOX", "") not in ("", "0", "false"),
        help="use the sandbox REST base (env QQBOT_SANDBOX=1)",
    )
    run.add_argument(
        "--intents",
        default=_env("QQBOT_INTENTS", "DEFAULT"),
        help="names joined by | or , (GUILDS|GROUP_AND_C2C_EVENT) or an int (env QQBOT_INTENTS)",
    )
    run.add_argument(
        "--shard", default=_env("QQBOT_SHARD", "0,1"), help="ID,COUNT (env QQBOT_SHARD)"
    )
    run.add_argument(
        "--shards",
        default=_env("QQBOT_SHARDS"),
        help="the shards this process runs, overriding --shard: auto (the count /gateway/bot "
        "recommends), N, I/N, A-B/N or I,J/N (env QQBOT_SHARDS)",
    )
    run.add_argument(
        "--redis-url",
        default=_env("QQBOT_REDIS_URL"),
        help="share identify permits and session snapshots with other processes through "
        "Redis, e.g. redis://localhost:6379/0 (env QQBOT_REDIS_URL; replaces --snapshot)",
    )
    run.add_argument(
        "--proxy",
        default=_env("QQBOT_PROXY"),
        help="http:// CONNECT proxy (env QQBOT_PROXY; default HTTPS_PROXY/ALL_PROXY)",
    )
    run.add_argument(
        "--snapshot",
        default=_env("QQBOT_SNAPSHOT"),
        help="SQLite file to resume the sessions from after a restart (env QQBOT_SNAPSHOT)",
    )
    run.add_argument(
        "--liveness-budget",
        type=float,
        default=_env("QQBOT_LIVENESS_BUDGET", "300"),  # argparse applies `type` to it
        metavar="SECONDS",
        help="how long a shard may reconnect before the systemd watchdog and /readyz give "
        "up on it (env QQBOT_LIVENESS_BUDGET; default 300)",
    )
    run.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="serve /healthz, /readyz and /metrics on 127.0.0.1:PORT (default: off)",
    )
    run.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="stop after this many seconds (default: run until SIGINT/SIGTERM)",
    )

    simulate = commands.add_parser(
        "simulate",
        parents=[output],
        help="play a session against the fake gateway on a virtual clock (instant)",
    )
    simulate.add_argument("--minutes", type=float, default=16.0, help="virtual minutes")
    simulate.add_argument("--seed", type=int, default=1, help="the simulation seed")

    fake = commands.add_parser("fake-gateway", help="serve the fake gateway on loopback")
    fake.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    fake.add_argument("--hello-interval", type=float, default=41.25, help="seconds")
    fake.add_argument("--rotate-every", type=float, default=None, help="op 7 every N seconds")
    fake.add_argument("--message-every", type=float, default=5.0, help="a message every N s")
    fake.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME",
        help="a Faults switch to turn on (no_ack, silent, ignore_close, ...); repeatable",
    )
    fake.add_argument("--seed", type=int, default=0)
    return parser


class _Console:
    """Where the CLI writes: its events through logging (schema: docs/cli.md), and prose."""

    def __init__(self, out: TextIO, log_format: str, *, verbose: bool) -> None:
        self.out = out
        self.json = log_format == "json"
        self.handler = configure_logging(out, log_format, verbose=verbose)

    def say(self, text: str) -> None:
        """A sentence for a human; JSON output stays pure JSON."""
        if not self.json:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        logging.getLogger(ROOT_LOGGER).removeHandler(self.handler)
        self.handler.close()


# ------------------------------------------------------------------------------- run


def _session_config(args: argparse.Namespace) -> tuple[SessionConfig, ShardPlan | None]:
    """The session settings and shard plan the flags ask for (ValueError: a usage error)."""
    shard_id, _, count = str(args.shard).partition(",")
    config = SessionConfig(
        intents=Intents.parse(str(args.intents)),
        shard=(int(shard_id), int(count or 1)),
        liveness_budget=args.liveness_budget,
    )
    return config, ShardPlan.parse(args.shards) if args.shards else None


def _exit_code(fatal: FatalStop | None) -> int:
    if fatal is None:
        return EXIT_OK
    return EXIT_FATAL if fatal.code in (4914, 4915) else EXIT_CONFIG


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    # Imported here, and the optional parts only when asked for: `--help` stays fast and an
    # idle session stays small (prometheus_client only with --health-port).
    from qqproto_io._client import GatewayClient  # noqa: PLC0415
    from qqproto_io._stall import StallMonitor  # noqa: PLC0415
    from qqproto_io._systemd import SystemdNotifier, run_systemd  # noqa: PLC0415

    config, plan = _session_config(args)
    console = _Console(out, args.log_format, verbose=args.verbose)
    # Under systemd (Type=notify): READY=1, STATUS=, WATCHDOG=1 only while every shard is live.
    notifier = SystemdNotifier.from_env()
    metrics = None
    if args.health_port is not None:
        from qqproto_io._health import Metrics  # noqa: PLC0415

        metrics = Metrics()
    fatal: FatalStop | None = None

    async def session(app_id: str, secret: str, api_base: str, token_url: str) -> None:
        async with contextlib.AsyncExitStack() as stack:
            store, limiter = None, None
            if args.redis_url:
                store, limiter = await _redis_fleet(stack, args.redis_url, app_id)
            client = GatewayClient(
                app_id=app_id,
                client_secret=secret,
                config=config,
                shards=plan,
                api_base=api_base,
                token_url=token_url,
                proxy=args.proxy,
                snapshot_path=args.snapshot,
                store=store,
                limiter=limiter,
                metrics=metrics,
            )
            await shards(client)

    def healths(client: GatewayClient) -> dict[int, Health]:
        now = anyio.current_time()
        return {shard_id: conn.health(now) for shard_id, conn in client.connections.items()}

    async def shards(client: GatewayClient) -> None:
        nonlocal fatal
        async with anyio.create_task_group() as tg, client:
            # A WARNING with the blocking stack when something holds the event loop.
            stall = StallMonitor()
            tg.start_soon(stall.run, name="qqproto stall monitor")
            if metrics is not None:
                from qqproto_io._health import HealthServer  # noqa: PLC0415

                async def serve_health() -> None:
                    async with HealthServer(
                        lambda: healths(client),
                        metrics,
                        stall=stall,
                        port=args.health_port,
                    ):
                        await anyio.sleep_forever()

                tg.start_soon(serve_health, name="qqproto health")
            if notifier is not None:
                tg.start_soon(
                    functools.partial(
                        run_systemd,
                        notifier,
                        lambda: list(healths(client).values()),
                        names=[f"shard {shard_id}" for shard_id in client.shard_ids],
                    ),
                    name="qqproto systemd",
                )

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        console.say("stopping: closing the session (it stays resumable)")
                        if notifier is not None:
                            notifier.stopping()
                        await client.close()
                        return

            async def stop_after(seconds: float) -> None:
                await anyio.sleep(seconds)
                await client.close()

            tg.start_soon(stop_on_signal)
            if args.seconds is not None:
                tg.start_soon(stop_after, args.seconds)
            # The driver logs every event; the application's part here is to notice the end.
            async for event in client:
                if isinstance(event, FatalStop):
                    fatal = event  # one shard stopped for good; the others go on
            tg.cancel_scope.cancel()

    try:
        await _run_session(args, console, session)
    finally:
        console.close()
        if notifier is not None:
            notifier.close()
    if fatal is not None:
        sys.stderr.write(f"qqproto: stopped by the gateway: {fatal.code} {fatal.reason}\n")
        sys.stderr.write(f"qqproto: {fatal.hint}\n")
    return _exit_code(fatal)


async def _run_session(
    args: argparse.Namespace,
    console: _Console,
    session: Callable[[str, str, str, str], Awaitable[None]],
) -> None:
    """Run ``session`` against the real gateway, or the embedded fake without credentials."""
    if args.app_id and args.client_secret:
        api_base = args.api_base or (SANDBOX_API_BASE if args.sandbox else DEFAULT_API_BASE)
        await session(args.app_id, args.client_secret, api_base, args.token_url)
    else:
        console.say(
            "qqproto: no QQBOT_APP_ID/QQBOT_CLIENT_SECRET, so this session runs against the "
            "embedded fake gateway on loopback (a message every 5 s, a rotation every 60 s).\n"
            "Stop with Ctrl-C. Set the two variables to connect to the real QQ gateway.\n"
        )
        from qqproto.testing import FakeGatewayConfig  # noqa: PLC0415
        from qqproto_io._fake_server import FakeGatewayServer  # noqa: PLC0415

        gateway = FakeGatewayConfig(hello_interval_ms=5_000, rotate_every=60.0)
        async with FakeGatewayServer(gateway, message_interval=5.0) as server:
            cfg = server.gateway.config
            await session(cfg.app_id, cfg.client_secret, server.http_base, server.token_url)


async def _redis_fleet(
    stack: contextlib.AsyncExitStack, url: str, app_id: str
) -> tuple[SnapshotStore, IdentifyLimiter]:
    """The snapshot store and identify limiter of a fleet sharing one Redis (asyncio only)."""
    from redis.asyncio import Redis  # noqa: PLC0415 - only with --redis-url

    from qqproto_io._redis import RedisIdentifyLimiter, RedisSnapshotStore  # noqa: PLC0415

    redis = Redis.from_url(url)
    stack.push_async_callback(redis.aclose)
    prefix = f"qqproto:{app_id}"  # one namespace per bot: fleets of two bots never collide
    store = await stack.enter_async_context(RedisSnapshotStore(redis, prefix=prefix))
    return store, RedisIdentifyLimiter(redis, prefix=prefix)


# -------------------------------------------------------------------------- simulate


def run_simulation(minutes: float, seed: int, console: _Console) -> int:
    """Play a session against the fake gateway on a virtual clock and print its events."""
    from qqproto.testing import FakeGatewayConfig, Simulation  # noqa: PLC0415

    # A short heartbeat and rotation so that the interesting moments fit in a few minutes.
    gateway = FakeGatewayConfig(hello_interval_ms=20_000, rotate_every=300.0)
    sim = Simulation(seed=seed, gateway=gateway)
    client = sim.add_client(SessionConfig())
    log_event = EventLogger(0)

    def show(_client: SimClient, now: float, event: Event) -> None:
        log_event(event, t=now)

    client.on_event = show
    console.say(
        "qqproto simulate: a session against the fake gateway on a virtual clock.\n"
        "Script: a message every 15 s, a server rotation (op 7) every 5 min, and at "
        "minute 12 the link turns half-open (bytes vanish, no FIN).\n"
    )
    client.start()
    sim.messages_every(15.0, start=10.0)
    sim.at(720.0, lambda: sim.half_open(client))
    sim.run_until(minutes * 60.0)
    ids = [d.event_id for d in client.dispatches]
    once = "each exactly once" if len(ids) == len(set(ids)) else "SOME TWICE"
    console.say(
        f"\n{minutes:g} virtual minutes: the gateway sent {sim.gateway.dispatched} messages; "
        f"{len(ids)} were delivered, {once} (a missing one was still in flight at the end)."
    )
    return EXIT_OK


# ----------------------------------------------------------------------- fake-gateway


async def _serve_fake(args: argparse.Namespace, out: TextIO) -> int:
    from qqproto.testing import FakeGatewayConfig  # noqa: PLC0415
    from qqproto_io._fake_server import FakeGatewayServer  # noqa: PLC0415

    config = FakeGatewayConfig(
        hello_interval_ms=round(args.hello_interval * 1000), rotate_every=args.rotate_every
    )
    async with FakeGatewayServer(
        config, seed=args.seed, port=args.port, message_interval=args.message_every
    ) as server:
        for name in args.fault:
            if not hasattr(server.gateway.faults, name):
                sys.stderr.write(f"qqproto: unknown fault {name!r}\n")
                return EXIT_USAGE
            setattr(server.gateway.faults, name, True)
        out.write(
            f"fake QQ gateway on loopback\n"
            f"  QQBOT_API_BASE={server.http_base}\n"
            f"  QQBOT_TOKEN_URL={server.token_url}\n"
            f"  QQBOT_APP_ID={config.app_id}\n"
            f"  QQBOT_CLIENT_SECRET={config.client_secret}   (a fake; not a secret)\n"
            f"  gateway: {server.ws_url}\n"
        )
        out.flush()
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    return EXIT_OK


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qqproto`` console script."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        if args.command == "simulate":
            console = _Console(out, args.log_format, verbose=args.verbose)
            try:
                return run_simulation(args.minutes, args.seed, console)
            finally:
                console.close()
        if args.command == "fake-gateway":
            return anyio.run(_serve_fake, args, out)
        try:
            _session_config(args)
        except ValueError as exc:
            sys.stderr.write(f"qqproto: {exc}\n")
            return EXIT_USAGE
        return anyio.run(_run, args, out)
    except BrokenPipeError:
        # `qqproto run | head`: the reader left. Silence the flush at exit, too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

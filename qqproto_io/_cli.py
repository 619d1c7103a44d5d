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
import importlib
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import anyio

from qqproto import SessionConfig, __version__
from qqproto_io._http import DEFAULT_API_BASE, DEFAULT_TOKEN_URL, SANDBOX_API_BASE
from qqproto_io._logging import ROOT_LOGGER, EventLogger, configure_logging
from qqproto_io._options import OPTIONS, UsageError, add_options, resolve

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from typing import TextIO

    from qqproto import Event, FatalStop
    from qqproto.testing import SimClient
    from qqproto_io._client import FatalStopError, GatewayClient
    from qqproto_io._fake_server import FakeGatewayServer
    from qqproto_io._shards import ShardPlan
    from qqproto_io._stores import IdentifyLimiter, SnapshotStore, SqliteSnapshotStore
    from qqproto_io._webhook import DeliveryClaims
    from qqproto_io._webhook_front import WebhookFront

__all__ = ["EXIT_CONFIG", "EXIT_FATAL", "EXIT_OK", "EXIT_USAGE", "main"]

_E = TypeVar("_E", bound=BaseException)

EXIT_OK = 0
"""The session was stopped by the user (SIGINT/SIGTERM) or the demo ended."""
EXIT_USAGE = 2
"""Bad command line or environment."""
EXIT_FATAL = 3
"""The platform stopped the bot: 4914 (delisted, sandbox only) or 4915 (banned)."""
EXIT_CONFIG = 4
"""A fatal close that points at the configuration or a bug: 4001/4002/4010-4014."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr and exit code 2, never the usage."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"qqproto: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qqproto", description="Keep QQ Bot gateway sessions alive.")
    parser.add_argument("--version", action="version", version=f"qqproto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {
        "run": "keep the bot's gateway sessions alive (needs QQBOT_APP_ID and "
        "QQBOT_CLIENT_SECRET, or --fake)",
        "demo": "a live session against the embedded fake gateway on loopback (run --fake)",
        "simulate": "play a session against the fake gateway on a virtual clock (instant)",
        "fake-gateway": "serve the fake gateway on loopback for other clients",
    }
    for name, options in OPTIONS.items():
        sub = commands.add_parser(name, help=helps[name], description=helps[name])
        add_options(sub, options)
        if name == "fake-gateway":
            sub.add_argument(
                "--fault",
                action="append",
                default=[],
                metavar="NAME",
                help="a Faults switch to turn on (no_ack, silent, ignore_close, ...); repeatable",
            )
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, every option checked (UsageError: the one line to print)."""
    args = _parser().parse_args(argv)
    resolve(args, OPTIONS[args.command])
    if args.command == "demo":
        args.command, args.fake = "run", True
    if args.command == "run" and not args.fake:
        missing = [
            name
            for name, value in (
                ("QQBOT_APP_ID (or --app-id)", args.app_id),
                ("QQBOT_CLIENT_SECRET (or --client-secret)", args.client_secret),
            )
            if not value
        ]
        if len(missing) == 2:
            raise UsageError(
                "no credentials: set QQBOT_APP_ID and QQBOT_CLIENT_SECRET for the bot's "
                "gateway, or use --fake (qqproto demo) for the embedded fake gateway"
            )
        if missing:
            raise UsageError(f"{missing[0]} is missing: the app id and the secret go together")
    return args


class _Console:
    """Where the CLI writes: its events through logging (schema: docs/cli.md), and prose."""

    def __init__(self, out: TextIO, log_format: str, *, verbose: bool, life_signs: bool) -> None:
        self.out = out
        self.json = log_format == "json"
        self.handler = configure_logging(out, log_format, verbose=verbose, life_signs=life_signs)

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
    """The session settings and shard plan the (checked) options ask for."""
    config = SessionConfig(
        intents=args.intents, shard=args.shard, liveness_budget=args.liveness_budget
    )
    return config, args.shards


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    # Imported here, and the optional parts only when asked for: `--help` stays fast and an
    # idle session stays small (prometheus_client only with --health-port).
    from qqproto_io._client import FatalStopError, GatewayClient  # noqa: PLC0415
    from qqproto_io._supervise import supervise  # noqa: PLC0415

    config, plan = _session_config(args)
    _check_proxy_environment(args.proxy)
    register = _load_app(args.app) if args.app else None
    # Against the fake, the life signs (dispatches, ACKs) are what there is to see.
    console = _Console(out, args.log_format, verbose=args.verbose, life_signs=args.fake)
    fatal: FatalStopError | None = None

    async def supervised(client: GatewayClient) -> None:
        await supervise(client, health_port=args.health_port, stop_after=args.seconds)

    async def session(
        app_id: str, secret: str, api_base: str, token_url: str, fake: FakeGatewayServer | None
    ) -> None:
        nonlocal fatal
        async with contextlib.AsyncExitStack() as stack:
            # Everything an option names is opened first, so that a bad one is one line
            # naming it, before any connection.
            store, limiter, claims = None, None, None
            if args.redis_url:
                store, limiter, claims = await _redis_fleet(stack, args.redis_url, app_id)
            elif args.snapshot:
                store = stack.enter_context(_open_snapshot_store(args.snapshot))
            client = GatewayClient(
                app_id=app_id,
                client_secret=secret,
                config=config,
                shards=plan,
                api_base=api_base,
                token_url=token_url,
                proxy=args.proxy,
                store=store,
                limiter=limiter,
                transport="webhook" if args.webhook else "websocket",
                webhook=args.webhook or "127.0.0.1:8080",
                webhook_path=args.webhook_path,
                webhook_claims=claims,
            )
            if register is not None:
                register(client)
            try:
                if fake is not None and client.webhook is not None:
                    await _with_feed(fake, client.webhook, supervised(client))
                else:
                    await supervised(client)
            except FatalStopError as exc:
                fatal = exc
            except OSError as exc:
                if args.health_port is None or client.drivers:
                    raise  # not the health port's: the client had started
                raise UsageError(
                    f"--health-port {args.health_port}: cannot listen ({exc.strerror})"
                ) from None

    try:
        await _run_session(args, console, session)
    finally:
        console.close()
    if fatal is not None:
        code = "" if fatal.code is None else f" {fatal.code}"
        sys.stderr.write(f"qqproto: stopped by the gateway:{code} {fatal.reason}\n")
        sys.stderr.write(f"qqproto: {fatal.hint}\n")
    return _exit_code(fatal)


def _exit_code(fatal: FatalStop | FatalStopError | None) -> int:
    """The documented exit code of a run that ended with ``fatal`` (``None``: stopped)."""
    if fatal is None:
        return EXIT_OK
    return EXIT_FATAL if fatal.code in (4914, 4915) else EXIT_CONFIG


def _load_app(spec: str) -> Callable[[GatewayClient], object]:
    """``module:function``: the function that registers a bot's handlers on the client."""
    module_name, _, attr = spec.partition(":")
    # As uvicorn and gunicorn do: the bot in the current directory is found without
    # PYTHONPATH (a console script's sys.path starts with its own bin directory instead).
    here = str(Path.cwd())
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises, one line
        raise UsageError(f"--app {spec}: cannot import {module_name} ({exc!r})") from None
    register = getattr(module, attr, None)
    if not callable(register):
        raise UsageError(f"--app {spec}: {module_name} has no function {attr!r}")
    return cast("Callable[[GatewayClient], object]", register)


def _check_proxy_environment(proxy: str | None) -> None:
    """A proxy from HTTPS_PROXY/ALL_PROXY is an option too: a bad one is a usage error."""
    if proxy is not None:
        return
    from qqproto_io._proxy import PROXY_VARIABLES, proxy_from_env  # noqa: PLC0415

    try:
        proxy_from_env()
    except ValueError as exc:
        name = next((n for n in PROXY_VARIABLES if os.environ.get(n)), "the proxy variable")
        raise UsageError(f"{name}={os.environ.get(name, '')}: {exc}") from None


def _open_snapshot_store(path: str) -> SqliteSnapshotStore:
    from qqproto_io._stores import SqliteSnapshotStore  # noqa: PLC0415

    try:
        return SqliteSnapshotStore(path)
    except (OSError, sqlite3.Error) as exc:
        raise UsageError(f"--snapshot {path}: cannot open it ({exc})") from None


async def _run_session(
    args: argparse.Namespace,
    console: _Console,
    session: Callable[[str, str, str, str, FakeGatewayServer | None], Awaitable[None]],
) -> None:
    """Run ``session`` against the real gateway, or the embedded fake with ``--fake``."""
    if not args.fake:
        api_base = args.api_base or (SANDBOX_API_BASE if args.sandbox else DEFAULT_API_BASE)
        await session(
            args.app_id, args.client_secret, api_base, args.token_url or DEFAULT_TOKEN_URL, None
        )
        return
    what = (
        "signed webhook callbacks, a message every 5 s"
        if args.webhook
        else "a message every 5 s, a rotation every 60 s"
    )
    console.say(
        "qqproto: --fake: this session runs against the embedded fake gateway on loopback "
        f"({what}), not QQ.\n"
        "Stop with Ctrl-C. Without --fake, with QQBOT_APP_ID and QQBOT_CLIENT_SECRET set, "
        "it connects to the real QQ gateway.\n"
    )
    from qqproto.testing import FakeGatewayConfig  # noqa: PLC0415
    from qqproto_io._fake_server import FakeGatewayServer  # noqa: PLC0415

    gateway = FakeGatewayConfig(hello_interval_ms=5_000, rotate_every=60.0)
    async with FakeGatewayServer(gateway, message_interval=5.0) as server:
        console.say(
            f'qqproto: be the user (no token): curl -d \'{{"kind": "c2c", "content": '
            f"\"ping\"}}' {server.control_url}/messages; the bot's REST calls: "
            f"curl {server.control_url}/rest\n"
        )
        cfg = server.gateway.config
        await session(cfg.app_id, cfg.client_secret, server.http_base, server.token_url, server)


async def _redis_fleet(
    stack: contextlib.AsyncExitStack, url: str, app_id: str
) -> tuple[SnapshotStore, IdentifyLimiter, DeliveryClaims]:
    """The snapshot store, identify limiter and webhook delivery claims of a fleet sharing
    one Redis (asyncio only)."""
    from redis.asyncio import Redis  # noqa: PLC0415 - only with --redis-url
    from redis.exceptions import RedisError  # noqa: PLC0415

    from qqproto_io._redis import RedisIdentifyLimiter, RedisSnapshotStore  # noqa: PLC0415
    from qqproto_io._webhook_redis import RedisDeliveryClaims  # noqa: PLC0415

    redis = Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)
    stack.push_async_callback(redis.aclose)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        raise UsageError(f"--redis-url {_without_password(url)}: no answer ({exc})") from None
    prefix = f"qqproto:{app_id}"  # one namespace per bot: fleets of two bots never collide
    store = await stack.enter_async_context(RedisSnapshotStore(redis, prefix=prefix))
    claims = RedisDeliveryClaims(redis, prefix=prefix)
    return store, RedisIdentifyLimiter(redis, prefix=prefix), claims


async def _with_feed(server: FakeGatewayServer, front: WebhookFront, main: Awaitable[None]) -> None:
    """Await ``main`` while the fake platform feeds the webhook endpoint; ``main``'s error is
    raised as itself, not in a group."""
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_feed_webhook, server, front)
        try:
            await main
        except Exception as exc:  # noqa: BLE001 - raised again below, outside the group
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error


async def _feed_webhook(server: FakeGatewayServer, front: WebhookFront) -> None:
    """--fake with --webhook: the fake platform validates the endpoint (op 13), then posts
    its messages to it as signed callbacks."""
    from qqproto.testing import WebhookSigner  # noqa: PLC0415
    from qqproto_io._fake_webhook import FakeWebhookPoster  # noqa: PLC0415

    await front.listening.wait()
    cfg = server.gateway.config
    signer = WebhookSigner(app_id=cfg.app_id, secret=cfg.client_secret)
    async with FakeWebhookPoster(front.url + (front.inbox.receiver.path or "/"), signer) as poster:
        await poster.feed(server.gateway, validate=True)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


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
    # --message-every 0 (or --no-messages): no numbered messages, the fake is driven by hand.
    every = None if args.no_messages or not args.message_every else args.message_every
    fake = FakeGatewayServer(config, seed=args.seed, port=args.port, message_interval=every)
    for name in args.fault:  # checked before anything is printed: one line, exit 2
        if not hasattr(fake.gateway.faults, name):
            sys.stderr.write(f"qqproto: unknown fault {name!r}\n")
            return EXIT_USAGE
        if type(getattr(fake.gateway.faults, name)) is not bool:
            sys.stderr.write(f"qqproto: --fault {name}: not an on/off switch (see: fault)\n")
            return EXIT_USAGE
        setattr(fake.gateway.faults, name, True)
    try:
        await fake.__aenter__()
    except OSError as exc:
        raise UsageError(f"--port {args.port}: cannot listen ({exc.strerror})") from None
    # Stdout holds only the lines a shell takes. What the fake sees (every REST call: method,
    # path, status, a refusal's code, a send's msg_type/msg_id/msg_seq; never a token or
    # message content) and the answers to the commands go to stderr.
    err = sys.stderr
    handler = configure_logging(err, "text")

    def answer(text: str) -> None:
        err.write(text + "\n")
        err.flush()

    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(fake)
            server = fake
            # Lines a shell takes as they are: paste them, or source a file they were
            # redirected to (a pipe into `eval "$(...)"` waits for the fake's end).
            out.write(
                f"export QQBOT_API_BASE={server.http_base}\n"
                f"export QQBOT_TOKEN_URL={server.token_url}\n"
                f"export QQBOT_APP_ID={config.app_id}\n"
                f"export QQBOT_CLIENT_SECRET={config.client_secret}\n"
                f"# the fake QQ gateway on loopback (the secret above is a fake); its WebSocket "
                f"is {server.ws_url}\n"
                f"# drive it (no token): POST {server.control_url}/messages "
                '{"kind": "c2c", "content": "hi"}, or type commands here (help)\n'
            )
            out.flush()
            commands: int | None = None
            if not args.no_stdin:
                try:
                    commands = sys.stdin.fileno()
                    # A background job that reads its terminal is stopped (SIGTTIN): not then.
                    if os.isatty(commands) and os.tcgetpgrp(commands) != os.getpgrp():
                        commands = None
                except (AttributeError, OSError, ValueError):
                    commands = None  # no usable stdin (closed, or taken by a test harness)
            async with anyio.create_task_group() as tg:
                if commands is not None:
                    tg.start_soon(server.read_commands, commands, answer)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                tg.cancel_scope.cancel()
    finally:
        logging.getLogger(ROOT_LOGGER).removeHandler(handler)
        handler.close()
    return EXIT_OK


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qqproto`` console script.

    Returns the exit code (docs/cli.md): a mistake in the options, or a resource an option
    names that cannot be used (a port in use, a Redis that does not answer), is one line on
    stderr and :data:`EXIT_USAGE`; Ctrl-C at any moment is a clean stop.
    """
    out = sys.stdout
    try:
        args = _parse(argv)
        if args.command == "simulate":
            console = _Console(out, args.log_format, verbose=args.verbose, life_signs=True)
            try:
                return run_simulation(args.minutes, args.seed, console)
            finally:
                console.close()
        if args.command == "fake-gateway":
            return anyio.run(_serve_fake, args, out)
        return anyio.run(_run, args, out)
    except BrokenPipeError:
        # `qqproto run | head`: the reader left. Silence the flush at exit, too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except BaseException as exc:
        usage = _find(exc, UsageError)
        if usage is not None:
            sys.stderr.write(f"qqproto: {usage}\n")
            return EXIT_USAGE
        if _find(exc, KeyboardInterrupt) is not None:
            sys.stderr.write("qqproto: interrupted\n")
            return EXIT_OK
        raise


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """``exc`` if it is a ``kind``, or the first ``kind`` inside (nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())

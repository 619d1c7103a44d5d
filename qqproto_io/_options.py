# Every option of the command line, declared once: its flag, its environment variable, its
# default and the function that checks and converts its text.
#
# A flag and its QQBOT_* variable are the same option: argparse only collects the texts
# (every default is None, so we can tell "given" from "not given"), and `resolve` takes the
# flag if given, else the variable, else the default, and converts it with the one
# validator. A bad value, whichever way it came, is one `UsageError` naming where it came
# from and what was wrong ("--seconds -1: ...", "QQBOT_LOG_FORMAT=xml: ..."), never a
# traceback. Secret values are never repeated in a message.
"""The CLI's options: flag, environment variable, default and validator, in one table."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from qqproto import Intents
from qqproto_io._http import DEFAULT_TOKEN_URL
from qqproto_io._network import parse_address
from qqproto_io._shards import ShardPlan

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping

__all__ = ["OPTIONS", "Option", "UsageError", "add_options", "resolve"]


class UsageError(Exception):
    """A bad option value or an unusable resource an option names; one line, exit code 2."""


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a command.

    Attributes:
        dest: the attribute on the parsed namespace.
        flags: the command-line spellings.
        env: the environment variable that gives it when the flag is absent.
        convert: checks the text and returns the value; raises ValueError(why).
        default: the text used when neither is given (``None``: the value is ``None``).
        help: the ``--help`` text (the variable is appended).
        switch: a flag without a value (``--sandbox``); its variable is a boolean.
        secret: never repeat the value in an error.
        metavar: the value's name in ``--help``.
    """

    dest: str
    flags: tuple[str, ...]
    env: str | None
    convert: Callable[[str], object]
    default: str | None
    help: str
    switch: bool = False
    secret: bool = False
    metavar: str | None = None


# ------------------------------------------------------------------------ validators


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a number of seconds above 0")
    return number


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number above 0") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a number above 0")
    return number


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("must be an integer") from None


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("must be a TCP port number (1-65535)") from None
    if not 1 <= number <= 65535:
        raise ValueError("must be a TCP port number (1-65535)")
    return number


def _port_or_any(value: str) -> int:
    return 0 if value.strip() == "0" else _port(value)


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be {' or '.join(choices)}")
        return value

    return convert


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def boolean(value: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); raises ValueError otherwise."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be 1, true, yes or on, or 0, false, no or off")


def _shard(value: str) -> tuple[int, int]:
    shard_id, comma, count = value.partition(",")
    try:
        pair = (int(shard_id), int(count) if comma else 1)
    except ValueError:
        raise ValueError("must be ID,COUNT, e.g. 0,1") from None
    if not 0 <= pair[0] < pair[1]:
        raise ValueError("must be ID,COUNT with 0 <= ID < COUNT")
    return pair


def _intents(value: str) -> int:
    return Intents.parse(value)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


def _redis_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


def _proxy(value: str) -> str:
    from qqproto_io._proxy import ProxyConfig  # noqa: PLC0415 - the proxy code is its judge

    if "://" not in value:
        raise ValueError("must be a URL such as http://127.0.0.1:7890 or socks5://127.0.0.1:7890")
    ProxyConfig.from_url(value)
    return value


def _app(value: str) -> str:
    module, colon, attr = value.partition(":")
    if not colon or not module or not attr.isidentifier():
        raise ValueError("must be MODULE:FUNCTION, e.g. mybot:setup")
    return value


def _address(value: str) -> str:
    parse_address(value)  # raises ValueError with the reason
    return value


def _url_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or c in "?#" for c in value):
        raise ValueError("expected a path that starts with /, without spaces, ? or #")
    return value


def _path(value: str) -> str:
    if Path(value).is_dir():
        raise ValueError("is a directory; name a file in it")
    return value


# --------------------------------------------------------------------------- the table

_OUTPUT = (
    Option(
        "log_format",
        ("--log-format",),
        "QQBOT_LOG_FORMAT",
        _choice("text", "json"),
        "text",
        "text lines, or one JSON object per event",
        metavar="text|json",
    ),
    Option(
        "verbose",
        ("--verbose", "-v"),
        None,
        boolean,
        "0",
        "also show DEBUG records: every dispatch, ACK and state change",
        switch=True,
    ),
)

_RUN = (
    *_OUTPUT,
    Option(
        "fake",
        ("--fake",),
        None,
        boolean,
        "0",
        "connect to the embedded fake gateway on loopback instead of QQ (credentials ignored)",
        switch=True,
    ),
    Option("app_id", ("--app-id",), "QQBOT_APP_ID", _text, None, "the bot's app id"),
    Option(
        "client_secret",
        ("--client-secret",),
        "QQBOT_CLIENT_SECRET",
        _text,
        None,
        "the bot's client secret (prefer the environment: flags show in `ps`)",
        secret=True,
    ),
    Option(
        "api_base",
        ("--api-base",),
        "QQBOT_API_BASE",
        _http_url,
        None,
        "REST base URL (default: the production one, https://api.sgroup.qq.com, or with "
        "--sandbox https://sandbox.api.sgroup.qq.com)",
        metavar="URL",
    ),
    Option(
        "token_url",
        ("--token-url",),
        "QQBOT_TOKEN_URL",
        _http_url,
        DEFAULT_TOKEN_URL,
        "the token endpoint",
        metavar="URL",
    ),
    Option(
        "sandbox",
        ("--sandbox",),
        "QQBOT_SANDBOX",
        boolean,
        "0",
        "use the sandbox REST base",
        switch=True,
    ),
    Option(
        "intents",
        ("--intents",),
        "QQBOT_INTENTS",
        _intents,
        "DEFAULT",
        "names joined by | or , (GUILDS|GROUP_AND_C2C_EVENT) or an int",
    ),
    Option("shard", ("--shard",), "QQBOT_SHARD", _shard, "0,1", "ID,COUNT", metavar="ID,COUNT"),
    Option(
        "shards",
        ("--shards",),
        "QQBOT_SHARDS",
        ShardPlan.parse,
        None,
        "the shards this process runs, overriding --shard: auto (the count /gateway/bot "
        "recommends), N, I/N, A-B/N or I,J/N",
    ),
    Option(
        "redis_url",
        ("--redis-url",),
        "QQBOT_REDIS_URL",
        _redis_url,
        None,
        "share identify permits and session snapshots with other processes through Redis, "
        "e.g. redis://localhost:6379/0 (replaces --snapshot)",
    ),
    Option(
        "proxy",
        ("--proxy",),
        "QQBOT_PROXY",
        _proxy,
        None,
        "proxy for the gateway and the REST calls: http://host:port (CONNECT) or "
        "socks5://host:port (socks5h:// to resolve names at the proxy); default: "
        "HTTPS_PROXY / ALL_PROXY",
        metavar="URL",
    ),
    Option(
        "snapshot",
        ("--snapshot",),
        "QQBOT_SNAPSHOT",
        _path,
        None,
        "SQLite file to resume the sessions from after a restart",
        metavar="FILE",
    ),
    Option(
        "liveness_budget",
        ("--liveness-budget",),
        "QQBOT_LIVENESS_BUDGET",
        _positive_seconds,
        "300",
        "how long a shard may reconnect before the systemd watchdog and /readyz give up on it",
        metavar="SECONDS",
    ),
    Option(
        "health_port",
        ("--health-port",),
        "QQBOT_HEALTH_PORT",
        _port,
        None,
        "serve /healthz, /readyz and /metrics on 127.0.0.1:PORT (default: off)",
        metavar="PORT",
    ),
    Option(
        "seconds",
        ("--seconds",),
        None,
        _positive_seconds,
        None,
        "stop after this many seconds (default: run until SIGINT/SIGTERM)",
    ),
    Option(
        "webhook",
        ("--webhook",),
        "QQBOT_WEBHOOK",
        _address,
        None,
        "receive events as the platform's signed HTTP callbacks on HOST:PORT (behind your "
        "TLS proxy) instead of the WebSocket gateway (default: the gateway)",
        metavar="HOST:PORT",
    ),
    Option(
        "webhook_path",
        ("--webhook-path",),
        "QQBOT_WEBHOOK_PATH",
        _url_path,
        None,
        "the callback path the webhook endpoint answers, e.g. /qqbot (default: any path)",
        metavar="PATH",
    ),
    Option(
        "app",
        ("--app",),
        "QQBOT_APP",
        _app,
        None,
        "your bot: MODULE:FUNCTION, a function called with the GatewayClient to register "
        "its handlers (client.on(...)) before the sessions start",
        metavar="MODULE:FUNCTION",
    ),
)

_SIMULATE = (
    *_OUTPUT,
    Option("minutes", ("--minutes",), None, _positive, "16", "virtual minutes"),
    Option("seed", ("--seed",), None, _int, "1", "the simulation seed"),
)

_FAKE_GATEWAY = (
    Option("port", ("--port",), None, _port_or_any, "0", "TCP port (default: any free one)"),
    Option("hello_interval", ("--hello-interval",), None, _positive_seconds, "41.25", "seconds"),
    Option("rotate_every", ("--rotate-every",), None, _positive_seconds, None, "op 7 every N s"),
    Option(
        "message_every",
        ("--message-every",),
        None,
        lambda value: 0.0 if value.strip() in {"0", "0.0"} else _positive_seconds(value),
        "5",
        "a numbered C2C message ('hello 1', 'hello 2', ...) every SECONDS; 0 for none "
        "(drive the fake by hand)",
        metavar="SECONDS",
    ),
    Option(
        "no_messages",
        ("--no-messages",),
        None,
        boolean,
        "0",
        "no numbered C2C messages at all (the same as --message-every 0)",
        switch=True,
    ),
    Option(
        "no_stdin",
        ("--no-stdin",),
        None,
        boolean,
        "0",
        "do not read commands on stdin. Otherwise each line is one: c2c TEXT, group TEXT, "
        "guild TEXT or direct TEXT (a user's message to the bot), close CODE [REASON], "
        "rotate (op 7), drop (no close frame), fault NAME [on|off], rest (the REST calls "
        "received), help. The same over HTTP on the same port, without the token: "
        'POST /_fake/messages {"kind": "c2c", "content": "hi"}, POST /_fake/close '
        '{"code": 4009}, POST /_fake/reconnect, POST /_fake/drop, GET /_fake/rest, '
        "GET or POST /_fake/faults. Every REST call the fake receives is printed on stderr",
        switch=True,
    ),
    Option("seed", ("--seed",), None, _int, "0", "the fake's seed"),
)

OPTIONS: Mapping[str, tuple[Option, ...]] = {
    "run": _RUN,
    "demo": _RUN,
    "simulate": _SIMULATE,
    "fake-gateway": _FAKE_GATEWAY,
}
"""The options of each command."""


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """Declare ``options`` on ``parser``: texts only, no defaults (see :func:`resolve`)."""
    for opt in options:
        help_text = opt.help + (f" (env {opt.env})" if opt.env else "")
        if opt.default is not None and not opt.switch:
            help_text += f"; default {opt.default}"
        if opt.switch:
            action = parser.add_argument(
                *opt.flags, dest=opt.dest, action="store_const", const="1", help=help_text
            )
        else:
            action = parser.add_argument(
                *opt.flags, dest=opt.dest, help=help_text, metavar=opt.metavar
            )
        # The configuration reference (docs_hooks/generate.py) renders from the Option.
        action.option = opt  # type: ignore[attr-defined]


def resolve(
    args: argparse.Namespace,
    options: tuple[Option, ...],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Replace each option's text on ``args`` by its checked value: flag, else variable,
    else default.

    Raises:
        UsageError: a bad value; the message names the flag or variable it came from.
    """
    env = os.environ if environ is None else environ
    for opt in options:
        text = getattr(args, opt.dest, None)
        origin = opt.flags[0]
        if text is None and opt.env is not None and env.get(opt.env):
            text, origin = env[opt.env], opt.env
        if text is None:
            text, origin = opt.default, ""
        if text is None:
            setattr(args, opt.dest, None)
            continue
        try:
            setattr(args, opt.dest, opt.convert(text))
        except ValueError as exc:
            shown = "***" if opt.secret else text
            where = f"{origin}={shown}" if origin.startswith("QQBOT_") else f"{origin} {shown}"
            raise UsageError(f"{where}: {exc}") from None

# What the driver tells the log, and how the CLI writes it.
#
# Every core event is logged by the driver that produced it, on the logger of its shard
# (`qqproto_io.shard.<id>`), at the level `describe_event` gives it: connected, ready,
# resumed with the replay count, zombie with the ACK age, reconnect in N s because X and
# fatal with its hint at INFO and above; dispatches, heartbeat ACKs, state changes and
# duplicates at DEBUG. The structured fields ride on the record (`record.qqproto`), so any
# handler can use them, and the CLI's JSON formatter writes them as one object per line (the
# schema in docs/cli.md). Records that are not events (a stall warning, the health server's
# address) come out of the same formatter with `event: "log"` and their message.
#
# Nothing here can leak a secret: events carry no token, session ids are masked by
# `describe_event`, and the formatters never print a record's arguments other than through
# its own message.
"""Per-shard event logging and the CLI's text and JSON log formats."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Final, TextIO

from qqproto import Dispatch, StateChanged
from qqproto_io._describe import describe_event

if TYPE_CHECKING:
    from qqproto import Event

__all__ = ["EventLogger", "JsonFormatter", "TextFormatter", "configure_logging", "shard_logger"]

ROOT_LOGGER: Final = "qqproto_io"
# The life signs a newcomer wants to see on the console, although they are DEBUG-level.
ALWAYS_SHOWN: Final = frozenset({"dispatch", "heartbeat_ack"})


def shard_logger(shard_id: int) -> logging.Logger:
    """The logger of one shard: ``qqproto_io.shard.<id>``."""
    return logging.getLogger(f"{ROOT_LOGGER}.shard.{shard_id}")


class EventLogger:
    """Logs the core events of one shard, with their structured fields.

    Args:
        shard_id: the shard, also the logger's name (:func:`shard_logger`).
        logger: another logger to use instead.

    Each record carries ``record.qqproto``: a dict with ``event``, ``shard``, ``state`` (the
    session state after the event) and the event's own fields (docs/cli.md).
    """

    __slots__ = ("logger", "shard_id", "state")

    def __init__(self, shard_id: int, logger: logging.Logger | None = None) -> None:
        self.shard_id = shard_id
        self.logger = logger or shard_logger(shard_id)
        self.state = "IDLE"

    def __call__(self, event: Event, *, t: float | None = None) -> None:
        """Log ``event``; ``t`` overrides the record's time in the JSON format (virtual)."""
        if type(event) is Dispatch and not self.logger.isEnabledFor(logging.DEBUG):
            return  # the hot path: no description built for a record nobody wants
        if type(event) is StateChanged:
            self.state = event.new.name
        desc = describe_event(event)
        if not self.logger.isEnabledFor(desc.level):
            return
        fields: dict[str, object] = {"event": desc.name, "shard": self.shard_id}
        fields["state"] = self.state
        fields.update(desc.fields)
        if t is not None:
            fields["t"] = t
        self.logger.log(desc.level, "%s", desc.message, extra={"qqproto": fields})


class _Formatter(logging.Formatter):
    """Times are seconds since the formatter was made, or the event's own ``t``."""

    def __init__(self) -> None:
        super().__init__()
        # A LogRecord has only a wall-clock stamp, which jumps when the clock is set (NTP,
        # a suspend); records are formatted as they are made, so the monotonic clock read
        # here is the record's time to well under a millisecond, and never runs backwards.
        self.start = time.monotonic()

    def _t(self, fields: dict[str, object]) -> float:
        t = fields.get("t")
        return float(t) if isinstance(t, int | float) else time.monotonic() - self.start


class TextFormatter(_Formatter):
    """``[   12.345s] INFO    shard 0: ready: new session 3fa85f64…`` (seconds since start)."""

    def format(self, record: logging.LogRecord) -> str:
        """One line (plus the traceback, if any)."""
        fields: dict[str, object] = getattr(record, "qqproto", {})
        shard = f"shard {fields['shard']}: " if "shard" in fields else ""
        line = f"[{self._t(fields):9.3f}s] {record.levelname:<7} {shard}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(_Formatter):
    """One JSON object per record: ``t``, ``event``, ``level``, ``shard``, ``state``, fields.

    Records that are not core events have ``event: "log"``, ``logger`` and ``message``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (schema: docs/cli.md)."""
        fields: dict[str, object] = getattr(record, "qqproto", {})
        out: dict[str, object] = {"t": round(self._t(fields), 3)}
        if fields:
            out["event"] = fields["event"]
            out["level"] = record.levelname
            out.update((k, v) for k, v in fields.items() if k not in ("t", "event"))
        else:
            out.update(event="log", level=record.levelname, logger=record.name)
            out["message"] = record.getMessage()
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _ConsoleFilter(logging.Filter):
    """INFO and above; DEBUG too when verbose, or only the life signs when asked for."""

    def __init__(self, *, verbose: bool, life_signs: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.life_signs = life_signs

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.INFO:
            return True
        if not self.life_signs:
            return False
        fields = getattr(record, "qqproto", None)
        return fields is not None and fields.get("event") in ALWAYS_SHOWN


class _ConsoleHandler(logging.StreamHandler[TextIO]):
    """A stream handler that goes quiet, instead of printing tracebacks, once its reader left."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            # `qqproto run | head`: nobody reads any more. Silence this stream for good (the
            # interpreter's own flush at exit included) rather than fail on every record.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            self.setLevel(logging.CRITICAL + 1)
            return
        super().handleError(record)


def configure_logging(
    out: TextIO, log_format: str, *, verbose: bool = False, life_signs: bool = False
) -> logging.Handler:
    """Send ``qqproto_io`` records to ``out`` in ``text`` or ``json`` format; return the handler.

    The CLI's setup: the ``qqproto_io`` logger at DEBUG, with a filter that passes INFO and
    above, plus dispatches and heartbeat ACKs with ``life_signs`` (a demo), plus everything
    with ``verbose``. Other loggers are left alone. Call the returned handler's ``close()``
    and remove it to undo.
    """
    handler = _ConsoleHandler(out)
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    handler.setFormatter(formatter())
    handler.addFilter(_ConsoleFilter(verbose=verbose, life_signs=life_signs))
    root = logging.getLogger(ROOT_LOGGER)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return handler

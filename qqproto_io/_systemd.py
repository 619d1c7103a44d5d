# systemd integration without libsystemd: sd_notify(3) over a datagram socket, and a task that
# feeds systemd's watchdog only while the process is demonstrably doing its job.
#
# The protocol is one AF_UNIX/SOCK_DGRAM datagram per notification, made of `KEY=value\n`
# lines, sent to the address in NOTIFY_SOCKET: a filesystem path ("/run/systemd/notify") or,
# with a leading "@", a Linux abstract-namespace name (the "@" becomes a NUL byte). systemd
# attributes a datagram to our unit by the sender's credentials, which the kernel attaches,
# so nothing else needs to be sent. The socket is non-blocking and every error (no listener,
# a full receive queue, a bad address) is swallowed and counted: a notification is advice to
# the service manager, and failing to give it must never take the gateway down.
#
# The watchdog (`run_systemd`). systemd restarts a Type=notify service whose WATCHDOG=1 pings
# stop for WatchdogSec. A ping that a timer thread sends unconditionally proves only that the
# timer thread runs, which is how a gateway hangs silently under "active (running)". Here a
# ping is a verdict (`watchdog_verdict`), sent every WATCHDOG_USEC/2 only when
#
#   (a) the event loop is not stalled: this task's own wake-up was no later than
#       `max_loop_lag` (anyio.current_time() against the planned wake time, probe included;
#       no extra thread), and
#   (b) every shard's `GatewayConnection.health(now)` is `live`: READY with recent ACKs, or
#       in a reconnect that has lasted less than `SessionConfig.liveness_budget`.
#
# A loop that is blocked outright (a synchronous call that never returns, in any task on the
# loop, application handlers included) stops the pings by itself: this task is on the same loop and
# simply cannot run, so no ping is sent and systemd's timer expires. The lag check catches
# the milder case of a loop that runs, but so late that nothing it does is on time.
#
# This is deliberately separate from ShardDriver's `on_lag` hook, which reports how late the
# protocol loop's *own* timers fire; this task measures its own lateness, so it needs no
# wiring into the driver and also sees stalls caused by other tasks.
"""systemd notifications (READY, STATUS, STOPPING, WATCHDOG) without a C dependency."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Self

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    from qqproto import Health

__all__ = ["SystemdNotifier", "run_systemd", "watchdog_verdict"]

log = logging.getLogger("qqproto_io.systemd")

DEFAULT_STATUS_INTERVAL = 10.0
"""Seconds between STATUS updates when systemd expects no watchdog pings."""
DEFAULT_READY_POLL = 1.0
"""Seconds between checks until the first shard is ready, so READY=1 is not late."""


def _parse_watchdog_usec(value: str | None) -> int | None:
    if not value:
        return None
    try:
        usec = int(value)
    except ValueError:
        return None
    return usec if usec > 0 else None


def _parse_pid(value: str | None) -> int | None:
    if not value:
        return None
    try:
        pid = int(value)
    except ValueError:
        return None
    return pid if pid > 0 else None


class SystemdNotifier:
    """A minimal sd_notify(3) client: non-blocking, never raising.

    Args:
        address: ``NOTIFY_SOCKET`` as systemd set it: an absolute path, or ``@name`` for a
            Linux abstract-namespace socket.
        watchdog_usec: ``WATCHDOG_USEC``, or ``None`` when systemd expects no pings.
        watchdog_pid: ``WATCHDOG_PID``: pings are for this process only if it matches
            (``None``: no restriction, as with systemd before v209).
        pid: this process's id (default: ``os.getpid()``), compared with ``watchdog_pid``.

    Every send returns whether the datagram went out; failures are counted in
    :attr:`errors` (the last one kept in :attr:`last_error`) and logged, the first at
    WARNING and later ones at DEBUG. Use :meth:`close` (or ``with``) to release the socket.
    """

    def __init__(
        self,
        address: str,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
        pid: int | None = None,
    ) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self.watchdog_pid = watchdog_pid
        self.pid = os.getpid() if pid is None else pid
        self.sent = 0
        self.errors = 0
        self.last_error: OSError | None = None
        self._sock: socket.socket | None = None
        self._closed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or ``None`` when it is unset or empty.

        ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read from the same mapping (default:
        ``os.environ``); a malformed value reads as unset. The environment is not modified,
        so child processes inherit these variables (``qqproto`` starts none).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        return cls(
            address,
            watchdog_usec=_parse_watchdog_usec(env.get("WATCHDOG_USEC")),
            watchdog_pid=_parse_pid(env.get("WATCHDOG_PID")),
        )

    # ------------------------------------------------------------------ watchdog

    @property
    def watchdog_enabled(self) -> bool:
        """Whether systemd expects WATCHDOG=1 pings from this process."""
        if self.watchdog_usec is None:
            return False
        return self.watchdog_pid is None or self.watchdog_pid == self.pid

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``WATCHDOG_USEC``; ``None`` when not enabled."""
        if not self.watchdog_enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    # ------------------------------------------------------------------ sending

    def _target(self) -> str | None:
        if self.address.startswith("@"):
            return "\0" + self.address[1:]
        if self.address.startswith("/"):
            return self.address
        return None  # "vsock:..." and relative paths are not supported

    def _failed(self, exc: OSError) -> bool:
        self.errors += 1
        self.last_error = exc
        level = logging.WARNING if self.errors == 1 else logging.DEBUG
        log.log(level, "sd_notify to %r failed (%d so far): %s", self.address, self.errors, exc)
        return False

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines, in argument order: ``send(READY=1)``.

        Newlines inside a value are replaced by spaces (one field per line). Returns
        ``True`` when the datagram was sent; never raises ``OSError``.
        """
        if self._closed or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}\n")
        data = "".join(lines).encode("utf-8", "replace")
        target = self._target()
        if target is None:
            return self._failed(OSError(f"unsupported NOTIFY_SOCKET address {self.address!r}"))
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)  # noqa: FBT003 - the stdlib's signature
                self._sock = sock
            self._sock.sendto(data, target)
        except OSError as exc:
            return self._failed(exc)
        self.sent += 1
        return True

    def ready(self) -> bool:
        """``READY=1``: start-up is complete (a Type=notify unit becomes active)."""
        return self.send(READY=1)

    def stopping(self) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, if systemd expects pings from this process; else nothing."""
        if not self.watchdog_enabled:
            return False
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Release the socket; later sends do nothing. Idempotent."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------------------------ verdict


def _age(seconds: float | None) -> str:
    return "no ACK yet" if seconds is None else f"last ACK {seconds:.0f} s ago"


def watchdog_verdict(
    healths: Sequence[Health],
    *,
    loop_lag: float,
    max_loop_lag: float,
    names: Sequence[str] | None = None,
) -> tuple[bool, str]:
    """Whether to ping systemd's watchdog now, and a STATUS line saying why.

    Pure. The verdict is ok only if ``loop_lag <= max_loop_lag`` and every Health is
    ``live``. An empty sequence is *not* ok: a process watching no shard is not doing its
    job. ``names`` label the shards (default ``shard 0``, ``shard 1``, ... by position).

    The STATUS line, e.g.::

        1/2 ready; shard 0: ready, last ACK 3 s ago; shard 1: BACKOFF for 12 s, last ACK 60 s ago
        watchdog withheld (shard 1 stuck); 1/2 ready; shard 0: ...; shard 1: STUCK CONNECTING ...
    """
    labels = list(names) if names is not None else [f"shard {i}" for i in range(len(healths))]
    if len(labels) != len(healths):
        raise ValueError(f"{len(labels)} names for {len(healths)} shards")
    parts: list[str] = []
    stuck: list[str] = []
    for label, health in zip(labels, healths, strict=True):
        if health.ready:
            what = "ready"
        elif health.live:
            what = health.reason
        else:
            what = f"STUCK {health.reason}"
            stuck.append(label)
        parts.append(f"{label}: {what}, {_age(health.last_ack_age)}")
    ready = sum(1 for h in healths if h.ready)
    body = "; ".join([f"{ready}/{len(healths)} ready", *parts])
    why: list[str] = []
    if loop_lag > max_loop_lag:
        why.append(f"event loop {loop_lag:.2f} s late")
    if stuck:
        why.append(", ".join(stuck) + " stuck")
    if not healths:
        why.append("no shard")
    if why:
        return False, f"watchdog withheld ({'; '.join(why)}); {body}"
    return True, body


# --------------------------------------------------------------------------------- task


async def run_systemd(
    notifier: SystemdNotifier,
    probe: Callable[[], Sequence[Health]],
    *,
    max_loop_lag: float = 10.0,
    names: Sequence[str] | None = None,
    status_interval: float = DEFAULT_STATUS_INTERVAL,
    ready_poll: float = DEFAULT_READY_POLL,
) -> None:
    """Keep systemd informed until cancelled. Run it as a task next to the client.

    Args:
        notifier: where to send (see :meth:`SystemdNotifier.from_env`).
        probe: returns every shard's ``Health`` now, e.g.
            ``lambda: [client.connection.health(anyio.current_time())]``. Called on the
            loop; it must not block. If it raises, the tick counts as unhealthy.
        max_loop_lag: seconds this task may wake late before the loop counts as stalled.
        names: shard labels for the STATUS line (see :func:`watchdog_verdict`).
        status_interval: seconds between STATUS updates when systemd expects no pings.
        ready_poll: until ``READY=1`` is sent, tick at least this often, so that start-up
            completes within ``ready_poll`` of the first READY (systemd arms the watchdog
            only after ``READY=1``, so pings before it are harmless).

    Every ``notifier.watchdog_interval`` (or ``status_interval`` without a watchdog) it
    sends one datagram: ``READY=1`` the first time any shard is ready, then ``STATUS=...``,
    then ``WATCHDOG=1`` only if :func:`watchdog_verdict` is ok. On the way out (cancelled,
    or a ``BaseException`` from the probe) it sends ``STOPPING=1``; that send is
    synchronous (no checkpoint), so it cannot be cancelled: it is shielded by construction.
    """
    period = notifier.watchdog_interval or status_interval
    ready_sent = False
    withheld = False
    planned = anyio.current_time()
    try:
        while True:
            try:
                healths: Sequence[Health] = probe()
                lag = max(0.0, anyio.current_time() - planned)  # the probe's time included
                ok, status = watchdog_verdict(
                    healths, loop_lag=lag, max_loop_lag=max_loop_lag, names=names
                )
            except Exception as exc:  # an unknown state earns no ping
                log.debug("systemd health probe failed", exc_info=True)
                healths = ()
                ok, status = False, f"watchdog withheld (health probe failed: {exc!r})"
            fields: dict[str, str | int] = {}
            if not ready_sent and any(h.ready for h in healths):
                fields["READY"] = 1
                ready_sent = True
            fields["STATUS"] = status
            if ok and notifier.watchdog_enabled:
                fields["WATCHDOG"] = 1
            notifier.send(**fields)
            if not ok and not withheld:  # a change of verdict: say it once in the log
                withheld = True
                log.warning("unhealthy, no systemd watchdog pings: %s", status)
            elif ok and withheld:
                withheld = False
                log.warning("healthy again, systemd watchdog pings resume: %s", status)
            now = anyio.current_time()
            step = period if ready_sent else min(period, ready_poll)
            planned += step
            if planned <= now:  # fell behind (a stall): no burst of catch-up ticks
                planned = now + step
            await anyio.sleep_until(planned)
    finally:
        notifier.stopping()

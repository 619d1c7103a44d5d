# Running a bot in production: the supervision `qqproto run` gives its own sessions, for a
# GatewayClient of your own.
#
# One coroutine does what a service needs around the client: SIGINT and SIGTERM close the
# sessions cleanly (resumable, snapshots saved) instead of killing them; under systemd
# (Type=notify) READY=1 once a shard is ready, STATUS= lines, and WATCHDOG=1 only while the
# event loop is on time and every shard is live; a stall monitor that logs the stack of
# whatever blocks the loop; and, if asked, /healthz, /readyz and /metrics on loopback. The
# CLI's `qqproto run` is this coroutine around a client built from its options.
"""Supervise a GatewayClient: signals, systemd, the stall monitor and the health port."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from typing import TYPE_CHECKING

import anyio

from qqproto_io._stall import StallMonitor
from qqproto_io._systemd import SystemdNotifier, run_systemd

if TYPE_CHECKING:
    from qqproto_io._client import GatewayClient

__all__ = ["supervise"]

log = logging.getLogger("qqproto_io.supervise")


async def supervise(
    client: GatewayClient,
    *,
    health_port: int | None = None,
    stop_after: float | None = None,
    handle_signals: bool = True,
) -> None:
    """Run ``client`` and its handlers as a service until its sessions end.

    ``anyio.run(supervise, client)`` is the whole ``main`` of a bot: register handlers with
    :meth:`GatewayClient.on` first.

    Args:
        client: the client, not entered yet.
        health_port: serve ``/healthz``, ``/readyz`` and ``/metrics`` on 127.0.0.1 there
            (``None``: off). The client's ``metrics`` are used, or made.
        stop_after: close the sessions after this many seconds (``None``: never).
        handle_signals: SIGINT and SIGTERM close the sessions (they stay resumable) and
            this returns; turn off if your program handles signals itself.

    Under systemd (``NOTIFY_SOCKET`` set) it speaks the notification protocol, with the
    watchdog if ``WatchdogSec=`` is set; elsewhere that part does nothing.

    Raises:
        FatalStopError: a shard stopped for good (its close code and hint are on it).
        OSError: ``health_port`` cannot be listened on.
    """
    stall = StallMonitor()
    notifier = SystemdNotifier.from_env()

    fatal = None

    try:
        async with contextlib.AsyncExitStack() as stack:
            if health_port is not None:
                from qqproto_io._health import HealthServer, Metrics  # noqa: PLC0415

                if client.metrics is None:
                    client.metrics = Metrics()
                # Bound before the first connection: a port in use is told at once.
                await stack.enter_async_context(
                    HealthServer(client.healths, client.metrics, stall=stall, port=health_port)
                )
            tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(stall.run, name="qqproto stall monitor")
            await stack.enter_async_context(client)
            if notifier is not None:
                names = [f"shard {shard_id}" for shard_id in client.shard_ids]
                if client.webhook is not None:
                    names = ["webhook"]
                tg.start_soon(
                    functools.partial(
                        run_systemd, notifier, lambda: list(client.healths().values()), names=names
                    ),
                    name="qqproto systemd",
                )
            if handle_signals:
                tg.start_soon(_close_on_signal, client, notifier, name="qqproto signals")
            if stop_after is not None:
                tg.start_soon(_close_after, client, stop_after, name="qqproto stop timer")
            fatal = await client._serve_until_stopped()
            tg.cancel_scope.cancel()
    finally:
        if notifier is not None:
            notifier.close()
    if fatal is not None:
        raise fatal


async def _close_on_signal(client: GatewayClient, notifier: SystemdNotifier | None) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: closing the sessions (they stay resumable)", signal.Signals(signum).name)
            if notifier is not None:
                notifier.stopping()
            await client.close()
            return


async def _close_after(client: GatewayClient, seconds: float) -> None:
    await anyio.sleep(seconds)
    await client.close()

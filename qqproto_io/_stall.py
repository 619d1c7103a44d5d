# Event-loop stall detection: say loudly, with a stack, when user code blocks the loop.
#
# A blocked loop cannot report on itself, so a small daemon thread watches a timestamp that
# a task on the loop refreshes. When the timestamp grows older than `threshold`, the thread
# logs a WARNING with the loop thread's *current* stack - the line that blocks - the way
# discord.py's "heartbeat blocked for more than N seconds" does, which is the message its
# users learned to act on. When the loop runs again it logs how long the stall lasted.
#
# The thread wakes four times per threshold; it is opt-in (`qqproto run` turns it on) for
# embedders who want no extra thread.
"""A watchdog thread that reports event-loop stalls with the blocking stack."""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

__all__ = ["StallMonitor"]

log = logging.getLogger("qqproto_io.stall")


class StallMonitor:
    """Reports stalls of the event loop it runs on.

    Args:
        threshold: seconds without the loop running before a WARNING (default 2 s: far
            above normal scheduling jitter, far below a 41 s heartbeat interval).
        on_stall: called (from the watching thread) with each stall's duration when the loop
            runs again; it must be thread-safe.

    Attributes:
        stalls: the duration of every stall seen, in seconds (for health endpoints).
        stalled_since: when the current stall began (monotonic), or ``None``.
        recovered_at: when the loop last ran again after a stall (monotonic), or ``None``.
    """

    def __init__(
        self, threshold: float = 2.0, *, on_stall: Callable[[float], None] | None = None
    ) -> None:
        self.threshold = threshold
        self.on_stall = on_stall
        self.stalls: list[float] = []
        self.stalled_since: float | None = None
        self.recovered_at: float | None = None
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._loop_thread = threading.get_ident()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run on the loop until cancelled; starts and stops the watching thread.

        With ``await task_group.start(monitor.run)`` the monitor is watching on return.
        """
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stop.clear()
        watcher = threading.Thread(target=self._watch, name="qqproto stall monitor", daemon=True)
        watcher.start()
        task_status.started()
        try:
            while True:
                self._beat = time.monotonic()
                await anyio.sleep(self.threshold / 4)
        finally:
            self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.threshold / 4):
            now = time.monotonic()
            beat = self._beat
            if now - beat > self.threshold:
                if self.stalled_since is None:
                    self.stalled_since = beat
                    frame = sys._current_frames().get(self._loop_thread)
                    stack = "".join(traceback.format_stack(frame)) if frame else "(unknown)\n"
                    log.warning(
                        "event loop blocked for more than %.1f s: heartbeats cannot be sent "
                        "while it is; the loop thread is at:\n%s",
                        now - beat,
                        stack,
                    )
            elif self.stalled_since is not None:
                duration = beat - self.stalled_since
                self.stalls.append(duration)
                self.recovered_at = beat
                self.stalled_since = None
                log.warning("event loop ran again after a stall of %.1f s", duration)
                if self.on_stall is not None:
                    self.on_stall(duration)

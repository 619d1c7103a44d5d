# Virtual time on both of anyio's backends.
#
# trio has it built in: a MockClock with autojump_threshold=0 jumps to the next deadline as
# soon as every task is blocked. Its `current_time` still multiplies a real perf_counter
# reading by its rate (0), so the reading is replaced by a constant: nothing on a virtual
# run reads the machine's clock. trio also shuffles each batch of runnable tasks with a
# module-level Random (it reverses the batch half of the time); seeding that Random is what
# (with the batches sorted by task creation first, as trio does under Hypothesis) is what
# makes a trio run repeat itself.
#
# asyncio has no clock to swap, but its loop asks `time()` for the time and hands the wait
# for its next timer to the selector. `VirtualEventLoop` answers `time()` from a counter,
# and its selector, instead of sleeping for the timeout it is given, first polls the real
# descriptors without waiting (the loop's self-pipe, which threads write to) and, when
# nothing is ready, moves the counter on by exactly that timeout: the next timer is then
# due. The loop only asks for a wait when no callback is ready, that is when every task is
# waiting, which is trio's autojump rule. Its ready queue is FIFO and its timer heap orders
# by due time, so an asyncio run repeats itself without seeding anything.
"""Virtual clocks for anyio's asyncio and trio backends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import selectors
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

__all__ = [
    "Backend",
    "VirtualEventLoop",
    "is_virtual",
    "repeatable_scheduling",
    "run",
    "virtual_time",
]

Backend = Literal["asyncio", "trio"]
"""The anyio backends that run on virtual time."""

_T = TypeVar("_T")


class _VirtualSelector(selectors.DefaultSelector):
    """The loop's selector: waits are virtual, readiness of real descriptors is polled."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout is None or timeout <= 0:
            if not ready and timeout is None:
                # No timer at all: only another thread (through the self-pipe) can wake the
                # loop, so wait for it for real, as any loop would.
                ready = super().select(None)
            return ready
        self.now += timeout
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on virtual time, starting at 0.

    ``time()`` is virtual; when no callback is ready (every task waits), the loop jumps to
    its next timer at once instead of sleeping. Real descriptors (the self-pipe that
    ``call_soon_threadsafe`` writes to) are still polled, without waiting. Pass the class as
    anyio's ``loop_factory`` backend option (see :func:`virtual_time`).
    """

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        """The virtual time, in seconds since the loop was made."""
        return self._virtual.now

    def jump(self, seconds: float) -> None:
        """Move the clock on by ``seconds`` now, as if the process had been frozen."""
        if seconds < 0:
            raise ValueError("time does not go back")
        self._virtual.now += seconds


def _trio_clock() -> object:
    import trio.testing  # noqa: PLC0415 - trio is optional

    clock = trio.testing.MockClock(autojump_threshold=0)
    # The rate is 0, so the real reading it multiplies is irrelevant: a constant instead
    # keeps perf_counter out of every virtual run.
    clock._real_clock = lambda: 0.0
    return clock


@contextlib.contextmanager
def repeatable_scheduling(backend: Backend, seed: int) -> Iterator[None]:
    """Within the block, the backend schedules tasks in an order that repeats with ``seed``.

    asyncio's order is FIFO already. trio picks the order of each batch of runnable tasks
    with a module-level ``random.Random``, and tasks woken by timers due at the very same
    instant arrive in the order of their cancel scopes' memory addresses; inside the block
    the Random is seeded and every batch is sorted by task creation before it is shuffled
    (what trio does under Hypothesis), and both are put back afterwards. On both, the
    cycle collector is off within the block.
    """
    # The cycle collector runs when the process's allocations say so, and what it frees
    # can schedule work (an async generator's finalizer): off during the run, after a
    # collection of what came before, it cannot make one run differ from the next.
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        if backend != "trio":
            yield
            return
        from trio._core import _run  # noqa: PLC0415 - the only handle on trio's scheduler

        state, flag = _run._r.getstate(), _run._ALLOW_DETERMINISTIC_SCHEDULING
        _run._r.seed(seed)
        _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
        try:
            yield
        finally:
            _run._r.setstate(state)
            _run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]
    finally:
        if collecting:
            gc.enable()


def virtual_time(backend: Backend = "asyncio") -> tuple[str, dict[str, Any]]:
    """``(backend, options)`` for anyio on a fresh virtual clock: an ``anyio_backend``
    fixture's value, or the arguments of ``anyio.run``.

    Each call makes a new clock, starting at 0: asyncio's through a
    :class:`VirtualEventLoop`, trio's a ``trio.testing.MockClock`` that autojumps::

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return virtual_time(request.param)
    """
    if backend == "asyncio":
        return "asyncio", {"loop_factory": VirtualEventLoop}
    if backend == "trio":
        return "trio", {"clock": _trio_clock()}
    raise ValueError(f"no virtual time for backend {backend!r}")


def is_virtual() -> bool:
    """Whether the running event loop is on virtual time (see :func:`virtual_time`)."""
    try:
        return isinstance(asyncio.get_running_loop(), VirtualEventLoop)
    except RuntimeError:
        pass  # not asyncio
    import trio  # noqa: PLC0415 - trio is optional
    import trio.testing  # noqa: PLC0415

    clock = trio.lowlevel.current_clock()
    return isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold == 0


def run(
    func: Callable[..., Awaitable[_T]], *args: object, backend: Backend = "asyncio", seed: int = 0
) -> _T:
    """Run ``func(*args)`` on a fresh virtual clock (``anyio.run`` with
    :func:`virtual_time`), its scheduling seeded with ``seed``; return its result."""
    name, options = virtual_time(backend)
    with repeatable_scheduling(backend, seed):
        return anyio.run(func, *args, backend=name, backend_options=options)

# Exactly once across a crash: the saved sequence number follows what the application
# finished, not what the socket received.
#
# The core asks for a snapshot (session id, seq) when the session changes and on heartbeat
# ACKs; a restarted process Resumes from it and the server replays every dispatch after its
# seq. Saved as the core sees it, the seq runs ahead of the application: dispatches still in
# the client's queue, or in a handler, when the process dies are below the saved seq and are
# never replayed (lost), while those handled since the last ACK are above it and are replayed
# (handled twice). So the client saves, for each shard, the seq just below the oldest
# dispatch it queued that the application has not finished, and saves again each time one
# finishes. A dispatch whose handler (or `async for` body) finished is then never delivered
# again by a restarted process; the one in progress when it died may be; none is lost.
#
# "Finished" is when the application takes the next event (the end of an `async for` body,
# or of the handlers for it). Events of one shard are finished in the order they were queued,
# so the in-flight seqs of a shard form a FIFO; only a replay that fills a gap can put a lower
# seq behind a higher one, and then the lowest is searched for.
"""The delivery record: snapshots whose seq is the application's progress."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qqproto import SessionSnapshot
    from qqproto_io._stores import SnapshotStore

__all__ = ["DeliveryRecord"]


class _Shard:
    __slots__ = ("disordered", "done", "highest", "latest", "queued", "written")

    def __init__(self, latest: SessionSnapshot | None) -> None:
        self.latest = latest  # the core's newest snapshot of this shard
        self.written: SessionSnapshot | None = latest  # what the store holds
        self.queued: deque[tuple[str | None, int, bool]] = deque()  # (session, seq, late)
        self.highest = -1
        self.disordered = 0  # queued entries below one queued before them
        self.done: tuple[str | None, int] | None = None  # the last finished (session, seq)


class DeliveryRecord:
    """A :class:`~qqproto_io.SnapshotStore` in front of another that saves progress.

    Drivers save the core's snapshots through it as usual; the client tells it which
    dispatches it queued for the application (:meth:`queued`) and when the application
    finished the oldest one of a shard (:meth:`finished`). Each shard's saved seq is the one
    just below its oldest unfinished dispatch of the current session, and the saved session
    is always the core's.

    Args:
        store: where snapshots really go.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._shards: dict[tuple[int, int], _Shard] = {}

    def _shard(self, shard: tuple[int, int]) -> _Shard:
        state = self._shards.get(shard)
        if state is None:
            state = self._shards[shard] = _Shard(None)
        return state

    def load(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """The saved snapshot of ``shard`` (remembered as the current one)."""
        snapshot = self.store.load(shard)
        self._shards[shard] = _Shard(snapshot)
        return snapshot

    def save(self, shard: tuple[int, int], snapshot: SessionSnapshot | None) -> None:
        """The core's snapshot of ``shard``: saved with its seq held back to the progress."""
        state = self._shard(shard)
        state.latest = snapshot
        self._write(shard, state)

    def queued(self, shard: tuple[int, int], seq: int) -> None:
        """A dispatch of ``shard`` with ``seq`` went into the application's queue."""
        state = self._shard(shard)
        latest = state.latest
        late = seq < state.highest
        if late:
            state.disordered += 1
        else:
            state.highest = seq
        # Every dispatch is queued here, also without a session (None), so that `finished`
        # always pops the entry of the dispatch the application just finished.
        state.queued.append((latest.session_id if latest is not None else None, seq, late))

    def finished(self, shard: tuple[int, int]) -> None:
        """The application finished the oldest dispatch :meth:`queued` for ``shard``."""
        state = self._shards.get(shard)
        if state is None or not state.queued:
            return
        session, seq, late = state.queued.popleft()
        if late:
            state.disordered -= 1
        done = state.done
        if done is None or done[0] != session or seq > done[1]:
            state.done = (session, seq)
        if not state.queued:
            state.highest = -1
        self._write(shard, state)

    def _progress(self, state: _Shard) -> SessionSnapshot | None:
        # Everything up to the returned seq is finished; the one after it may not be.
        latest = state.latest
        if latest is None:
            return None
        session = latest.session_id
        if state.disordered:
            pending = [seq for sid, seq, _ in state.queued if sid == session]
            lowest = min(pending) if pending else None
        else:
            lowest = next((seq for sid, seq, _ in state.queued if sid == session), None)
        if lowest is not None:
            seq = lowest - 1
        else:
            # Nothing of this session is waiting: the application is as far as the core,
            # or further (the core's snapshot moves only on ACKs).
            done = state.done
            seq = done[1] if done is not None and done[0] == session else -1
            if latest.seq is not None and latest.seq > seq:
                return latest
            if seq < 0:
                return latest
        if seq == latest.seq:
            return latest
        return dataclasses.replace(latest, seq=seq)

    def _write(self, shard: tuple[int, int], state: _Shard) -> None:
        snapshot = self._progress(state)
        if snapshot == state.written:
            return
        state.written = snapshot
        self.store.save(shard, snapshot)

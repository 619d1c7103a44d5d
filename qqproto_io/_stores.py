# Where session snapshots and identify permits come from, as small interfaces.
#
# The defaults here are for one process: a JSON file written atomically (write a temporary
# file, fsync, rename: a crash mid-write leaves the previous snapshot intact) and an
# in-process identify limiter with one 5 s window per bucket `shard_id % max_concurrency`
# (PROTOCOL.md §5). Fleets plug in other implementations (SQLite, Redis) of the same
# protocols.
"""Snapshot stores and identify limiters: the protocols and the in-process defaults."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import anyio

from qqproto import InvalidSnapshot, SessionSnapshot

__all__ = [
    "IdentifyLimiter",
    "JsonFileSnapshotStore",
    "LocalIdentifyLimiter",
    "SnapshotStore",
]

IDENTIFY_WINDOW = 5.0


class SnapshotStore(Protocol):
    """Keeps one snapshot per shard."""

    def load(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """The saved snapshot of ``shard``, or ``None``."""

    def save(self, shard: tuple[int, int], snapshot: SessionSnapshot | None) -> None:
        """Save ``snapshot`` (``None`` deletes the saved one)."""


class IdentifyLimiter(Protocol):
    """Grants identify permits."""

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        """Return when ``shard_id`` may Identify."""


class JsonFileSnapshotStore:
    """Snapshots in one JSON file (``{"0/1": {...}}``), replaced atomically on each save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: start afresh rather than refuse to run
        return data if isinstance(data, dict) else {}

    def load(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """The saved snapshot of ``shard``, or ``None`` (also when unreadable)."""
        raw = self._read().get(f"{shard[0]}/{shard[1]}")
        if not isinstance(raw, dict):
            return None
        try:
            return SessionSnapshot.from_dict(raw)
        except InvalidSnapshot:
            return None

    def save(self, shard: tuple[int, int], snapshot: SessionSnapshot | None) -> None:
        """Write the file anew through a temporary file and a rename."""
        data = self._read()
        key = f"{shard[0]}/{shard[1]}"
        if snapshot is None:
            data.pop(key, None)
        else:
            data[key] = snapshot.to_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".snapshot-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).replace(self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise


class LocalIdentifyLimiter:
    """One Identify per bucket per 5 s, for the shards of this process."""

    def __init__(self) -> None:
        self._next_free: dict[int, float] = {}

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        """Wait for the bucket's next free slot and take it."""
        bucket = shard_id % max(1, max_concurrency or 1)
        now = anyio.current_time()
        at = max(now, self._next_free.get(bucket, now))
        self._next_free[bucket] = at + IDENTIFY_WINDOW
        await anyio.sleep(at - now)

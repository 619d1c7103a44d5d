# The session snapshot (docs/design.md#inv-9): enough to Resume after a process restart.
#
# It is plain data on purpose: a dict of four JSON-able fields, so any store (a file, SQLite,
# Redis) can keep it. It holds no secret: a session id cannot be used without a valid token.
"""A serialisable session snapshot for resuming across restarts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from qqproto._errors import QQProtoError

__all__ = ["InvalidSnapshot", "SessionSnapshot"]


class InvalidSnapshot(QQProtoError, ValueError):
    """A stored snapshot could not be read back (wrong shape or types)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSnapshot:
    """What a restarted process needs to Resume instead of Identify.

    Attributes:
        session_id: from READY.
        seq: the last sequence number delivered to the application, or ``None``.
        shard: ``(shard_id, shard_count)`` the session belongs to.
        saved_at: when it was taken, on the clock of whoever took it. The core stamps its own
            (monotonic) ``now``; a store that keeps snapshots across restarts should re-stamp
            it with wall-clock time (qqproto_io does).
    """

    session_id: str
    seq: int | None
    shard: tuple[int, int]
    saved_at: float

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-able dict."""
        return {
            "session_id": self.session_id,
            "seq": self.seq,
            "shard": [self.shard[0], self.shard[1]],
            "saved_at": self.saved_at,
        }

    def to_json(self) -> str:
        """Return compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SessionSnapshot:
        """Read a snapshot written by :meth:`to_dict`.

        Raises:
            InvalidSnapshot: a field is missing or has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise InvalidSnapshot("snapshot is not a mapping")
        session_id = data.get("session_id")
        seq = data.get("seq")
        shard = data.get("shard")
        saved_at = data.get("saved_at")
        if not isinstance(session_id, str) or not session_id:
            raise InvalidSnapshot("snapshot 'session_id' must be a non-empty string")
        if seq is not None and (type(seq) is not int or seq < 0):
            raise InvalidSnapshot("snapshot 'seq' must be a non-negative int or null")
        if (
            not isinstance(shard, list | tuple)
            or len(shard) != 2
            or not all(type(x) is int for x in shard)
        ):
            raise InvalidSnapshot("snapshot 'shard' must be [shard_id, shard_count]")
        if type(saved_at) not in (int, float):
            raise InvalidSnapshot("snapshot 'saved_at' must be a number")
        assert isinstance(saved_at, int | float)  # for mypy; checked just above
        return cls(session_id=session_id, seq=seq, shard=(shard[0], shard[1]), saved_at=saved_at)

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionSnapshot:
        """Read a snapshot written by :meth:`to_json`.

        Raises:
            InvalidSnapshot: not JSON, not an object, or a field is wrong.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidSnapshot("snapshot is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidSnapshot("snapshot JSON is not an object")
        return cls.from_dict(data)

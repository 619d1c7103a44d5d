# Which shards a process runs.
#
# A bot's guilds are split over `count` shards (the server routes them: docs/protocol.md#sharding);
# `/gateway/bot` recommends a count. One process may run all of them or a subset, so that a
# fleet of processes covers them together: "auto" (the recommended count, all of it),
# "16" (all sixteen), "3/16" (only shard 3 of 16), "0-7/16" (the first half) or "0,2,4/16".
"""Shard plans: all shards, the recommended count, or a subset per process."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ShardPlan"]


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The shards one process runs.

    Attributes:
        count: the total number of shards, or ``None`` for the count ``/gateway/bot``
            recommends.
        ids: the shard ids this process runs, or ``None`` for all of them.
    """

    count: int | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"a shard count must be at least 1, not {self.count}")
        if self.ids is not None:
            if not self.ids:
                raise ValueError("a shard plan needs at least one shard id")
            if len(set(self.ids)) != len(self.ids):
                raise ValueError(f"shard ids repeat: {self.ids}")
            if min(self.ids) < 0 or (self.count is not None and max(self.ids) >= self.count):
                raise ValueError(f"shard ids {self.ids} do not fit a count of {self.count}")

    @classmethod
    def parse(cls, text: str) -> ShardPlan:
        """``auto``, ``N``, ``I/N``, ``A-B/N`` or ``I,J,K/N`` (ranges include both ends).

        Raises:
            ValueError: anything else, with the accepted forms in the message.
        """
        spec = text.strip().lower()
        if spec == "auto":
            return cls()
        try:
            if "/" not in spec:
                return cls(count=int(spec))
            which, _, count = spec.partition("/")
            ids: list[int] = []
            for part in which.split(","):
                first, dash, last = part.partition("-")
                ids.extend(range(int(first), int(last) + 1) if dash else [int(first)])
            return cls(count=int(count), ids=tuple(ids))
        except ValueError as exc:
            raise ValueError(
                f"bad shard plan {text!r} ({exc}): use auto, N, I/N, A-B/N or I,J/N"
            ) from None

    def resolve(self, recommended: int | None) -> list[tuple[int, int]]:
        """The ``(shard_id, count)`` pairs to run, given ``/gateway/bot``'s recommendation."""
        count = self.count if self.count is not None else max(1, recommended or 1)
        ids = self.ids if self.ids is not None else tuple(range(count))
        if max(ids) >= count:
            raise ValueError(f"shard ids {ids} do not fit the recommended count of {count}")
        return [(i, count) for i in ids]

    def __str__(self) -> str:
        count = "auto" if self.count is None else str(self.count)
        if self.ids is None:
            return count
        return ",".join(map(str, self.ids)) + "/" + count

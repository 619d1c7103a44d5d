# The token policy: when an attempt needs a new access token.
#
# An access token lives at most two hours, and `expires_in` says how much of that is left
# (docs/protocol.md#access-token). An attempt fetches a new one when none is held, when a
# close or a 401 forced a refresh, or when fewer than `token_refresh_margin` seconds remain.
# A token handed over during the current PREPARING is used whatever its `expires_in`, so a
# tiny value can never make the attempt fetch in a loop.
"""The access token held, and when to fetch another."""

from __future__ import annotations

__all__ = ["TokenPolicy"]


class TokenPolicy:
    """The token kept across attempts, and the reasons to replace it."""

    __slots__ = ("expires_at", "force", "fresh", "token")

    def __init__(self) -> None:
        self.token: str | None = None
        self.expires_at = float("-inf")
        self.fresh = False  # provided during the current PREPARING: use it whatever its life
        self.force = False  # the server rejected the token held

    def provide(self, token: str, ttl: float, now: float) -> None:
        """A token arrived with ``ttl`` seconds of life."""
        self.token = token
        self.expires_at = now + ttl
        self.force = False

    def needs_fetch(self, now: float, margin: float) -> bool:
        """Must the attempt being prepared fetch a token first?"""
        return (
            self.token is None or self.force or (not self.fresh and self.expires_at - now < margin)
        )

    def require(self) -> str:
        """The token to authenticate with; there must be one."""
        if self.token is None:
            raise RuntimeError("authenticating without a token")
        return self.token

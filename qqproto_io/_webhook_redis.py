# Webhook deliveries shared by several processes through Redis.
#
# Behind a load balancer the platform's retry of a callback may reach another instance than
# the first attempt. Each instance first checks its own memory, then claims the envelope id
# with one `SET key owner NX PX ttl`: one atomic step on the server, so of two instances
# racing on one id exactly one gets True. Nobody deletes a claim; it ends with its TTL,
# which must outlast the platform's retry window (undocumented; minutes at most in reports),
# so the default is the core's own dedup window, one hour.
#
# redis.asyncio runs on asyncio only, so this does too.
"""A Redis implementation of :class:`~qqproto_io.DeliveryClaims` for webhook deliveries."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisDeliveryClaims"]

DEFAULT_CLAIM_TTL = 3600.0


class RedisDeliveryClaims:
    """Claims of webhook deliveries, shared by every process using one Redis and ``prefix``.

    Args:
        client: a ``redis.asyncio.Redis`` client (yours to close).
        prefix: namespace of the keys; keys are ``{prefix}:webhook:<app id>:<event id>``.
        ttl: seconds a claim is kept; longer than the platform's retry window.
    """

    def __init__(
        self, client: Redis, *, prefix: str = "qqproto", ttl: float = DEFAULT_CLAIM_TTL
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl * 1000))
        # Who holds a claim, for an operator reading the key; never a secret.
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    def __repr__(self) -> str:
        return f"RedisDeliveryClaims(prefix={self._prefix!r}, ttl={self._ttl_ms / 1000:g})"

    def key(self, app_id: str, event_id: str) -> str:
        """The Redis key of one delivery."""
        return f"{self._prefix}:webhook:{app_id}:{event_id}"

    async def claim(self, app_id: str, event_id: str) -> bool:
        """Claim ``event_id``: True for the first caller within the TTL, False after.

        Raises whatever redis-py raises when the server cannot be reached; the inbox then
        delivers unclaimed.
        """
        done = await self._client.set(
            self.key(app_id, event_id), self._owner, nx=True, px=self._ttl_ms
        )
        return bool(done)

# Every tunable of a session, with the reason for its default.
"""Session configuration and the intent flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import IntFlag
from types import MappingProxyType
from typing import TYPE_CHECKING

from qqproto._codec import DEFAULT_MAX_PAYLOAD_SIZE

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Intents", "SessionConfig"]


class Intents(IntFlag):
    """Gateway intent bits (their events: docs/protocol.md#intents). Combine with ``|``.

    ``DEFAULT`` is the set every bot is granted without applying (GUILDS, GUILD_MEMBERS,
    PUBLIC_GUILD_MESSAGES). Group and C2C messages (``GROUP_AND_C2C_EVENT``) need an
    application in the QQ bot console; asking for an intent you lack closes with 4014.
    """

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    DIRECT_MESSAGE = 1 << 12
    OPEN_FORUMS_EVENT = 1 << 18
    AUDIO_OR_LIVE_CHANNEL_MEMBER = 1 << 19
    GROUP_AND_C2C_EVENT = 1 << 25
    INTERACTION = 1 << 26
    MESSAGE_AUDIT = 1 << 27
    FORUMS_EVENT = 1 << 28
    AUDIO_ACTION = 1 << 29
    PUBLIC_GUILD_MESSAGES = 1 << 30
    DEFAULT = GUILDS | GUILD_MEMBERS | PUBLIC_GUILD_MESSAGES

    @classmethod
    def parse(cls, text: str) -> int:
        """Parse ``"GUILDS|GROUP_AND_C2C_EVENT"``, ``"guilds,interaction"`` or ``"513"``.

        Raises:
            ValueError: an unknown name, or a negative number.
        """
        text = text.strip()
        if text.isdigit():
            return int(text)
        value = 0
        for raw in text.replace(",", "|").split("|"):
            name = raw.strip().upper()
            if not name:
                continue
            try:
                value |= cls[name]
            except KeyError:
                known = ", ".join(m.name for m in cls if m.name)
                raise ValueError(f"unknown intent {raw.strip()!r}; known: {known}") from None
        return value


# Events whose `d.id` is a message id that QQ may push twice (docs/protocol.md#sequence-and-dedup:
# "相同的 msg_id 的消息会有概率重复推送"). Other events reuse `d.id` for the *object* they describe
# (GUILD_UPDATE carries the guild id), so deduplicating them by `d.id` would drop real updates.
_MESSAGE_EVENT_TYPES = frozenset(
    {
        "C2C_MESSAGE_CREATE",
        "GROUP_AT_MESSAGE_CREATE",
        "GROUP_MESSAGE_CREATE",
        "AT_MESSAGE_CREATE",
        "MESSAGE_CREATE",
        "DIRECT_MESSAGE_CREATE",
        "INTERACTION_CREATE",
    }
)

_DEFAULT_PROPERTIES = MappingProxyType(
    {"$os": "linux", "$browser": "qqproto", "$device": "qqproto"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Settings of one gateway connection. Every time is in seconds.

    Attributes:
        intents: the intent bitmask sent in Identify (see :class:`Intents`).
        shard: ``(shard_id, shard_count)``; ``(0, 1)`` when not sharding.
        properties: Identify ``properties`` (the server ignores them).
        max_payload_size: payloads above this are rejected before parsing (1 MiB).
        min_heartbeat_interval: floor for the Hello interval. 1 s lets local fakes run fast;
            any real value from Hello (about 41-45 s) is used as given.
        connect_timeout: from ``OpenConnection`` to ``connection_opened`` (DNS, TCP, TLS,
            proxy, upgrade). 30 s: generous for slow proxies, and no attempt hangs forever.
        hello_timeout: from open to Hello. 30 s (serenity gives up after 15 s; QQ sends Hello
            at once, so the bound only matters on a broken link).
        auth_timeout: from Identify/Resume to READY/RESUMED. 30 s.
        http_timeout: bound on each token or gateway-URL request the core asks for. 30 s.
        close_timeout: from sending a close frame to aborting the transport. 5 s (hikari);
            a dead link never answers a close (twilight #2435).
        backoff_base: the first retry waits ``uniform(0, backoff_base)``: fast.
        backoff_cap: upper bound of the backoff window: 60 s (QQ-sized; Discord peers use
            up to 1024 s, far too long for a chat bot).
        stable_after: a session counts as "stayed up" after this long in READY; only then do
            the failure counters reset. 30 s (hikari's "started recently" window).
        max_failed_resumes: consecutive failed resumes before the session is dropped and the
            next connection Identifies. 3 (buape/carbon #364, hermes PR #26025).
        rate_limit_cooldown: the single wait after close 4008. 60 s (hermes).
        token_refresh_margin: refresh the token before an attempt when fewer seconds remain.
            60 s: QQ only issues a new token in the last 60 s of the old one,
            so a larger margin would ask again and get the same token back.
        latency_samples: heartbeat latency samples kept for the mean. 5 (twilight).
        dedup_max_ids: ids remembered to drop replays across sessions. 10,000.
        dedup_max_age: seconds an id is remembered. 1 h (at-least-once pushes and replays
            arrive within minutes).
        dedup_event_types: event types whose ``d.id`` is a message id to deduplicate by.
        storm_window: a connection that ends within this long of opening is a quick disconnect.
        storm_threshold: quick disconnects in a row that raise a ``DisconnectStorm``. 3.
        liveness_budget: how long a connection may be without a live session (reconnecting,
            or READY without ACKs) before :meth:`GatewayConnection.health` calls it stuck,
            so that a supervisor restarts the process. 300 s: five backoff caps.
        keep_session_close_code: close code we send when we want to Resume afterwards. 4000,
            as twilight and discord.py do: never 1000/1001, which may end the session.
    """

    intents: int = Intents.DEFAULT
    shard: tuple[int, int] = (0, 1)
    properties: Mapping[str, str] = field(default_factory=lambda: _DEFAULT_PROPERTIES)
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE
    min_heartbeat_interval: float = 1.0
    connect_timeout: float = 30.0
    hello_timeout: float = 30.0
    auth_timeout: float = 30.0
    http_timeout: float = 30.0
    close_timeout: float = 5.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    stable_after: float = 30.0
    max_failed_resumes: int = 3
    rate_limit_cooldown: float = 60.0
    token_refresh_margin: float = 60.0
    latency_samples: int = 5
    dedup_max_ids: int = 10_000
    dedup_max_age: float = 3600.0
    dedup_event_types: frozenset[str] = _MESSAGE_EVENT_TYPES
    storm_window: float = 10.0
    storm_threshold: int = 3
    liveness_budget: float = 300.0
    keep_session_close_code: int = 4000

    def __post_init__(self) -> None:
        shard_id, shard_count = self.shard
        if shard_count < 1 or not 0 <= shard_id < shard_count:
            raise ValueError(f"shard must be (id, count) with 0 <= id < count, got {self.shard}")
        if self.intents < 0:
            raise ValueError("intents must be a non-negative bitmask")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value}")
        positive = ("min_heartbeat_interval", "close_timeout", "backoff_base", "backoff_cap")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_payload_size", "latency_samples", "dedup_max_ids", "storm_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_failed_resumes < 1:
            raise ValueError("max_failed_resumes must be >= 1")
        if not 4000 <= self.keep_session_close_code <= 4999:
            raise ValueError("keep_session_close_code must be an application code 4000-4999")

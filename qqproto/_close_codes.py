# What to do after a connection ends: the close-code policy, as one table.
#
# Sources: the official table, how the SDKs react, and our reading: docs/protocol.md#close-codes.
# The official summary is "4009 -> Resume; 4914/4915 -> never reconnect; everything else ->
# Identify". We keep the session more often than that, where the docs say a Resume may work
# or where nothing is documented, because a needless Identify loses events and spends the
# daily session budget:
#
# * 4009, op 7: the routine ~30 min rotation. Resume, and do not count it as a failure when
#   the session had stayed up (a rotation seconds after a Resume is still a failure: that
#   is the "resume works, then dies" loop of hermes #22179).
# * 1000, 1006, no close frame, and codes nobody documents: Resume (hermes, nonebot, Koishi).
# * 4008 "sent too fast": one cool-down, then Resume (docs: may Resume). The cool-down
#   replaces the backoff delay; it does not add to it (S12 in docs/design.md#failure-scenarios).
# * 4004 "authentication failed": our token is bad or stale. Force a token refresh, then
#   Identify (docs/protocol.md#close-codes).
# * 4006, 4007, 4900-4913, op 9 with `d` not true: the session is gone. Identify.
# * 4914/4915: the bot is delisted/banned: stop, never reconnect (docs).
# * 4001/4002/4010-4014: "do not retry" per the docs: a bug or a configuration error that a
#   retry cannot fix. Stop with a hint naming the setting to check, instead of burning the
#   identify budget in a loop.
"""The close-code policy table: for each close code, the next step and how to get there."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "APPLICATION_CLOSE",
    "CLOSE_CODE_POLICY",
    "CREDENTIALS_REJECTED",
    "DEADLINE",
    "INVALID_SESSION",
    "INVALID_SESSION_RESUMABLE",
    "RECONNECT_REQUEST",
    "REQUEST_FAILED",
    "REQUEST_UNAUTHORIZED",
    "SERVER_RESET",
    "START_LIMIT_EXHAUSTED",
    "UNKNOWN_CLOSE",
    "ZOMBIE",
    "ClosePolicy",
    "NextStep",
    "policy_for_close",
]


class NextStep(Enum):
    """What the connection does after a disconnect."""

    RESUME = "resume"
    IDENTIFY = "identify"
    STOP = "stop"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosePolicy:
    """One row of the close-code table.

    Attributes:
        step: resume, identify, or stop.
        meaning: what the code means, for logs and events.
        rotation: a server-planned reconnect; not a failure if the session had stayed up.
        cooldown: wait ``rate_limit_cooldown`` instead of the backoff delay.
        refresh_token: fetch a new access token (bypassing any cache) before reconnecting.
        hint: for a stop or a storm, what the operator should check.
    """

    step: NextStep
    meaning: str
    rotation: bool = False
    cooldown: bool = False
    refresh_token: bool = False
    hint: str = ""


def _resume(meaning: str, *, rotation: bool = False, cooldown: bool = False) -> ClosePolicy:
    return ClosePolicy(step=NextStep.RESUME, meaning=meaning, rotation=rotation, cooldown=cooldown)


def _identify(meaning: str, *, refresh_token: bool = False, hint: str = "") -> ClosePolicy:
    return ClosePolicy(
        step=NextStep.IDENTIFY, meaning=meaning, refresh_token=refresh_token, hint=hint
    )


def _stop(meaning: str, hint: str) -> ClosePolicy:
    return ClosePolicy(step=NextStep.STOP, meaning=meaning, hint=hint)


# A session the server failed to create or lost may come with a silently invalidated token
# (S10 in docs/design.md#failure-scenarios): the next attempt asks for a fresh one (one request).
_INTERNAL = _identify("server internal error; the session is gone", refresh_token=True)
_BUG_HINT = (
    "the server rejected a payload qqproto sent; this is a qqproto bug or a protocol change: "
    "please report it with the log"
)

CLOSE_CODE_POLICY: dict[int, ClosePolicy] = {
    4001: _stop("invalid opcode", _BUG_HINT),
    4002: _stop("invalid payload", _BUG_HINT),
    4004: _identify(
        "authentication failed",
        refresh_token=True,
        hint="check the app id and client secret (QQBOT_APP_ID / QQBOT_CLIENT_SECRET)",
    ),
    4006: _identify("invalid session id"),
    4007: _identify("invalid sequence number on resume"),
    4008: _resume("payloads sent too fast (rate limited)", cooldown=True),
    4009: _resume("connection expired (routine rotation)", rotation=True),
    4010: _stop("invalid shard", "check the shard setting: shard id must be below shard count"),
    4011: _stop("too many guilds for one shard", "run more shards (see /gateway/bot 'shards')"),
    4012: _stop("invalid gateway version", _BUG_HINT),
    4013: _stop("invalid intents", "check the intents setting: an unknown bit is set"),
    4014: _stop(
        "intents not permitted",
        "the bot lacks permission for an intent: apply for it in the QQ bot console "
        "or remove it from the intents setting",
    ),
    **dict.fromkeys(range(4900, 4914), _INTERNAL),
    4914: _stop(
        "bot is delisted (sandbox only)",
        "the bot may only connect to the sandbox: use the sandbox setting, or get it listed",
    ),
    4915: _stop("bot is banned", "the bot is banned on the QQ open platform; see the console"),
}
"""Close code -> policy. Codes not listed (1000, 1006, 4000, ...) get :data:`UNKNOWN_CLOSE`."""

UNKNOWN_CLOSE = _resume("closed without a documented QQ code")
"""Policy for a close code not in the table, or no close frame at all (1006)."""

RECONNECT_REQUEST = _resume("server requested a reconnect (op 7)", rotation=True)
"""Policy for op 7."""

INVALID_SESSION = _identify("invalid session (op 9); the session is gone", refresh_token=True)
"""Policy for op 9 whose ``d`` is not ``true``."""

INVALID_SESSION_RESUMABLE = _resume("invalid session (op 9, resumable)")
"""Policy for the first op 9 with ``d: true`` in a row; a second one in a row Identifies."""

SERVER_RESET = _resume("server sent a second Hello on a live connection", rotation=True)
"""Policy for an unexpected Hello mid-session: a server reset, so reconnect and Resume."""

ZOMBIE = _resume("heartbeat not acknowledged (zombie connection)")
"""Policy after the ACK watchdog fired."""

DEADLINE = _resume("the server did not answer in time")
"""Policy after a phase deadline (connect, Hello, READY/RESUMED, token, gateway URL)."""

REQUEST_FAILED = _resume("a token or gateway request failed")
"""Policy after the token or gateway-URL request failed (before any socket was opened)."""

REQUEST_UNAUTHORIZED = ClosePolicy(
    step=NextStep.RESUME,
    meaning="the access token was refused (HTTP 401)",
    refresh_token=True,
)
"""Policy after ``/gateway/bot`` refused the access token: fetch a fresh one, then retry."""

CREDENTIALS_REJECTED = _stop(
    "the token endpoint rejected the credentials",
    "check the app id and client secret (QQBOT_APP_ID / QQBOT_CLIENT_SECRET), and that the "
    "bot still exists in the QQ bot console",
)
"""Policy when the token endpoint says the app id or secret is wrong: retrying cannot help."""

START_LIMIT_EXHAUSTED = _identify(
    "session_start_limit.remaining is 0: no session can start until the budget resets",
    hint="too many Identifies today; look for a restart or identify loop",
)
"""Policy when an Identify is due but the daily session budget is spent."""

APPLICATION_CLOSE = ClosePolicy(step=NextStep.STOP, meaning="closed by the application")
"""Policy when the application closes the connection."""


def policy_for_close(code: int | None) -> ClosePolicy:
    """Return the policy for a close code (``None`` = no close frame: the TCP link died)."""
    if code is None:
        return UNKNOWN_CLOSE
    return CLOSE_CODE_POLICY.get(code, UNKNOWN_CLOSE)

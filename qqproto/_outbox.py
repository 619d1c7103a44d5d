# The send policy, sans-IO: pacing per guild channel, retries with full-jitter backoff that
# honour Retry-After, and never a retry that could deliver a message twice. Times are on the
# caller's monotonic clock, like GatewayConnection's.
#
# Exactly once. A reply in C2C or a group carries msg_id + msg_seq, and the platform refuses
# a second send of the same pair (code 40054005). A retry re-sends the very same request, so
# after an answer that never came it is either the first delivery or a refused duplicate;
# the Outbox counts the latter as delivered. Guild channels and DMs document no msg_seq: there
# a retry is only made when the first try surely did not reach the platform (a 429, or a
# connection that failed before the request was written).
"""The Outbox: pacing, retries and the outcome of each send."""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from qqproto._api_errors import (
    _AUDIT_CODES,
    _RETRY_ONCE,
    ApiError,
    ApiErrorKind,
    _body_code,
    classify_api_error,
)
from qqproto._backoff import full_jitter_delay
from qqproto._bodies import ApiRequest, _number
from qqproto._errors import LocalProtocolError
from qqproto._replies import Send

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping

    from qqproto._codec import JSONValue

__all__ = ["Outbox", "SendConfig", "SendDelivered", "SendFailed", "Transmit"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SendConfig:
    """How the :class:`Outbox` retries and paces.

    Attributes:
        max_attempts: tries per send, the first included.
        backoff_base: the first retry's backoff window, in seconds (full jitter).
        backoff_cap: the largest backoff window.
        max_elapsed: seconds after ``start`` past which no retry is made.
        channel_limit: sends per ``channel_period`` to one guild channel (the documented 5 a
            second), or ``None`` for no pacing.
        channel_period: the pacing window, in seconds.
    """

    max_attempts: int = 4
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    max_elapsed: float = 120.0
    channel_limit: int | None = 5
    channel_period: float = 1.0

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise LocalProtocolError("max_attempts must be a positive int")
        if self.channel_limit is not None and (
            type(self.channel_limit) is not int or self.channel_limit < 1
        ):
            raise LocalProtocolError("channel_limit must be a positive int or None")
        for name in ("backoff_base", "backoff_cap", "max_elapsed", "channel_period"):
            _number(name, getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class Transmit:
    """Make ``request`` at time ``at``, then report with ``answered`` or ``unanswered``.

    Attributes:
        ticket: the send this attempt belongs to.
        attempt: 1 for the first try, 2 for the first retry, ...
        request: the call; a retry repeats it byte for byte (same ``msg_seq``).
        at: when to make it, on the caller's monotonic clock (now, or later when paced or
            backing off).
        refresh_token: fetch a fresh access token first (the last one was refused).
    """

    ticket: int
    attempt: int
    request: ApiRequest
    at: float
    refresh_token: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SendDelivered:
    """The platform has the message.

    Attributes:
        ticket: the send.
        attempts: tries made.
        response: the answer's body (the message id, ...); ``None`` when known only from a
            refused duplicate. Not in the repr.
        duplicate: a retry was refused as a duplicate: an earlier try had got through.
        under_review: the platform holds the message for a human review before showing it
            (codes 304023/304024); the ``MESSAGE_AUDIT_*`` events tell the verdict.
        audit_id: the review's id, when ``under_review`` and the answer named one.
    """

    ticket: int
    attempts: int
    response: JSONValue = field(repr=False)
    duplicate: bool = False
    under_review: bool = False
    audit_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SendFailed:
    """The Outbox gave up on a send.

    Attributes:
        ticket: the send.
        attempts: tries made.
        reason: why, in words.
        error: the platform's last answer, or ``None`` (no answer came).
        maybe_delivered: a try may have reached the user (an answer that never came, or a
            5xx): do not :meth:`Replies.cancel` it, and expect that the user may have it.
    """

    ticket: int
    attempts: int
    reason: str
    error: ApiError | None
    maybe_delivered: bool


@dataclass(slots=True)
class _Ticket:
    send: Send
    deadline: float
    attempt: int = 0  # Transmits handed out so far
    failures: int = 0
    maybe_delivered: bool = False
    refreshed: bool = False
    retried_codes: set[int] = field(default_factory=set)


class _Pacer:
    """At most `limit` sends in any `period` seconds per key, as a sorted list of slots."""

    def __init__(self, limit: int, period: float, max_keys: int = 10_000) -> None:
        self._limit = limit
        self._period = period
        self._max_keys = max_keys
        self._slots: dict[str, list[float]] = {}

    def reserve(self, key: str, earliest: float, now: float) -> float:
        if len(self._slots) >= self._max_keys:
            for k in list(self._slots):
                self._prune(k, now)
        elif key in self._slots:
            self._prune(key, now)
        times = self._slots.setdefault(key, [])
        # The first slot that fits is `earliest`, or where a reserved slot's period ends, or
        # at a reserved slot (passing one changes which others share a period with it).
        later = (c for s in times for c in (s, s + self._period) if c > earliest)
        for at in sorted({earliest, *later}):
            if self._fits(times, at):
                insort(times, at)
                return at
        raise AssertionError("unreachable: a period after the last slot always fits")

    def release(self, key: str, at: float) -> None:
        times = self._slots.get(key)
        if times:
            i = bisect_left(times, at)
            if i < len(times) and times[i] == at:
                del times[i]

    def _fits(self, times: list[float], at: float) -> bool:
        # Any `limit + 1` consecutive slots must span at least a period; only the spans that
        # hold the new one can break.
        n = self._limit
        i = bisect_right(times, at)
        near = [*times[max(0, i - n) : i], at, *times[i : i + n]]
        # Added, not subtracted: a candidate is `slot + period`, computed the same way.
        return all(near[j + n] >= near[j] + self._period for j in range(len(near) - n))

    def _prune(self, key: str, now: float) -> None:
        # Slots a period before `now` cannot share a period with any slot from `now` on.
        times = self._slots[key]
        del times[: bisect_right(times, now - self._period)]
        if not times:
            del self._slots[key]


class Outbox:
    """The send policy: pacing, retries and outcomes, for any number of sends at once.

    Verbs: :meth:`start` a :class:`Send`; make each :class:`Transmit` at its ``at`` and
    report it with :meth:`answered` (any HTTP answer) or :meth:`unanswered` (no answer);
    each report gives the next ``Transmit`` or the outcome, :class:`SendDelivered` or
    :class:`SendFailed`. Times are on the caller's monotonic clock.

    Retried: HTTP 429 and rate-limit codes (after ``Retry-After`` when sent, and the
    backoff), 5xx and codes asking for a retry, connection failures; an auth failure once,
    with ``refresh_token``. Not retried: other 4xx, and anything that could deliver twice.

    Args:
        config: retries and pacing; defaults to ``SendConfig()``.
        rng: the random source for the backoff jitter.
    """

    def __init__(self, config: SendConfig | None = None, *, rng: random.Random) -> None:
        if config is not None and not isinstance(config, SendConfig):
            raise LocalProtocolError("config must be a SendConfig")
        self._config = config or SendConfig()
        self._rng = rng
        self._tickets: dict[int, _Ticket] = {}
        self._next_ticket = 1
        limit = self._config.channel_limit
        self._pacer = _Pacer(limit, self._config.channel_period) if limit is not None else None

    @property
    def in_flight(self) -> int:
        """How many sends are started and not yet delivered, failed or abandoned."""
        return len(self._tickets)

    def start(self, send: Send, now: float) -> Transmit | SendFailed:
        """Begin a send.

        Args:
            send: from :meth:`Replies.prepare`, :func:`upload_media` or
                :func:`acknowledge_interaction`.
            now: the caller's monotonic clock.

        Returns:
            Its first :class:`Transmit`; a :class:`SendFailed` (0 attempts) when pacing would
            push it past its reply window.
        """
        if not isinstance(send, Send):
            raise LocalProtocolError("start a Send")
        now = _number("now", now)
        deadline = now + self._config.max_elapsed
        if send.window_left is not None:
            deadline = min(deadline, now + max(0.0, send.window_left))
        ticket = self._next_ticket
        self._next_ticket += 1
        t = self._tickets[ticket] = _Ticket(send=send, deadline=deadline, attempt=0)
        return self._schedule(ticket, t, now, now, refresh=False, error=None)

    def answered(
        self,
        transmit: Transmit,
        now: float,
        *,
        status: int,
        body: object,
        headers: Mapping[str, str] | None = None,
    ) -> Transmit | SendDelivered | SendFailed:
        """Report the answer to a :class:`Transmit`.

        Args:
            transmit: the attempt that was made.
            now: the caller's monotonic clock.
            status: the HTTP status.
            body: the body parsed as JSON, or ``None`` when empty or not JSON.
            headers: the response headers.
        """
        t = self._current(transmit)
        now = _number("now", now)
        if type(status) is not int or not 100 <= status <= 599:
            raise LocalProtocolError("status must be an int HTTP status")
        code = _body_code(body)
        if 200 <= status < 300 and code in (None, 0):
            # The body came from a JSON parser, by contract.
            return self._delivered(transmit.ticket, t, cast("JSONValue", body))
        if 200 <= status < 300 and code in _AUDIT_CODES and isinstance(body, dict):
            data = body.get("data")
            review = data.get("message_audit") if isinstance(data, dict) else None
            found = review.get("audit_id") if isinstance(review, dict) else None
            audit = found if isinstance(found, str) else None
            review_body = cast("JSONValue", body)
            return self._delivered(
                transmit.ticket, t, review_body, under_review=True, audit_id=audit
            )
        request = t.send.request
        error = classify_api_error(status, body, headers, method=request.method, path=request.path)
        return self._after_error(transmit.ticket, t, error, now)

    def unanswered(self, transmit: Transmit, now: float, *, sent: bool) -> Transmit | SendFailed:
        """Report a :class:`Transmit` that got no answer (refused connection, reset, timeout).

        Args:
            transmit: the attempt.
            now: the caller's monotonic clock.
            sent: whether the request may have been written out. ``False`` only when it
                surely was not (the connection failed before): then any send may retry.
        """
        t = self._current(transmit)
        now = _number("now", now)
        if type(sent) is not bool:
            raise LocalProtocolError("sent must be a bool")
        if sent:
            t.maybe_delivered = True
            if not t.send.retry_safe:
                reason = "no answer came, and a retry could deliver it twice"
                return self._fail(transmit.ticket, t, reason, None)
        t.failures += 1
        return self._retry(transmit.ticket, t, now, self._backoff(t), error=None)

    def abandon(self, transmit: Transmit) -> None:
        """Forget a send (the caller gave it up); later reports about it are refused."""
        self._current(transmit)
        del self._tickets[transmit.ticket]

    # ------------------------------------------------------------------------ internals

    def _current(self, transmit: object) -> _Ticket:
        if not isinstance(transmit, Transmit):
            raise LocalProtocolError("report a Transmit from this Outbox")
        t = self._tickets.get(transmit.ticket)
        if t is None:
            raise LocalProtocolError("this send is finished, abandoned or not from here")
        if transmit.attempt != t.attempt:
            raise LocalProtocolError("this attempt was reported already")
        return t

    def _after_error(
        self, ticket: int, t: _Ticket, error: ApiError, now: float
    ) -> Transmit | SendDelivered | SendFailed:
        kind = error.kind
        if kind is ApiErrorKind.DUPLICATE:
            # Only a duplicate of a try that may have got through is that try's delivery;
            # otherwise the pair was used before (a replayed message, a restart).
            if t.maybe_delivered:
                return self._delivered(ticket, t, None, duplicate=True)
            return self._fail(ticket, t, "the platform has a message with this msg_seq", error)
        if kind is ApiErrorKind.AUTH and not t.refreshed:
            t.refreshed = True
            return self._retry(ticket, t, now, 0.0, error=error, refresh=True)
        if kind is ApiErrorKind.RATE_LIMITED:
            # Refused before it was processed: a retry is safe whatever the send.
            t.failures += 1
            delay = max(error.retry_after or 0.0, self._backoff(t))
            return self._retry(ticket, t, now, delay, error=error)
        if kind is ApiErrorKind.SERVER:
            if error.code is not None and error.code in _RETRY_ONCE:
                # A check that failed before the send was processed.
                if error.code in t.retried_codes:
                    return self._fail(ticket, t, "retried once, as the docs allow", error)
                t.retried_codes.add(error.code)
            else:
                t.maybe_delivered = True
                if not t.send.retry_safe:
                    return self._fail(ticket, t, "a retry could deliver it twice", error)
            t.failures += 1
            return self._retry(ticket, t, now, self._backoff(t), error=error)
        return self._fail(ticket, t, f"the platform refused it ({kind.value})", error)

    def _backoff(self, t: _Ticket) -> float:
        c = self._config
        return full_jitter_delay(t.failures, self._rng, base=c.backoff_base, cap=c.backoff_cap)

    def _retry(
        self,
        ticket: int,
        t: _Ticket,
        now: float,
        delay: float,
        *,
        error: ApiError | None,
        refresh: bool = False,
    ) -> Transmit | SendFailed:
        if t.attempt >= self._config.max_attempts:
            return self._fail(ticket, t, f"gave up after {t.attempt} attempts", error)
        return self._schedule(ticket, t, now, now + delay, refresh=refresh, error=error)

    def _schedule(
        self,
        ticket: int,
        t: _Ticket,
        now: float,
        earliest: float,
        *,
        refresh: bool,
        error: ApiError | None,
    ) -> Transmit | SendFailed:
        key, pacer = t.send.pace_key, self._pacer
        at = pacer.reserve(key, earliest, now) if key and pacer else earliest
        if at > t.deadline:
            if key and pacer:
                pacer.release(key, at)
            return self._fail(ticket, t, "no time left before the deadline or reply window", error)
        t.attempt += 1
        return Transmit(
            ticket=ticket, attempt=t.attempt, request=t.send.request, at=at, refresh_token=refresh
        )

    def _delivered(
        self,
        ticket: int,
        t: _Ticket,
        body: JSONValue,
        *,
        duplicate: bool = False,
        under_review: bool = False,
        audit_id: str | None = None,
    ) -> SendDelivered:
        del self._tickets[ticket]
        return SendDelivered(
            ticket=ticket,
            attempts=t.attempt,
            response=body,
            duplicate=duplicate,
            under_review=under_review,
            audit_id=audit_id,
        )

    def _fail(self, ticket: int, t: _Ticket, reason: str, error: ApiError | None) -> SendFailed:
        del self._tickets[ticket]
        if error is not None:
            error.maybe_delivered = t.maybe_delivered
        return SendFailed(
            ticket=ticket,
            attempts=t.attempt,
            reason=reason,
            error=error,
            maybe_delivered=t.maybe_delivered,
        )

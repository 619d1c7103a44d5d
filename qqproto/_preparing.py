# PREPARING: what a connection attempt needs before a socket is opened.
#
# An attempt needs an access token with enough life left, the gateway URL, and (to Identify
# rather than Resume) an identify permit from the limiter the shards share. The core asks
# for each in turn with a command (FetchToken, FetchGateway, RequestIdentifyPermit) and
# waits for the matching verb below; `_awaiting` names the one answer it takes. An answer
# that is no longer awaited (the attempt was abandoned, and said so with AbandonRequest) is
# ignored, so a late reply cannot push a later attempt forward. A failure backs off like a
# failed connection, or stops when the credentials are wrong.
"""The PREPARING phase: the token, the gateway URL and the identify permit."""

from __future__ import annotations

from typing import Literal

from qqproto._checks import check_start_limit, is_number, is_text, seconds
from qqproto._close_codes import (
    CREDENTIALS_REJECTED,
    DEADLINE,
    REQUEST_FAILED,
    REQUEST_UNAUTHORIZED,
)
from qqproto._errors import FailureKind, InvalidResponse, LocalProtocolError, RemoteProtocolError
from qqproto._lifecycle import Lifecycle, api
from qqproto._outputs import FetchGateway, FetchToken, RequestIdentifyPermit
from qqproto._reconnect import Exit
from qqproto._rest import SessionStartLimit, check_gateway_url, parse_expires_in
from qqproto._states import SessionState

__all__ = ["Preparing"]

_S = SessionState


class Preparing(Lifecycle):
    """The verbs that answer PREPARING's requests, its entry action and its deadline."""

    @api
    def provide_token(self, token: str, expires_in: float | str, now: float) -> None:
        """Hand over an access token after a :class:`FetchToken` (or any time: it is cached).

        Args:
            token: the access token, without the ``QQBot`` prefix.
            expires_in: its remaining life in seconds, as the API sent it (int or numeric
                string). A malformed value is reported as a ProtocolViolation and the token
                is used once.

        Raises:
            LocalProtocolError: ``token`` is empty or not a ``str``, or ``expires_in`` is not
                an int, a float or a ``str``.
        """
        if not is_text(token) or not token:
            raise LocalProtocolError("token must be a non-empty str")
        if not is_number(expires_in) and not is_text(expires_in):
            raise LocalProtocolError("expires_in must be an int, a float or a numeric str")
        now = self._clock(now)
        try:
            ttl = parse_expires_in(expires_in)
        except RemoteProtocolError as err:
            self._violation(err)
            ttl = 0.0
        self._token.provide(token, ttl, now)
        if self._awaiting == "token" and self._model.state is _S.PREPARING:
            self._token.fresh = True
            self._awaiting = None
            self._advance_preparing(now)

    @api
    def provide_gateway(
        self, url: str, now: float, *, session_start_limit: SessionStartLimit | None = None
    ) -> None:
        """Hand over the gateway URL (and, from ``/gateway/bot``, the session start limit).

        Raises:
            LocalProtocolError: ``url`` is not a ``ws://`` or ``wss://`` URL with a host and a
                valid port (:func:`~qqproto.check_gateway_url`; drivers that parse the answer
                with :func:`~qqproto.parse_gateway_response` never pass one), or
                ``session_start_limit`` is not a :class:`SessionStartLimit`.
        """
        try:
            check_gateway_url(url)
        except InvalidResponse as err:
            raise LocalProtocolError(str(err)) from None
        if session_start_limit is not None:
            check_start_limit(session_start_limit)
        now = self._clock(now)
        self._gateway_url = url
        if session_start_limit is not None:
            self._budget.update(session_start_limit, now)
        if self._awaiting == "gateway" and self._model.state is _S.PREPARING:
            self._awaiting = None
            self._advance_preparing(now)

    @api
    def grant_identify(self, now: float) -> None:
        """The identify limiter granted the permit asked for by :class:`RequestIdentifyPermit`.

        A permit that arrives when none is awaited (the attempt was abandoned) is ignored.
        """
        now = self._clock(now)
        if self._awaiting == "permit" and self._model.state is _S.PREPARING:
            self._budget.permit = True
            self._awaiting = None
            self._advance_preparing(now)

    @api
    def refuse_identify(self, reason: str, now: float, *, retry_after: float | None) -> None:
        """The identify limiter refused or failed the permit asked for.

        Args:
            reason: why, for events and logs (it must not hold a secret).
            now: the caller's clock.
            retry_after: seconds until a permit can be had (the daily budget resets then), or
                ``None`` when the limiter failed (its store is down, say). ``0`` backs off
                like a failure: "retry at once" must not become a tight loop.

        With ``retry_after`` the attempt waits exactly that long, a planned wait that
        :meth:`health` calls live; without it, it backs off like any failed attempt. A
        refusal that arrives when no permit is awaited is ignored.

        Raises:
            LocalProtocolError: ``reason`` is not a ``str`` or ``retry_after`` is negative or
                not a number.
        """
        if not is_text(reason):
            raise LocalProtocolError("reason must be a str")
        if retry_after is not None:
            retry_after = seconds("retry_after", retry_after)
        now = self._clock(now)
        if self._awaiting != "permit" or self._model.state is not _S.PREPARING:
            return
        self._awaiting = None
        self._exit = self._budget.refused(reason, retry_after)
        self._fire("prepare_failed", self._exit.reason)

    @api
    def request_failed(
        self,
        reason: str,
        now: float,
        *,
        request: Literal["token", "gateway"],
        kind: FailureKind,
    ) -> None:
        """The token or gateway request the core asked for failed (HTTP error, timeout...).

        Args:
            reason: goes into events and logs: it must not hold a secret.
            now: the caller's clock.
            request: which request failed; a late failure of a request the core no longer
                waits for (it gave up on it and said so with :class:`AbandonRequest`) is
                ignored.
            kind: what a retry can do (:func:`~qqproto.classify_status` and
                :class:`~qqproto.InvalidResponse` ``.kind`` tell): ``TRANSIENT`` backs off and
                retries, ``AUTH`` also fetches a fresh token first, ``FATAL`` (wrong app id
                or secret) stops with a :class:`FatalStop` instead of retrying forever.

        Raises:
            LocalProtocolError: an argument of the wrong type.
        """
        if not is_text(reason):
            raise LocalProtocolError("reason must be a str")
        if request not in ("token", "gateway"):
            raise LocalProtocolError("request must be 'token' or 'gateway'")
        if type(kind) is not FailureKind:
            raise LocalProtocolError("kind must be a FailureKind")
        now = self._clock(now)
        if request != self._awaiting or self._model.state is not _S.PREPARING:
            return
        self._awaiting = None
        policy = {
            FailureKind.TRANSIENT: REQUEST_FAILED,
            FailureKind.AUTH: REQUEST_UNAUTHORIZED,
            FailureKind.FATAL: CREDENTIALS_REJECTED,
        }[kind]
        self._exit = Exit(policy, None, f"{request} request failed: {reason}", by_server=True)
        self._fire("prepare_failed", self._exit.reason)

    # ------------------------------------------------------------------ entry, deadline

    def _enter_preparing(self, now: float) -> None:
        live = self._liveness
        if live.planned_until is not None:
            live.planned_until = None
            live.budget_from = now
        self._token.fresh = False
        self._budget.permit = False
        self._awaiting = None
        self._exit = None
        self._advance_preparing(now)

    def _advance_preparing(self, now: float) -> None:
        cfg = self._config
        token = self._token
        if token.needs_fetch(now, cfg.token_refresh_margin):
            self._await("token", now, FetchToken(force=token.force))
            return
        if self._gateway_url is None:
            self._await("gateway", now, FetchGateway(token=token.require()))
            return
        budget = self._budget
        if self._session is None and not budget.permit:
            exhausted = budget.exhausted(now)
            if exhausted is not None:
                self._gateway_url = None  # /gateway/bot tells the limit again
                self._exit = exhausted
                self._fire("prepare_failed", exhausted.reason)
                return
            permit = RequestIdentifyPermit(
                shard_id=cfg.shard[0], max_concurrency=budget.max_concurrency
            )
            self._await("permit", None, permit)
            return
        self._deadline = None
        self._fire("prepared", "token, gateway URL and permit ready")

    def _await(
        self,
        what: Literal["token", "gateway", "permit"],
        now: float | None,
        command: FetchToken | FetchGateway | RequestIdentifyPermit,
    ) -> None:
        # The permit wait has no core deadline: a fleet may queue for minutes, and the
        # socket is not open yet. The limiter is responsible for progress.
        self._awaiting = what
        self._deadline = None if now is None else now + self._config.http_timeout
        self._emit(command)

    def _request_overdue(self) -> None:
        reason = f"{self._awaiting} request took longer than {self._config.http_timeout:g} s"
        self._exit = Exit(DEADLINE, None, reason, by_server=False)
        self._fire("timer_expired", reason)

# Several bots behind one callback URL, as nonebot and satori route them: by X-Bot-Appid,
# refused before the body is read when the header names no bot served here.
"""WebhookRouter: one URL, several bots."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qqproto._errors import LocalProtocolError
from qqproto._webhook_answers import (
    WEBHOOK_MAX_BODY,
    WebhookResult,
    _check_endpoint,
    _header_map,
    _one,
    _reject,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from qqproto._webhook import WebhookReceiver

__all__ = ["WebhookRouter"]


class WebhookRouter:
    """Several bots on one URL: each request goes to the receiver its ``X-Bot-Appid`` names.

    Same interface as :class:`WebhookReceiver`. A request naming no bot, or one not served
    here, is refused with 403 before its body is read.

    Args:
        receivers: one receiver per bot (their app ids must differ).
        path: the callback path to serve, or ``None`` for any path.
        max_body: largest body accepted, checked before routing.
    """

    __slots__ = ("_max_body", "_receivers", "counts", "path")

    def __init__(
        self,
        receivers: Iterable[WebhookReceiver],
        *,
        path: str | None = None,
        max_body: int = WEBHOOK_MAX_BODY,
    ) -> None:
        self._receivers: dict[str, WebhookReceiver] = {}
        for receiver in receivers:
            if receiver.app_id in self._receivers:
                raise LocalProtocolError(f"two receivers for app id {receiver.app_id!r}")
            self._receivers[receiver.app_id] = receiver
        if not self._receivers:
            raise LocalProtocolError("a router needs at least one receiver")
        self.path = path
        """The served path, or ``None`` for any."""
        self._max_body = max_body
        self.counts: dict[str, int] = {}
        """Requests refused before reaching a receiver, by reason."""

    def __repr__(self) -> str:
        return f"WebhookRouter(app_ids={sorted(self._receivers)!r}, path={self.path!r})"

    @property
    def max_body(self) -> int:
        """Largest body accepted before routing, in bytes."""
        return self._max_body

    @property
    def receivers(self) -> Mapping[str, WebhookReceiver]:
        """The receivers by app id."""
        return self._receivers

    def _route(
        self,
        method: bytes | str,
        path: bytes | str,
        hmap: Mapping[str, list[str]],
        content_length: int | None,
    ) -> WebhookReceiver | WebhookResult:
        refused = _check_endpoint(method, path, content_length, self.path, self._max_body)
        if refused is not None:
            result = refused
        else:
            app_id = _one(hmap, "x-bot-appid")
            receiver = self._receivers.get(app_id) if app_id else None
            if receiver is not None:
                return receiver
            reason = "missing_app_id" if app_id is None else "unknown_app_id"
            result = _reject(403, reason, "X-Bot-Appid names no bot served here")
        reason = result.error.reason if result.error is not None else "rejected"
        self.counts[reason] = self.counts.get(reason, 0) + 1
        return result

    def precheck(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]],
        content_length: int | None,
    ) -> WebhookResult | None:
        """As :meth:`WebhookReceiver.precheck`, routed by ``X-Bot-Appid``."""
        pairs = list(headers)
        routed = self._route(method, path, _header_map(pairs), content_length)
        if isinstance(routed, WebhookResult):
            return routed
        return routed.precheck(
            method=method, path=path, headers=pairs, content_length=content_length
        )

    def receive(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]],
        body: bytes,
        now: float,
        wall_time: float | None = None,
        room: bool = True,
    ) -> WebhookResult:
        """As :meth:`WebhookReceiver.receive`, routed by ``X-Bot-Appid``."""
        pairs = list(headers)
        routed = self._route(method, path, _header_map(pairs), len(body))
        if isinstance(routed, WebhookResult):
            return routed
        return routed.receive(
            method=method,
            path=path,
            headers=pairs,
            body=body,
            now=now,
            wall_time=wall_time,
            room=room,
        )

# The webhook transport of a GatewayClient: where a WebSocket client runs shard drivers, a
# webhook client runs one of these. It serves the callback URL (WebhookServer over a
# WebhookInbox over the core's WebhookReceiver) and hands each verified event to the client's
# own queue, so that iteration, handlers, metrics and the JSON log are the same whichever
# transport brought the event.
#
# Backpressure, not loss. A WebSocket driver drops the newest event when the application
# falls behind (it cannot refuse a frame). A webhook can refuse: the front waits for room in
# the client's queue, the inbox fills up meanwhile, and the next callback is answered 503
# `{"op":12,"d":1}`, so the platform retries it later. An acknowledged event is never dropped.
"""The webhook endpoint that feeds a GatewayClient."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from qqproto import Health, WebhookOutcome, WebhookReceiver
from qqproto_io._logging import EventLogger
from qqproto_io._webhook import WebhookInbox, WebhookServer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qqproto import Event, SessionConfig, WebhookResult
    from qqproto_io._webhook import DeliveryClaims

__all__ = ["WebhookFront"]

log = logging.getLogger("qqproto_io.webhook")

STATE = "WEBHOOK"
"""The ``state`` of a webhook client's log records (it has no session state)."""


class WebhookFront:
    """One bot's callback endpoint, delivering into ``deliver``.

    Args:
        app_id: the bot's app id (``X-Bot-Appid`` must name it).
        secret: the bot secret (the signing key is derived from it).
        host: the address to listen on.
        port: the port (0: any free one).
        path: the callback path, or ``None`` for any.
        config: the session settings (dedup bounds, message types).
        queue_size: events held between the endpoint and ``deliver``.
        claims: a delivery record shared with other processes, or ``None``.
        deliver: awaited with each event, in order; waiting there is backpressure.
    """

    def __init__(
        self,
        *,
        app_id: str,
        secret: str,
        host: str,
        port: int,
        path: str | None,
        config: SessionConfig,
        queue_size: int,
        claims: DeliveryClaims | None,
        deliver: Callable[[Event], Awaitable[None]],
    ) -> None:
        receiver = WebhookReceiver(app_id=app_id, secret=secret, path=path, config=config)
        self.inbox = WebhookInbox(
            receiver, queue_size=queue_size, claims=claims, on_result=self._on_result
        )
        self.server = WebhookServer(self.inbox, host=host, port=port)
        self.listening = anyio.Event()
        """Set once the endpoint accepts connections (:attr:`url` is then final)."""
        self._deliver = deliver
        self._log_event = EventLogger(0)
        self._log_event.state = STATE
        self._closed = False

    @property
    def url(self) -> str:
        """``http://host:port`` of the endpoint (the real port once listening)."""
        return self.server.url

    def health(self) -> Health:
        """Ready while the endpoint listens (the platform's callbacks are what it waits for;
        their absence says nothing about this process)."""
        if self.listening.is_set() and not self._closed:
            return Health(live=True, ready=True, reason="", since_live=None, last_ack_age=None)
        reason = "the webhook endpoint is closed" if self._closed else "not listening yet"
        return Health(live=True, ready=False, reason=reason, since_live=None, last_ack_age=None)

    async def run(self) -> None:
        """Serve until :meth:`request_close`; the events queued by then are delivered."""
        async with self.inbox, self.server:
            self.listening.set()
            log.info("webhook endpoint listening on %s", self.url)
            async for _app_id, event in self.inbox:
                self._log_event(event)
                await self._deliver(event)
        log.info("webhook endpoint on %s closed", self.url)

    def request_close(self, *, end_session: bool = False) -> None:
        """Stop taking callbacks (new ones are refused once the server stops)."""
        del end_session  # a webhook has no session to end
        self._closed = True
        self.inbox.close()

    def _on_result(self, result: WebhookResult) -> None:
        error = result.error
        if error is not None:
            # A stranger's request, or a misconfigured proxy: worth a line, never a body.
            log.warning("webhook request refused: HTTP %d %s", error.status, error.reason)
        elif result.outcome is WebhookOutcome.QUEUE_FULL:
            log.warning("webhook: the application is behind; answered 503 to be retried")

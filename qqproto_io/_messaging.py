# Replies over HTTP: the core's Replies and Outbox, carried out with RestApi and TokenSource.
#
# Every decision is the core's: which endpoint and ids a reply carries and whether the
# platform would refuse it (Replies), when to make each try, whether a failed one may be
# retried without delivering twice, and what an answer means (Outbox). This module only
# waits until each Transmit's time, makes the call and reports what came back.
#
# Two clocks, as the core asks: Replies gets Unix time (the reply window counts from the
# message's own timestamp), the Outbox the event loop's clock (anyio.current_time(), so a
# test on a virtual clock paces and backs off on virtual time too).
"""Passive replies, media uploads and interaction acknowledgements over the OpenAPI."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from qqproto import (
    ApiError,
    InteractionResult,
    MessageBody,
    Outbox,
    Replies,
    SendDelivered,
    SendFailed,
    Transmit,
    acknowledge_interaction,
    read_upload,
    upload_media,
)
from qqproto_io._http import HttpFailure

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

    from qqproto import (
        Interaction,
        MediaType,
        Message,
        ReplyLimits,
        Send,
        SendConfig,
        UploadedMedia,
    )
    from qqproto_io._http import RestApi, TokenSource

__all__ = ["Messenger"]


class Messenger:
    """Sends replies, uploads and acknowledgements for one bot: a
    :class:`~qqproto.Responder`, which ``GatewayClient`` binds to the messages it hands out.

    One per bot: it remembers each replied-to message's replies and ``msg_seq``, and paces
    sends per guild channel across all callers.

    Args:
        api: the REST client.
        tokens: the access tokens (shared with the gateway sessions).
        rng: randomness for the retry jitter.
        limits: the reply windows and counts (default: ``ReplyLimits()``).
        config: retries and pacing (default: ``SendConfig()``).
        wall_clock: Unix time, for the reply windows (default: ``time.time``).
    """

    def __init__(
        self,
        api: RestApi,
        tokens: TokenSource,
        *,
        rng: random.Random,
        limits: ReplyLimits | None = None,
        config: SendConfig | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._tokens = tokens
        self._replies = Replies(limits)
        self._outbox = Outbox(config, rng=rng)
        self._wall_clock = wall_clock

    async def reply(self, target: Message | Interaction, body: str | MessageBody) -> SendDelivered:
        """Send ``body`` (text, or any :class:`~qqproto.MessageBody`) as a passive reply to
        ``target`` and return once the platform has it.

        Raises:
            ReplyRefused: the platform would refuse it; nothing was sent.
            ApiError: the platform refused it (after the retries the rules allow).
            HttpFailure: no answer came; ``sent`` says whether it may have been delivered.
        """
        if isinstance(body, str):
            body = MessageBody.text(body)
        send = self._replies.prepare(target, body, self._wall_clock())
        try:
            return await self.send(send)
        except ApiError as exc:
            if not exc.maybe_delivered:
                self._replies.cancel(send)  # surely not delivered: its reply is given back
            raise
        except HttpFailure as exc:
            if not exc.sent:
                self._replies.cancel(send)
            raise

    async def upload(
        self, target: Message | Interaction, url: str, file_type: MediaType
    ) -> UploadedMedia:
        """Have the platform fetch ``url`` for a rich-media reply in ``target``'s
        conversation (C2C and groups); send it with ``MessageBody.media(uploaded)``.

        Raises:
            ReplyRefused: a guild scene (no uploads there).
            ApiError, HttpFailure: as for :meth:`reply`.
            InvalidResponse: the answer has no usable ``file_info``.
        """
        delivered = await self.send(upload_media(target, url=url, file_type=file_type))
        return read_upload(delivered.response)

    async def acknowledge(
        self, interaction: Interaction, result: InteractionResult | None = None
    ) -> None:
        """Acknowledge a button click (``PUT /interactions/{id}``).

        Raises:
            ApiError, HttpFailure: as for :meth:`reply`.
        """
        await self.send(acknowledge_interaction(interaction, result or InteractionResult.SUCCESS))

    async def send(self, send: Send) -> SendDelivered:
        """Carry out any :class:`~qqproto.Send` (from :class:`~qqproto.Replies` and its kin)
        through the :class:`~qqproto.Outbox`: paced, retried, and delivered at most once.

        A caller that is cancelled abandons the send: no further try is made.

        Raises:
            ApiError: the platform's last answer, when it refused; ``maybe_delivered`` says
                when it may have been delivered all the same (a 5xx to a send that cannot
                be retried).
            HttpFailure: no answer came (``sent``: it may have been delivered).
        """
        step: Transmit | SendDelivered | SendFailed = self._outbox.start(send, anyio.current_time())
        try:
            while isinstance(step, Transmit):
                if step.at > anyio.current_time():
                    await anyio.sleep_until(step.at)
                step = await self._transmit(step)
        except BaseException:
            if isinstance(step, Transmit):
                self._outbox.abandon(step)
            raise
        if isinstance(step, SendFailed):
            raise _failure(step, send)
        return step

    async def _transmit(self, transmit: Transmit) -> Transmit | SendDelivered | SendFailed:
        outbox = self._outbox
        try:
            grant = await self._tokens.get(force=transmit.refresh_token)
        except HttpFailure:
            return outbox.unanswered(transmit, anyio.current_time(), sent=False)
        try:
            request = transmit.request
            answer = await self._api.call(
                request.method, request.path, token=grant.token, body=request.encode()
            )
        except HttpFailure as exc:
            return outbox.unanswered(transmit, anyio.current_time(), sent=exc.sent)
        return outbox.answered(
            transmit,
            anyio.current_time(),
            status=answer.status,
            body=answer.body,
            headers=answer.headers,
        )


def _failure(failed: SendFailed, send: Send) -> ApiError | HttpFailure:
    error = failed.error
    if error is not None:
        if error.maybe_delivered:
            error.add_note("an earlier try may have been delivered all the same")
        return error
    request = send.request
    tries = "try" if failed.attempts == 1 else "tries"
    return HttpFailure(
        f"{request.method} {request.path}: {failed.reason} ({failed.attempts} {tries})",
        sent=failed.maybe_delivered,
    )

# The platform's webhook side on loopback: POST signed callbacks to a bot's URL the way QQ
# does, including its retry of a slow or failed ack (same bytes, same envelope id), and run
# the console's op 13 validation. Everything a test needs to forge or replay is built with
# `qqproto.testing`'s sans-IO `WebhookSigner`; this module only does the HTTP.
"""Post signed webhook callbacks to a URL, like the QQ platform (for tests and demos)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self, TypeAlias

import anyio
import httpx

from qqproto.testing._fake_webhook import SignedRequest, WebhookRetryPolicy, WebhookSigner, is_ack

if TYPE_CHECKING:
    from types import TracebackType

    from qqproto import JSONValue
    from qqproto.testing import FakeGateway

__all__ = ["Attempt", "FakeWebhookPoster", "PostReport"]

log = logging.getLogger("qqproto_io.fake_webhook")

_FEED_QUEUE = 1000
_Sunk: TypeAlias = "tuple[str, JSONValue, str | None]"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One POST of a callback.

    Attributes:
        status: the HTTP status, or ``None`` when no answer came in time (or the link broke).
        body: the answer's body (empty without one).
        elapsed: seconds from sending to the answer (or to giving up).
    """

    status: int | None
    body: bytes
    elapsed: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PostReport:
    """Every attempt at one callback; ``acked`` when the last one was acknowledged."""

    attempts: tuple[Attempt, ...]
    acked: bool


class FakeWebhookPoster:
    """POSTs signed callbacks to ``url`` as the platform does; use as an async context.

    Args:
        url: the bot's callback URL.
        signer: builds and signs the requests (its app id and secret are the bot's).
        policy: how slow or failed acks are retried.
        client: an ``httpx.AsyncClient`` to use (yours to close), or ``None`` for one of ours.
    """

    def __init__(
        self,
        url: str,
        signer: WebhookSigner,
        *,
        policy: WebhookRetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        """Where callbacks go."""
        self.signer = signer
        """The request builder."""
        self.policy = policy if policy is not None else WebhookRetryPolicy()
        """The retry rule."""
        self._client = client
        self._own = client is None

    def __repr__(self) -> str:
        return f"FakeWebhookPoster({self.url!r}, {self.signer!r})"

    async def __aenter__(self) -> Self:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.policy.ack_timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._own and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("use FakeWebhookPoster as `async with`")
        return self._client

    async def post(self, request: SignedRequest) -> Attempt:
        """POST ``request`` once; a timeout or a broken link is an attempt without status."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.policy.ack_timeout):
                answer = await self._http().post(
                    self.url, content=request.body, headers=list(request.headers)
                )
        except (TimeoutError, httpx.HTTPError):
            return Attempt(status=None, body=b"", elapsed=time.perf_counter() - started)
        return Attempt(
            status=answer.status_code, body=answer.content, elapsed=time.perf_counter() - started
        )

    async def deliver(self, request: SignedRequest, *, resign: bool = False) -> PostReport:
        """POST ``request`` until it is acknowledged, retrying like the platform.

        ``resign`` signs each retry again with a later timestamp (whether the platform does
        is unknown); otherwise a retry is the same bytes.
        """
        attempts: list[Attempt] = []
        current = request
        for n in range(self.policy.attempts):
            if n:
                if self.policy.spacing:
                    await anyio.sleep(self.policy.spacing)
                if resign:
                    ts = int(current.header("X-Signature-Timestamp") or "0") + 1
                    current = self.signer.resign(current, timestamp=ts)
            attempt = await self.post(current)
            attempts.append(attempt)
            if attempt.status is not None and is_ack(attempt.status, attempt.body):
                return PostReport(attempts=tuple(attempts), acked=True)
        return PostReport(attempts=tuple(attempts), acked=False)

    async def validate(
        self,
        plain_token: str = "Arq0D5A61EgUu4OxUvOp",  # noqa: S107 - the official docs' example
        event_ts: str = "1725442341",
    ) -> bool:
        """Run the console's op 13 validation; True if the answer is correctly signed."""
        request = self.signer.validation(plain_token, event_ts)
        attempt = await self.post(request)
        if attempt.status is None:
            return False
        return self.signer.check_validation(request, attempt.status, attempt.body)

    async def feed(self, gateway: FakeGateway, *, validate: bool = False) -> None:
        """Be ``gateway``'s webhook transport: post each dispatch it makes from now on (its
        messages, ``user_message``, the control door's), signed, in order, each until it is
        acknowledged or the retries are spent. Runs until cancelled.

        With ``validate``, first run the console's validation (:meth:`validate`) and log its
        result; dispatches made meanwhile wait for it, none is lost."""
        send, receive = anyio.create_memory_object_stream[_Sunk](_FEED_QUEUE)

        def sink(t: str, d: JSONValue, event_id: str | None) -> None:
            try:
                send.send_nowait((t, d, event_id))
            except anyio.WouldBlock:
                log.warning(
                    "fake webhook: the bot is %d callbacks behind; one dropped", _FEED_QUEUE
                )

        gateway.webhook_sink = sink
        try:
            if validate:
                ok = await self.validate()
                log.info(
                    "fake webhook: validation of %s %s", self.url, "passed" if ok else "FAILED"
                )
            async with receive:
                async for t, d, event_id in receive:
                    report = await self.deliver(self.signer.dispatch(t, d, event_id=event_id))
                    if not report.acked:
                        log.warning(
                            "fake webhook: %s not acknowledged after %d tries",
                            t,
                            len(report.attempts),
                        )
        finally:
            gateway.webhook_sink = None
            send.close()

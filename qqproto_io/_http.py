# The HTTP calls of a bot: the access token, the gateway URL, and the OpenAPI (replies).
#
# httpx: a well-kept async client that runs on asyncio and trio alike (through anyio), with
# proxy support from the environment. Parsing the answers is the core's job
# (`qqproto.parse_token_response`, `parse_gateway_response`), and so is deciding what a
# failure means (`classify_status`, `InvalidResponse.kind`), so every driver reads them and
# reacts to them the same way.
#
# The server is a peer like any other: every call is bounded as a whole by `timeout` (httpx's
# own timeouts are per read, so a body trickled a byte at a time would never trip them), a
# body is read only up to `max_body_size`, and it is parsed by orjson, which refuses deep
# nesting instead of overflowing the stack. Nothing but HttpFailure (or cancellation) leaves
# a RestApi method, and no HttpFailure text holds the token, the secret or a body.
#
# `TokenSource` is shared by all shards of a process: one fetch at a time (single flight),
# and a cached token is handed out while it has more than the core's refresh margin left,
# so twenty shards reconnecting together make one request, not twenty.
"""Token and gateway-URL requests over httpx, and a shared single-flight token source."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import anyio
import httpx
import orjson

from qqproto import (
    FailureKind,
    GatewayInfo,
    InvalidResponse,
    QQProtoError,
    TokenGrant,
    classify_status,
    read_gateway_answer,
    read_token_answer,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from qqproto import JSONValue

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_TOKEN_URL",
    "SANDBOX_API_BASE",
    "ApiAnswer",
    "Credentials",
    "HttpFailure",
    "RestApi",
    "TokenSource",
]

DEFAULT_API_BASE = "https://api.sgroup.qq.com"
"""The production REST base (``/gateway/bot`` and the OpenAPI)."""
SANDBOX_API_BASE = "https://sandbox.api.sgroup.qq.com"
"""The sandbox REST base, for bots that are not listed yet (``qqproto run --sandbox``)."""
DEFAULT_TOKEN_URL = "https://bots.qq.com/app/getAppAccessToken"  # noqa: S105 - a URL
"""The endpoint that exchanges the app id and client secret for an access token."""
DEFAULT_MAX_BODY_SIZE = 4 << 20
"""Largest response body read, in bytes (these endpoints answer a few hundred)."""

_T = TypeVar("_T")
# httpx errors raised before a byte of the request is written: even a send that must not be
# repeated may be retried after one of these.
_BEFORE_SENDING = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
)


class HttpFailure(QQProtoError):
    """A token, gateway or OpenAPI request failed; the message is safe to log (no secret).

    Attributes:
        kind: what a retry can do about it, by the core's rules (pass it on to
            :meth:`~qqproto.GatewayConnection.request_failed`).
        sent: whether the request may have reached the server. ``False`` only when it
            surely did not (the connection, the proxy or the token fetch failed before it
            was written), so that even a send that must not be repeated may be retried.
    """

    def __init__(
        self, message: str, *, kind: FailureKind = FailureKind.TRANSIENT, sent: bool = True
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.sent = sent


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """What the OpenAPI answered to :meth:`RestApi.call`, whatever the status.

    Attributes:
        status: the HTTP status.
        headers: the response headers, names in lower case.
        body: the body parsed as JSON; ``None`` when empty or not JSON. Not in the repr.
    """

    status: int
    headers: Mapping[str, str]
    body: JSONValue = field(repr=False)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The bot's app id and client secret. The secret is never in the repr."""

    app_id: str
    client_secret: str = field(repr=False)


class _NotJSON:
    """A body that did not parse (distinct from the JSON ``null``)."""


_NOT_JSON = _NotJSON()


class RestApi:
    """The QQ REST endpoints a gateway session uses.

    Args:
        credentials: app id and client secret.
        api_base: REST base (production, sandbox, or a local fake).
        token_url: the token endpoint.
        timeout: bound on each call as a whole (connect, send, headers and body), in
            seconds; ``fetch_gateway`` with its fallback counts as one call.
        proxy: an ``http://`` proxy URL, or ``None`` to follow the environment.
        max_body_size: the largest response body read, in bytes; a longer one fails.
        transport: send the requests through this httpx transport instead of sockets (a
            :class:`~qqproto_io.Network`'s); ``proxy`` and the environment are then unused.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        api_base: str = DEFAULT_API_BASE,
        token_url: str = DEFAULT_TOKEN_URL,
        timeout: float = 30.0,
        proxy: str | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._credentials = credentials
        self._api_base = api_base.rstrip("/")
        self._token_url = token_url
        self._timeout = timeout
        self._max_body = max_body_size
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            proxy=proxy if transport is None else None,
            trust_env=proxy is None and transport is None,
            transport=transport,
            # A compressed body is inflated a whole network read at a time, before the size
            # bound can look at it; these answers are small enough to come as they are.
            headers={"Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def fetch_token(self) -> TokenGrant:
        """``POST getAppAccessToken``.

        Raises:
            HttpFailure: transport error, timeout, a status outside 2xx, an error ``code``
                in the body (``kind`` from the core's rules: wrong credentials are
                ``FATAL``), or an unusable body.
        """
        what = f"POST {_path(self._token_url)}"
        return await self._bounded(what, self._fetch_token)

    async def fetch_gateway(self, token: str) -> GatewayInfo:
        """``GET /gateway/bot``, falling back to ``GET /gateway`` when it fails.

        There is no fallback when the token was refused (HTTP 401: ``kind`` is ``AUTH``):
        the other endpoint would only refuse it too. Both calls share one ``timeout``.

        Raises:
            HttpFailure: the call (or both) failed.
        """
        what = f"GET {_path(self._api_base)}/gateway/bot"
        return await self._bounded(what, partial(self._fetch_gateway, token))

    async def request(
        self, method: str, path: str, *, token: str, json: JSONValue = None
    ) -> JSONValue:
        """Call the bot OpenAPI (``POST /v2/users/{openid}/messages``, ...) with ``token``.

        Args:
            method: the HTTP method.
            path: the path under the REST base, starting with ``/``.
            token: the access token (``Authorization: QQBot <token>``).
            json: the request body, if any.

        Returns:
            The response body parsed as JSON (``None`` for an empty body).

        Raises:
            HttpFailure: a transport error, a timeout, a status outside 2xx, or a body that
                is not JSON. Its message names the method, path and status, never the body
                or token.
        """
        url = f"{self._api_base}{path}"
        what = f"{method} {_path(url)}"
        return await self._bounded(what, partial(self._request, what, method, url, token, json))

    async def call(
        self, method: str, path: str, *, token: str, body: bytes | None = None
    ) -> ApiAnswer:
        """Make one OpenAPI call and return its answer, whatever the status: what it means
        is the core's business (:meth:`qqproto.Outbox.answered`,
        :func:`qqproto.classify_api_error`).

        Args:
            method: the HTTP method.
            path: the path under the REST base, starting with ``/``.
            token: the access token.
            body: the JSON body, encoded (:meth:`qqproto.ApiRequest.encode`), if any.

        Raises:
            HttpFailure: no answer came (``sent`` says whether the request may have been
                written out), or it was larger than ``max_body_size``.
        """
        url = f"{self._api_base}{path}"
        what = f"{method} {_path(url)}"
        return await self._bounded(what, partial(self._call, what, method, url, token, body))

    # ------------------------------------------------------------------- the calls

    async def _call(
        self, what: str, method: str, url: str, token: str, body: bytes | None
    ) -> ApiAnswer:
        headers = self._auth(token)
        if body is not None:
            headers["Content-Type"] = "application/json"
        status, answer_headers, content = await self._exchange(
            what, method, url, content=body, headers=headers
        )
        data = _loads(content)
        return ApiAnswer(status, answer_headers, None if isinstance(data, _NotJSON) else data)

    async def _fetch_token(self) -> TokenGrant:
        what = f"POST {_path(self._token_url)}"
        body: JSONValue = {
            "appId": self._credentials.app_id,
            "clientSecret": self._credentials.client_secret,
        }
        status, _, content = await self._exchange(what, "POST", self._token_url, json=body)
        data = _loads(content)
        if isinstance(data, _NotJSON) and 200 <= status < 300:
            raise HttpFailure(f"{what}: body is not JSON")
        try:
            return read_token_answer(status, None if isinstance(data, _NotJSON) else data)
        except InvalidResponse as exc:
            raise HttpFailure(f"{what}: {exc}", kind=exc.kind) from None

    async def _fetch_gateway(self, token: str) -> GatewayInfo:
        headers = self._auth(token)
        try:
            return await self._gateway("/gateway/bot", headers)
        except HttpFailure as exc:
            if exc.kind is not FailureKind.TRANSIENT:
                raise
        return await self._gateway("/gateway", headers)

    async def _gateway(self, path: str, headers: Mapping[str, str]) -> GatewayInfo:
        url = f"{self._api_base}{path}"
        what = f"GET {_path(url)}"
        status, _, content = await self._exchange(what, "GET", url, headers=headers)
        data = _loads(content) if 200 <= status < 300 else None
        if isinstance(data, _NotJSON):
            raise HttpFailure(f"{what}: body is not JSON")
        try:
            return read_gateway_answer(status, data)
        except InvalidResponse as exc:
            raise HttpFailure(f"{what}: {exc}", kind=exc.kind) from None

    async def _request(
        self, what: str, method: str, url: str, token: str, json: JSONValue
    ) -> JSONValue:
        status, _, content = await self._exchange(
            what, method, url, json=json, headers=self._auth(token)
        )
        if not 200 <= status < 300:
            raise HttpFailure(f"{what}: HTTP {status}", kind=classify_status(status))
        data = _loads(content)
        if isinstance(data, _NotJSON):
            raise HttpFailure(f"{what}: body is not JSON")
        return data

    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"QQBot {token}", "X-Union-Appid": self._credentials.app_id}

    # -------------------------------------------------------------- the boundary

    async def _bounded(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()`` within ``timeout`` as a whole; whatever else it raises is HttpFailure."""
        with anyio.move_on_after(self._timeout):
            try:
                return await call()
            except HttpFailure:
                raise
            except Exception as exc:  # noqa: BLE001 - the documented contract is HttpFailure
                # By type alone: an exception's text may quote what it choked on.
                raise HttpFailure(f"{what}: {type(exc).__name__}") from None
        raise HttpFailure(f"{what}: timed out after {self._timeout:g} s")

    async def _exchange(
        self,
        what: str,
        method: str,
        url: str,
        *,
        json: JSONValue = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """The status, headers and body (at most ``max_body_size`` bytes) of one request."""
        try:
            async with self._client.stream(
                method, url, json=json, content=content, headers=headers
            ) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self._max_body:
                    raise HttpFailure(f"{what}: body larger than {self._max_body} bytes")
                chunks: list[bytes] = []
                size = 0
                with anyio.CancelScope() as reading:
                    # Raw: we ask for no encoding (identity), and a decoder that fails on a
                    # body sent gzipped anyway would raise between httpx's nested
                    # generators, leaving the inner ones suspended (a ResourceWarning on
                    # trio). Undecoded, such a body is simply not JSON.
                    async for chunk in response.aiter_raw():
                        size += len(chunk)
                        if size > self._max_body:
                            # Not break: that would leave httpx's nested async generators
                            # suspended (a ResourceWarning on trio). Cancelled at its next
                            # read, the innermost one unwinds them all.
                            chunks.clear()
                            reading.cancel()
                        elif not reading.cancel_called:
                            chunks.append(chunk)
                if size > self._max_body:
                    raise HttpFailure(f"{what}: body larger than {self._max_body} bytes")
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
                return response.status_code, answer_headers, b"".join(chunks)
        except httpx.HTTPError as exc:
            # httpx messages name the URL and the error, never the body or headers; the
            # type says enough.
            sent = not isinstance(exc, _BEFORE_SENDING)
            raise HttpFailure(f"{what}: {type(exc).__name__}", sent=sent) from None


def _loads(content: bytes) -> JSONValue | _NotJSON:
    if not content:
        return None
    try:
        data: JSONValue = orjson.loads(content)
    except orjson.JSONDecodeError:
        return _NOT_JSON
    return data


def _path(url: str) -> str:
    try:
        return httpx.URL(url).path
    except Exception:  # noqa: BLE001 - only ever used to word an error
        return "<invalid URL>"


class TokenSource:
    """One access token for every shard of a process, fetched one at a time.

    The lock is held during a fetch, so waiting callers share its result; that never
    wedges them, because a fetch is bounded by the API's ``timeout`` and a caller cancelled
    mid-fetch releases the lock (the next caller then fetches anew).

    Args:
        api: where tokens come from.
        refresh_margin: a cached token with less life left than this is not handed out
            (the core's ``token_refresh_margin``).
    """

    def __init__(self, api: RestApi, *, refresh_margin: float = 60.0) -> None:
        self._api = api
        self._margin = refresh_margin
        self._lock = anyio.Lock()
        self._token: str | None = None
        self._expires_at = float("-inf")
        self._fetched_at = float("-inf")

    async def get(self, *, force: bool = False) -> TokenGrant:
        """A token and its remaining life.

        With ``force``, a token fetched before this call started is not reused (the server
        rejected it), but one fetched meanwhile by another shard is.
        """
        asked_at = anyio.current_time()
        async with self._lock:
            now = anyio.current_time()
            fresh = self._token is not None and self._expires_at - now > self._margin
            if self._token is not None and (
                (force and self._fetched_at >= asked_at) or (not force and fresh)
            ):
                return TokenGrant(self._token, max(0.0, self._expires_at - now))
            grant = await self._api.fetch_token()
            self._token = grant.token
            self._fetched_at = anyio.current_time()
            self._expires_at = self._fetched_at + grant.expires_in
            return grant

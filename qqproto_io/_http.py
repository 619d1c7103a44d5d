# The two HTTP calls a gateway session needs: the access token and the gateway URL.
#
# httpx: a well-kept async client that runs on asyncio and trio alike (through anyio), with
# per-request timeouts and proxy support from the environment. Parsing the answers is the
# core's job (`qqproto.parse_token_response`, `parse_gateway_response`), so every driver
# reads them the same way.
#
# `TokenSource` is shared by all shards of a process: one fetch at a time (single flight),
# and a cached token is handed out while it has more than the core's refresh margin left,
# so twenty shards reconnecting together make one request, not twenty.
"""Token and gateway-URL requests over httpx, and a shared single-flight token source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import httpx

from qqproto import (
    GatewayInfo,
    InvalidResponse,
    TokenGrant,
    parse_gateway_response,
    parse_token_response,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qqproto import JSONValue

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_TOKEN_URL",
    "SANDBOX_API_BASE",
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


class HttpFailure(Exception):
    """A token or gateway request failed; the message is safe to log (no secret)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """The bot's app id and client secret. The secret is never in the repr."""

    app_id: str
    client_secret: str = field(repr=False)


class RestApi:
    """The QQ REST endpoints a gateway session uses.

    Args:
        credentials: app id and client secret.
        api_base: REST base (production, sandbox, or a local fake).
        token_url: the token endpoint.
        timeout: bound on each request, in seconds.
        proxy: an ``http://`` proxy URL, or ``None`` to follow the environment.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        api_base: str = DEFAULT_API_BASE,
        token_url: str = DEFAULT_TOKEN_URL,
        timeout: float = 30.0,
        proxy: str | None = None,
    ) -> None:
        self._credentials = credentials
        self._api_base = api_base.rstrip("/")
        self._token_url = token_url
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), proxy=proxy, trust_env=proxy is None
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def fetch_token(self) -> TokenGrant:
        """``POST getAppAccessToken``.

        Raises:
            HttpFailure: transport error, a status outside 2xx, or an unusable body.
        """
        body: JSONValue = {
            "appId": self._credentials.app_id,
            "clientSecret": self._credentials.client_secret,
        }
        data = await self._call("POST", self._token_url, json=body)
        try:
            return parse_token_response(data)
        except InvalidResponse as exc:
            raise HttpFailure(f"token: {exc}") from None

    async def fetch_gateway(self, token: str) -> GatewayInfo:
        """``GET /gateway/bot``, falling back to ``GET /gateway`` when it is refused.

        Raises:
            HttpFailure: both failed.
        """
        headers = self._auth(token)
        try:
            data = await self._call("GET", f"{self._api_base}/gateway/bot", headers=headers)
            return parse_gateway_response(data)
        except (HttpFailure, InvalidResponse):
            data = await self._call("GET", f"{self._api_base}/gateway", headers=headers)
        try:
            return parse_gateway_response(data)
        except InvalidResponse as exc:
            raise HttpFailure(f"gateway: {exc}") from None

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
            HttpFailure: a transport error, a status outside 2xx, or a body that is not JSON.
                Its message names the method, path and status, never the body or token.
        """
        url = f"{self._api_base}{path}"
        return await self._call(method, url, json=json, headers=self._auth(token))

    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"QQBot {token}", "X-Union-Appid": self._credentials.app_id}

    async def _call(
        self,
        method: str,
        url: str,
        *,
        json: JSONValue = None,
        headers: Mapping[str, str] | None = None,
    ) -> JSONValue:
        try:
            response = await self._client.request(method, url, json=json, headers=headers)
        except httpx.HTTPError as exc:
            # httpx messages name the URL and the error, never the body or headers.
            raise HttpFailure(f"{method} {_path(url)}: {type(exc).__name__}") from None
        if not 200 <= response.status_code < 300:
            raise HttpFailure(f"{method} {_path(url)}: HTTP {response.status_code}")
        if not response.content:
            return None
        try:
            data: JSONValue = response.json()
        except ValueError:
            raise HttpFailure(f"{method} {_path(url)}: body is not JSON") from None
        return data


def _path(url: str) -> str:
    return httpx.URL(url).path


class TokenSource:
    """One access token for every shard of a process, fetched one at a time.

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
        self.fetches = 0

    @property
    def current(self) -> str | None:
        """The last token fetched, or ``None`` (never logged; for diagnostics and tests)."""
        return self._token

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
            self.fetches += 1
            self._token = grant.token
            self._fetched_at = anyio.current_time()
            self._expires_at = self._fetched_at + grant.expires_in
            return grant

# Where the client's bytes go. By default: real sockets (through a proxy when one is set) for
# the gateway, and httpx's own connection pool for HTTP. A `Network` replaces both at once,
# so that a test can run the very same client (its transports, its h11 and wsproto code, its
# REST client) over in-memory streams, on a virtual clock.
"""The seam between the client and the network."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import httpx
    from anyio.abc import ByteStream

__all__ = ["Network"]


class Network(Protocol):
    """What a :class:`~qqproto_io.GatewayClient` connects through, instead of sockets.

    ``GatewayClient(network=...)`` uses it for every gateway connection and every HTTP
    request (token, gateway URL, replies); proxies are then not used.
    """

    async def connect(self, host: str, port: int, *, tls: bool) -> ByteStream:
        """A byte stream to ``host:port`` (``tls``: the URL was ``wss://``)."""
        ...

    def http_transport(self) -> httpx.AsyncBaseTransport:
        """The httpx transport the REST client sends its requests through."""
        ...

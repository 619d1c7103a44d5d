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

__all__ = ["Network", "parse_address"]


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


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as a pair.

    Raises:
        ValueError: not ``HOST:PORT``, or a port outside 0-65535.
    """
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)

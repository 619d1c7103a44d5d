# Opening a byte stream to the gateway, directly or through an HTTP CONNECT proxy.
#
# Many QQ bot operators sit behind Clash/Mihomo or a corporate proxy (hermes honours
# HTTPS_PROXY/ALL_PROXY). We speak plain HTTP CONNECT with h11 parsing the proxy's answer,
# then start TLS to the real host through the tunnel, so the proxy never sees the token.
# SOCKS is not supported: Clash and Mihomo expose an HTTP port as well.
#
# A proxy is a peer like any other: whatever it answers ends in ProxyError (an OSError),
# never in an h11 exception, and its answer is read only up to a small size. Error texts
# never quote h11's messages: those repeat header values, ours (Proxy-Authorization)
# included, and the proxy's bytes. Every failure after the socket opened closes it.
"""Direct and HTTP-CONNECT-proxied stream opening, with NO_PROXY rules."""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import anyio
import h11
from anyio.streams.tls import TLSStream

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping

    from anyio.abc import ByteStream

__all__ = ["ProxyConfig", "ProxyError", "open_stream", "proxy_from_env"]


class ProxyError(OSError):
    """The proxy refused or garbled the CONNECT."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """An HTTP proxy for CONNECT tunnels.

    Attributes:
        host: the proxy's host.
        port: the proxy's port.
        authorization: a ``Proxy-Authorization`` value built from the URL's user info; kept
            out of the repr.
        no_proxy: host suffixes (and ``*``) that bypass the proxy.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_url(cls, url: str, *, no_proxy: tuple[str, ...] = ()) -> ProxyConfig:
        """Parse ``http://[user:pass@]host:port``.

        Raises:
            ValueError: not an http:// URL with a host.
        """
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "") or not parts.hostname:
            raise ValueError("proxy must be an http://host:port URL (HTTP CONNECT)")
        auth = None
        if parts.username is not None:
            raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = "Basic " + base64.b64encode(raw).decode()
        return cls(parts.hostname, parts.port or 8080, auth, no_proxy)

    def applies_to(self, host: str) -> bool:
        """False when ``host`` matches a NO_PROXY entry (or is loopback)."""
        if host == "localhost" or _is_loopback(host):
            return False
        host = host.lower().rstrip(".")
        for entry in self.no_proxy:
            rule = entry.lower().strip().lstrip(".")
            if rule in ("*", host) or host.endswith("." + rule):
                return False
        return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_from_env(environ: Mapping[str, str] | None = None) -> ProxyConfig | None:
    """The proxy named by ``HTTPS_PROXY``/``ALL_PROXY`` (either case), with ``NO_PROXY``."""
    env = os.environ if environ is None else environ
    url = None
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if env.get(name):
            url = env[name]
            break
    if url is None:
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    rules = tuple(r for r in (x.strip() for x in no_proxy.split(",")) if r)
    return ProxyConfig.from_url(url, no_proxy=rules)


async def open_stream(
    host: str,
    port: int,
    *,
    tls: bool,
    ssl_context: ssl.SSLContext | None,
    proxy: ProxyConfig | None,
) -> ByteStream:
    """A byte stream to ``host:port``: through ``proxy`` if it applies, TLS if asked.

    Args:
        host: the host to reach.
        port: its port.
        tls: start TLS to ``host`` (through the tunnel, if there is one).
        ssl_context: the TLS settings, or ``None`` for the system defaults.
        proxy: the HTTP CONNECT proxy, or ``None``.

    Raises:
        ProxyError: the proxy refused, garbled or cut the CONNECT.
        OSError: the connection or the TLS handshake failed (``ssl.SSLError`` is one).
        anyio.BrokenResourceError: the link broke during the TLS handshake.
    """
    if proxy is not None and proxy.applies_to(host):
        stream: ByteStream = await _connect_tunnel(proxy, host, port)
        if tls:
            try:
                stream = await TLSStream.wrap(
                    stream, hostname=host, ssl_context=ssl_context, standard_compatible=False
                )
            except BaseException:
                # Forcefully: under cancellation a plain aclose() would not close at all.
                await anyio.aclose_forcefully(stream)
                raise
        return stream
    # anyio closes the socket itself when its own TLS handshake fails.
    if tls:
        return await anyio.connect_tcp(host, port, tls=True, ssl_context=ssl_context)
    return await anyio.connect_tcp(host, port)


async def _connect_tunnel(proxy: ProxyConfig, host: str, port: int) -> ByteStream:
    stream = await anyio.connect_tcp(proxy.host, proxy.port)
    try:
        await _send_connect(stream, proxy, host, port)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    return stream


_MAX_CONNECT_ANSWER = 16 * 1024
"""Bytes of a proxy's answer to CONNECT read at most (a real one is a few hundred)."""


async def _send_connect(stream: ByteStream, proxy: ProxyConfig, host: str, port: int) -> None:
    authority = f"{host}:{port}"
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_CONNECT_ANSWER)
    headers = [("Host", authority)]
    if proxy.authorization is not None:
        headers.append(("Proxy-Authorization", proxy.authorization))
    try:
        request = conn.send(h11.Request(method="CONNECT", target=authority, headers=headers))
    except h11.LocalProtocolError:
        raise ProxyError(f"cannot write a CONNECT request for {authority!r}") from None
    await stream.send(request)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            raise ProxyError("proxy sent a malformed answer to CONNECT") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_MAX_CONNECT_ANSWER)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                raise ProxyError("proxy closed the connection during CONNECT") from None
            received += len(data)
            if received > _MAX_CONNECT_ANSWER:
                raise ProxyError("proxy's answer to CONNECT is too long")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            if event.status_code != 200:
                raise ProxyError(f"proxy answered CONNECT with HTTP {event.status_code}")
            if conn.trailing_data[0]:
                # Both TLS and the WebSocket upgrade speak first: bytes from upstream
                # before we said anything are not the stream we asked for.
                raise ProxyError("proxy sent data before the tunnel was used")
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise ProxyError("proxy closed the connection during CONNECT")
        # An informational (1xx) answer: the real one follows, within the byte bound.

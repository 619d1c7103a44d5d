# Opening a byte stream to the gateway, directly or through an HTTP CONNECT or SOCKS5 proxy.
#
# Many QQ bot operators sit behind Clash/Mihomo or a corporate proxy, and Clash and Mihomo
# export ALL_PROXY=socks5://127.0.0.1:7890 by default, so both kinds must simply work. TLS to
# the real host is started through the tunnel, so the proxy never sees the token.
#
# SOCKS is python-socks' (well kept, anyio support). HTTP CONNECT stays ours, on h11:
# python-socks parses the proxy's answer from a single read, so an answer split across two
# TCP segments fails and bytes after the head are lost, and it does not bound the answer;
# ours reads until the head is complete, caps it, and was already hardened and tested
# against hostile proxies. The REST calls go through httpx, which speaks both (SOCKS with
# socksio).
#
# A proxy is a peer like any other: whatever it answers ends in ProxyError (an OSError),
# never in an h11 exception, and its answer is read only up to a small size. Error texts
# never quote h11's messages: those repeat header values, ours (Proxy-Authorization)
# included, and the proxy's bytes. Every failure after the socket opened closes it.
"""Direct and HTTP-CONNECT-proxied stream opening, with NO_PROXY rules."""

from __future__ import annotations

import base64
import ipaddress
import math
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
    """The proxy refused, garbled or cut the tunnel (its CONNECT or SOCKS handshake)."""


_DEFAULT_PORTS = {"http": 8080, "socks5": 1080, "socks5h": 1080}


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """A proxy to tunnel through: HTTP CONNECT or SOCKS5.

    Attributes:
        host: the proxy's host.
        port: the proxy's port.
        authorization: a ``Proxy-Authorization`` value built from the URL's user info (HTTP
            CONNECT); kept out of the repr.
        no_proxy: host suffixes (and ``*``) that bypass the proxy.
        scheme: ``"http"`` (CONNECT), ``"socks5"`` (names resolved here) or ``"socks5h"``
            (names resolved by the proxy).
        username: the SOCKS5 user name, if any.
        password: the SOCKS5 password, if any; kept out of the repr.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    no_proxy: tuple[str, ...] = ()
    scheme: str = "http"
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, *, no_proxy: tuple[str, ...] = ()) -> ProxyConfig:
        """Parse ``http://[user:pass@]host:port`` or ``socks5[h]://[user:pass@]host:port``.

        Raises:
            ValueError: another scheme (SOCKS4 included: the REST client cannot use it), no
                host, or a bad port.
        """
        parts = urlsplit(url if "://" in url else f"http://{url}")
        scheme = parts.scheme.lower() or "http"
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(
                "proxy must be http://host:port (CONNECT) or socks5://host:port "
                "(socks5h:// to resolve names at the proxy)"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError("proxy URL has an invalid port") from None
        if not parts.hostname:
            raise ValueError("proxy URL has no host")
        user = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password or "") if parts.username is not None else None
        auth = None
        if scheme == "http" and user is not None:
            raw = f"{user}:{password}".encode()
            auth = "Basic " + base64.b64encode(raw).decode()
        return cls(
            parts.hostname,
            port or _DEFAULT_PORTS[scheme],
            auth,
            no_proxy,
            scheme,
            user if scheme != "http" else None,
            password if scheme != "http" else None,
        )

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


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
"""The variables that name a proxy, in the order they are looked at."""


def proxy_from_env(environ: Mapping[str, str] | None = None) -> ProxyConfig | None:
    """The proxy named by ``HTTPS_PROXY``/``ALL_PROXY`` (either case), with ``NO_PROXY``."""
    env = os.environ if environ is None else environ
    url = None
    for name in PROXY_VARIABLES:
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
    """A byte stream to ``host:port``: through ``proxy`` if it applies (HTTP CONNECT or
    SOCKS5), TLS if asked.

    Args:
        host: the host to reach.
        port: its port.
        tls: start TLS to ``host`` (through the tunnel, if there is one).
        ssl_context: the TLS settings, or ``None`` for the system defaults.
        proxy: the proxy, or ``None``.

    Raises:
        ProxyError: the proxy refused, garbled or cut the CONNECT.
        OSError: the connection or the TLS handshake failed (``ssl.SSLError`` is one).
        anyio.BrokenResourceError: the link broke during the TLS handshake.
    """
    if proxy is not None and proxy.applies_to(host):
        stream: ByteStream
        if proxy.scheme == "http":
            stream = await _connect_tunnel(proxy, host, port)
        else:
            stream = await _connect_socks(proxy, host, port)
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


async def _connect_socks(proxy: ProxyConfig, host: str, port: int) -> ByteStream:
    from python_socks import ProxyError as SocksError  # noqa: PLC0415 - only with SOCKS
    from python_socks import ProxyType  # noqa: PLC0415
    from python_socks.async_.anyio import Proxy  # noqa: PLC0415

    socks = Proxy(
        ProxyType.SOCKS5,
        proxy.host,
        proxy.port,
        username=proxy.username,
        password=proxy.password,
        rdns=proxy.scheme == "socks5h",
    )
    try:
        # The caller bounds the whole open (DNS, proxy, TLS, upgrade); python-socks closes
        # the socket on every failure of its own.
        return await socks.connect(host, port, timeout=math.inf)
    except SocksError as exc:
        # Its message is the proxy's reply code in words; it never holds the password.
        raise ProxyError(f"SOCKS5 proxy refused the tunnel: {exc}") from None
    except (TimeoutError, EOFError, ValueError) as exc:
        raise ProxyError(f"SOCKS5 proxy failed: {type(exc).__name__}") from None


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

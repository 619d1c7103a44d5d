# SOCKS5, as Clash and Mihomo export it (ALL_PROXY=socks5://127.0.0.1:7890): the gateway's
# WebSocket and the REST calls both go through it. The proxy here is a small RFC 1928/1929
# server on loopback that resolves the test's made-up gateway name to 127.0.0.1, so the
# gateway is reachable only through it.
"""SOCKS5 proxies for the gateway and the REST calls."""

from __future__ import annotations

import ipaddress
import struct
from contextlib import asynccontextmanager

import anyio
import pytest

from qqproto import Dispatch, Ready, ReconnectScheduled, SessionState
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._proxy import ProxyConfig, proxy_from_env
from tests.loopback import anyio_backend, no_proxy_env  # noqa: F401 - fixtures
from tests.test_driver import BOUND, _pipe, gateway_config, running

pytestmark = pytest.mark.anyio


class Socks5:
    """A SOCKS5 server: no auth, or user/password when ``credentials`` are set."""

    def __init__(self, credentials: tuple[str, str] | None = None, *, refuse: bool = False):
        self.credentials = credentials
        self.refuse = refuse
        self.targets: list[str] = []
        self.logins: list[tuple[str, str]] = []
        self.port = 0

    @asynccontextmanager
    async def serve(self):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            yield self
            tg.cancel_scope.cancel()

    async def _read(self, stream, n: int, buffer: bytearray) -> bytes:
        while len(buffer) < n:
            buffer += await stream.receive()
        out = bytes(buffer[:n])
        del buffer[:n]
        return out

    async def _handle(self, client) -> None:
        buf = bytearray()
        async with client:
            try:
                _, count = await self._read(client, 2, buf)
                methods = await self._read(client, count, buf)
                want = 0x02 if self.credentials else 0x00
                if want not in methods:
                    await client.send(b"\x05\xff")
                    return
                await client.send(bytes([5, want]))
                if want == 0x02:
                    _, ulen = await self._read(client, 2, buf)
                    user = (await self._read(client, ulen, buf)).decode()
                    (plen,) = await self._read(client, 1, buf)
                    password = (await self._read(client, plen, buf)).decode()
                    self.logins.append((user, password))
                    ok = (user, password) == self.credentials
                    await client.send(b"\x01\x00" if ok else b"\x01\x01")
                    if not ok:
                        return
                _, cmd, _, atyp = await self._read(client, 4, buf)
                if atyp == 1:
                    host = str(ipaddress.IPv4Address(await self._read(client, 4, buf)))
                elif atyp == 3:
                    (length,) = await self._read(client, 1, buf)
                    host = (await self._read(client, length, buf)).decode()
                else:
                    await client.send(b"\x05\x08\x00\x01" + bytes(6))
                    return
                (port,) = struct.unpack("!H", await self._read(client, 2, buf))
                self.targets.append(f"{host}:{port}")
                if cmd != 1 or self.refuse:
                    await client.send(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
                    return
                address = "127.0.0.1" if host.endswith(".qqproto.test") else host
                async with await anyio.connect_tcp(address, port) as upstream:
                    await client.send(b"\x05\x00\x00\x01" + bytes(6))
                    if buf:
                        await upstream.send(bytes(buf))
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_pipe, client, upstream)
                        await _pipe(upstream, client)
                        tg.cancel_scope.cancel()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return


async def test_the_gateway_and_the_rest_calls_go_through_a_socks5_proxy():
    proxy = Socks5(("bot", "s3cret"))
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, proxy.serve():
            # A name the client cannot resolve: only the proxy can (socks5h).
            gateway = f"gateway.qqproto.test:{server.port}"
            server.gateway.config.url = f"ws://{gateway}/websocket"
            url = f"socks5h://bot:s3cret@127.0.0.1:{proxy.port}"
            async with running(server, proxy=url) as (client, rec):
                await rec.next(Ready)
                server.message(1)
                await rec.next(Dispatch)
                assert client.state is SessionState.READY
    assert gateway in proxy.targets
    # The REST calls (token, /gateway/bot) went through it too.
    assert f"127.0.0.1:{server.port}" in proxy.targets
    assert set(proxy.logins) == {("bot", "s3cret")}


async def test_a_refusing_socks_proxy_is_a_failed_attempt_not_a_crash():
    proxy = Socks5(refuse=True)
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, proxy.serve():
            server.gateway.config.url = f"ws://gateway.qqproto.test:{server.port}/websocket"
            # The REST calls are direct here (loopback); the WebSocket needs the proxy.
            async with running(server, proxy=None) as (client, rec):
                client.drivers[0]._proxy = ProxyConfig.from_url(f"socks5h://127.0.0.1:{proxy.port}")
                await rec.next(ReconnectScheduled, count=2)
                assert client.state is not SessionState.STOPPED
    closed = [e for e in rec.of(ReconnectScheduled) if "SOCKS5 proxy refused" in e.reason]
    assert closed, [e.reason for e in rec.of(ReconnectScheduled)]


def test_clash_default_export_is_understood():
    config = proxy_from_env({"ALL_PROXY": "socks5://127.0.0.1:7890"})
    assert config is not None
    assert (config.scheme, config.host, config.port) == ("socks5", "127.0.0.1", 7890)
    secret = ProxyConfig.from_url("socks5://me:pa55@127.0.0.1:7890")
    assert "pa55" not in repr(secret)
    with pytest.raises(ValueError, match="socks5://host:port"):
        ProxyConfig.from_url("socks4://127.0.0.1:1080")

# The two h11 steps both loopback servers (the fake gateway and the health endpoints) share:
# pull the next event, reading from the socket only when h11 asks for more, and frame one
# whole response. Routing, limits and error policy stay with each server.
"""Small h11 helpers shared by qqproto_io's HTTP servers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import h11

if TYPE_CHECKING:
    from anyio.abc import ByteReceiveStream

__all__ = ["next_http_event", "response_bytes"]


async def next_http_event(
    stream: ByteReceiveStream, conn: h11.Connection, *, read_size: int = 65536
) -> h11.Event | type[h11.NEED_DATA | h11.PAUSED]:
    """The next h11 event, reading ``read_size`` bytes at a time as needed.

    EOF and a broken connection are fed to h11 as end of data: it answers with
    ``ConnectionClosed``, or raises ``RemoteProtocolError`` in the middle of a request.
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(read_size)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = b""
        conn.receive_data(data)


def response_bytes(
    conn: h11.Connection,
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """One complete response (head, body, end) as h11 frames it."""
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out

"""The frame splitter (qqproto_io._frames) against wsproto, the reference, on the same bytes.

Whatever the frames and however the stream is cut into reads, the splitter plus a wsproto
fed its Raw pieces must report exactly what wsproto alone reports: the same messages in the
same order, the same pings and pongs, the same close (code and reason) at the same point.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from qqproto_io._frames import FrameSplitter, Raw


def open_client() -> WSConnection:
    """A wsproto client past its handshake, with nothing buffered."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="example.test", target="/")))
    request = next(server.events())
    assert isinstance(request, Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return client


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    form: int | None = None,
) -> bytes:
    """One frame; ``form`` forces the length encoding (7, 16 or 64 bits), minimal or not."""
    n = len(payload)
    if form is None:
        form = 7 if n < 126 else 16 if n < 1 << 16 else 64
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask is not None else 0
    if form == 7:
        head = struct.pack("!BB", b0, m | n)
    elif form == 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def _outcome(event: object, pieces: list[str | bytes], out: list[tuple[object, ...]]) -> bool:
    """Record one wsproto event; True once the connection is closed."""
    if isinstance(event, TextMessage | BytesMessage):
        pieces.append(event.data)
        if event.message_finished:
            kind = "text" if isinstance(event, TextMessage) else "bytes"
            joined = "".join(pieces) if kind == "text" else b"".join(pieces)  # type: ignore[arg-type]
            out.append((kind, joined))
            pieces.clear()
    elif isinstance(event, Ping):
        out.append(("ping", bytes(event.payload)))
    elif isinstance(event, Pong):
        out.append(("pong", bytes(event.payload)))
    elif isinstance(event, CloseConnection):
        # wsproto's UTF-8 error text names a position within the read it came in: a detail
        # of how the stream was cut, not of what it holds.
        reason = "not UTF-8" if event.code == 1007 else event.reason
        out.append(("close", event.code, reason))
        return True
    return False


def reference(chunks: list[bytes]) -> list[tuple[object, ...]]:
    ws = open_client()
    out: list[tuple[object, ...]] = []
    pieces: list[str | bytes] = []
    for chunk in [*chunks, None]:
        ws.receive_data(chunk)
        for event in ws.events():
            if _outcome(event, pieces, out):
                return out
    return out


def split(chunks: list[bytes], max_size: int = 1 << 20) -> list[tuple[object, ...]]:
    ws = open_client()
    splitter = FrameSplitter(max_size=max_size)
    out: list[tuple[object, ...]] = []
    pieces: list[str | bytes] = []
    for chunk in chunks:
        for item in splitter.feed(chunk):
            if isinstance(item, str):
                assert not pieces  # never in the middle of a message wsproto holds
                out.append(("text", item))
                continue
            assert isinstance(item, Raw)
            ws.receive_data(item.data)
            for event in ws.events():
                if _outcome(event, pieces, out):
                    return out
    ws.receive_data(None)  # EOF
    for event in ws.events():
        if _outcome(event, pieces, out):
            return out
    return out


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(stream) + 1) for p in points})
    bounds = [0, *marks, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


TEXTS = st.one_of(
    st.text(max_size=40).map(str.encode),
    st.sampled_from([0, 1, 125, 126, 127, 200, 65535, 65536]).map(lambda n: b"x" * n),
    st.sampled_from([124, 125, 126]).map(lambda n: "你".encode() * (n // 3) + b"a" * (n % 3)),
    st.sampled_from([b"\xff", b"\xc3", "好".encode()[:2], b"\xed\xa0\x80", b"ok\xf4\x90\x80\x80"]),
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(
            ["text"] * 8 + ["fragmented", "binary", "ping", "pong", "close", "odd", "masked"]
        )
    )
    payload = draw(TEXTS)
    if kind == "text":
        minimal = draw(st.booleans()) or len(payload) > 0xFFFF
        form = None if minimal else draw(st.sampled_from([16, 64]))
        return frame(1, payload, form=form)
    if kind == "fragmented":
        parts = draw(st.lists(TEXTS, min_size=1, max_size=3))
        out = frame(1, payload, fin=False)
        for part in parts[:-1]:
            out += frame(0, part, fin=False)
            if draw(st.booleans()):
                out += frame(9, b"mid")  # control frames may come between fragments
        return out + frame(0, parts[-1])
    if kind == "binary":
        return frame(2, payload)
    if kind == "ping":
        return frame(9, payload[:125])
    if kind == "pong":
        return frame(10, payload[:125])
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 4009, 4914, 1005, 999]))
        body = b"" if code == 1005 else struct.pack("!H", code) + payload[:60]
        return frame(8, body)
    if kind == "masked":
        return frame(1, payload, mask=b"\x01\x02\x03\x04")
    # Something unusual: RSV bits, a reserved opcode, a continuation out of nowhere, a text
    # frame without FIN and nothing after it, a control frame too long.
    return draw(
        st.sampled_from(
            [
                frame(1, payload, rsv=draw(st.integers(1, 7))),
                frame(3, payload),
                frame(11, b""),
                frame(0, payload),
                frame(1, payload, fin=False),
                frame(9, b"p" * 126),
                frame(9, b"p", fin=False),
            ]
        )
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(frames(), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0), max_size=8),
    st.sampled_from([1 << 20, 200, 126]),
)
def test_the_splitter_reports_what_wsproto_reports(
    parts: list[bytes], points: list[int], max_size: int
) -> None:
    stream = b"".join(parts)
    chunks = cut(stream, points)
    assert split(chunks, max_size) == reference([stream])


SAMPLE = (
    frame(1, b'{"op":10}')
    + frame(1, "帮我总结一下".encode() * 30)  # 16-bit length
    + frame(9, b"are you there")
    + frame(1, b"a", fin=False)
    + frame(0, b"b", fin=False)
    + frame(0, "c好".encode())
    + frame(1, b"y" * 125)
    + frame(1, b"z" * 126)
    + frame(1, "末尾".encode())
    + frame(8, struct.pack("!H", 4009) + b"rotation")
)


def test_every_cut_of_a_sample_stream() -> None:
    expected = reference([SAMPLE])
    assert expected[-1] == ("close", 4009, "rotation")
    for at in range(len(SAMPLE) + 1):
        assert split([SAMPLE[:at], SAMPLE[at:]]) == expected, at


def test_one_byte_at_a_time() -> None:
    expected = reference([SAMPLE])
    assert split([SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == expected


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536, 65537, 200_000])
def test_length_boundaries(n: int) -> None:
    stream = frame(1, b"q" * n) + frame(1, b"after")
    expected = reference([stream])
    assert expected == [("text", "q" * n), ("text", "after"), ("close", 1006, None)]
    assert split([stream]) == expected
    assert split([stream[i : i + 4096] for i in range(0, len(stream), 4096)]) == expected


def test_the_common_case_is_taken_without_wsproto() -> None:
    splitter = FrameSplitter(max_size=1 << 20)
    stream = frame(1, b'{"op":0}') + frame(1, "你好".encode()) + frame(1, b"x" * 300)
    assert splitter.feed(stream[:5]) == []
    assert splitter.feed(stream[5:]) == ['{"op":0}', "你好", "x" * 300]


@pytest.mark.parametrize(
    "bad",
    [
        frame(1, b"m", mask=b"abcd"),  # a server must not mask
        frame(1, b"r", rsv=4),  # no extension was negotiated
        frame(1, b"\xff\xfe"),  # not UTF-8: wsproto closes with 1007
        frame(1, b"n", form=16),  # a length not in its minimal form
        frame(1, b"x" * 300, form=64),
    ],
    ids=["masked", "rsv", "utf8", "non-minimal-16", "non-minimal-64"],
)
def test_frames_wsproto_refuses_go_to_wsproto(bad: bytes) -> None:
    splitter = FrameSplitter(max_size=1 << 20)
    items = splitter.feed(bad + frame(1, b"later"))
    assert isinstance(items[0], Raw)
    assert items[0].data == bad
    expected = reference([bad])
    assert expected[-1][0] == "close"
    assert split([bad + frame(1, b"later")]) == expected

# The common case of the server's WebSocket frames, in few operations; wsproto for the rest.
#
# Theory of operation. Almost every frame the gateway sends is one whole text message in one
# frame: FIN set, opcode 1, no RSV bits, unmasked (RFC 6455 §5.1: a server never masks), a
# few KB. wsproto parses such a frame in pure Python through several layers (a frame decoder,
# a message decoder with an incremental UTF-8 decoder, an event object), and leads the
# driver's profile. FrameSplitter cuts the byte stream at frame boundaries itself (that
# needs only the header's length fields) and takes each frame of the common case as it is;
# every other frame - control frames, fragments and all that follows them until the
# message ends, masked or RSV frames, non-minimal lengths, text that is not UTF-8, anything
# above the size limit - goes to wsproto as raw bytes, unchanged and in order, so wsproto
# stays the reference for everything but the common case and decides every error.
#
# Because only whole frames (or, for one too large to hold, the exact bytes of that one
# frame) are handed over, wsproto's buffer is at a frame boundary whenever the splitter
# looks at the next header: the two never disagree about where a frame starts.
#
# A message taken here is decoded strictly, as wsproto decodes it (text that is not UTF-8
# goes to wsproto, which closes with 1007): the transport reports text messages as str.
"""Split a server's WebSocket byte stream into common-case text messages and wsproto's share."""

from __future__ import annotations

__all__ = ["FrameSplitter", "Raw"]

_FIN_TEXT = 0x81  # FIN, no RSV bits, opcode 1
_MASK = 0x80
# A frame taken here is held until it is whole: above this, wsproto streams it instead.
_LARGEST_HELD = 1 << 16


class Raw:
    """Bytes for wsproto: whatever the splitter does not take itself, in stream order."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Raw({len(self.data)} bytes)"


class FrameSplitter:
    """Feed it the bytes of a client connection after the upgrade; it returns, in order,
    whole text messages of the common case (``str``) and :class:`Raw` pieces
    to pass to wsproto's ``receive_data``.

    Args:
        max_size: the message size limit; a larger frame (or one above 64 KiB) goes to
            wsproto, which streams it, so that the caller can drop it as it arrives.
    """

    __slots__ = ("_buffer", "_fragmented", "_max_size", "_owed")

    def __init__(self, *, max_size: int) -> None:
        self._max_size = min(max_size, _LARGEST_HELD)
        self._buffer = b""  # the start of a frame not yet whole
        self._owed = 0  # bytes of the current frame still due to wsproto
        # Inside a fragmented message (a data frame without FIN went to wsproto): every
        # frame goes to wsproto until a final continuation frame ends it.
        self._fragmented = False

    def feed(self, data: bytes) -> list[str | Raw]:
        """Split ``data`` (the next bytes read); what is incomplete waits for the next call."""
        out: list[str | Raw] = []
        owed = self._owed
        if owed:
            if len(data) <= owed:
                self._owed = owed - len(data)
                if data:
                    out.append(Raw(data))
                return out
            out.append(Raw(data[:owed]))
            data = data[owed:]
            self._owed = 0
        buf = self._buffer + data if self._buffer else data
        end = len(buf)
        i = 0
        max_size = self._max_size
        while end - i >= 2:
            b0 = buf[i]
            b1 = buf[i + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - i < 4:
                    break
                n = (buf[i + 2] << 8) | buf[i + 3]
                head = 4
                minimal = n >= 126
            elif n == 127:
                if end - i < 10:
                    break
                n = int.from_bytes(buf[i + 2 : i + 10], "big")
                head = 10
                minimal = n > 0xFFFF
            else:
                minimal = True
            if b1 & _MASK:
                head += 4
            size = head + n
            if (
                b0 == _FIN_TEXT
                and not b1 & _MASK
                and minimal
                and n <= max_size
                and not self._fragmented
            ):
                if end - i < size:
                    break  # wait for the rest of this frame
                try:
                    text = buf[i + head : i + size].decode()
                except UnicodeDecodeError:
                    pass  # wsproto closes with 1007, as for any text that is not UTF-8
                else:
                    out.append(text)
                    i += size
                    continue
            # wsproto's share: this frame, whole if it is here, else what is here of it and
            # the rest as it arrives (wsproto streams a data frame's payload out).
            if (b0 & 0x0F) < 8:  # a data frame: FIN decides whether a message goes on
                self._fragmented = not b0 & 0x80
            if end - i < size:
                out.append(Raw(buf[i:end]))
                self._owed = size - (end - i)
                i = end
                break
            out.append(Raw(buf[i : i + size]))
            i += size
        self._buffer = buf[i:] if i < end else b""
        return out

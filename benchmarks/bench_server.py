"""A minimal, cheap QQ gateway stand-in for the loopback benchmarks (raw sockets, threads).

It answers just enough for every client under test to reach READY: the token endpoint, ``GET
/gateway/bot`` (and ``/gateway``), ``GET /users/@me`` (botpy asks for it), and the WebSocket
upgrade on ``/websocket``. On the WebSocket it sends Hello, answers Identify with READY (and
Resume with RESUMED), ACKs every heartbeat and echoes a close frame. After READY it sends
``--count`` pre-encoded dispatch frames as fast as the client reads them (``sendall`` blocks
while the client's receive window is full), so the server costs almost no CPU per frame.
With ``--start-after N`` the dispatches wait until N sessions are READY, and then go to all
of them at once (the shards figure: every shard's handshake is over before the window).

It is not a gateway and checks nothing: the tests use ``qqproto_io.FakeGatewayServer``.

    python benchmarks/bench_server.py --count 50000 --interval-ms 41250 [--start-after 100]

prints ``PORT <n>`` on stdout once it listens, and exits when its standard input closes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import sys
import threading

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENT_TYPE = "GROUP_AT_MESSAGE_CREATE"
SESSION_ID = "bench-session-0001"
APP_ID = "102000001"
TOKEN_PATH = "/app/getAppAccessToken"  # noqa: S105 - a URL path
_CHUNK = 256 * 1024

_PHRASES = (
    "帮我总结一下今天的会议 notes, 重点是 Q3 roadmap 和 budget 两部分.",
    "Please translate 这段 error message 成中文, and check the stack trace 里的 line 42.",
    "明天下午三点的 design review 改到 conference room B 了, 记得带上 slides 和 demo.",
    "The deploy 失败了: timeout while waiting for health check, 需要 rollback 吗?",
    "周末一起去爬山吗? Weather forecast 说周六晴天, 温度 18-25 度, perfect!",
    "请把 invoice #20241023 的 PDF 发给财务部, cc 一下 project manager, thanks.",
)


def dispatch_text(n: int, seq: int) -> str:
    """Dispatch number ``n`` (unique event id and message id), compact UTF-8 JSON, ~1 KB."""
    member = f"{n:08X}4AEA33253A2797FB897C50B81D7ED"[:32]
    group = "C9F778FE6ADF9D1D1DBE395BF744A33A"
    payload = {
        "op": 0,
        "s": seq,
        "t": EVENT_TYPE,
        "id": f"{EVENT_TYPE}:e4c8c3a0-5b0e-4f6c-9a0b-{n:012x}",
        "d": {
            "author": {
                "id": member,
                "member_openid": member,
                "union_openid": "0D5A3C8F1E2B4A6C9D7E8F0A1B2C3D4E",
            },
            "content": f" #{n} {_PHRASES[n % len(_PHRASES)]} {_PHRASES[(n * 7 + 3) % 6]}",
            "group_id": group,
            "group_openid": group,
            "id": f"ROBOT1.0_veoihSeuhEEnh0kq1xA2tbgzkd8tGHBY9mTIVwG.{n:010d}",
            "timestamp": "2024-10-23T14:30:12+08:00",
            "attachments": [
                {
                    "content_type": "image/png",
                    "filename": f"7A2C3E4B5D6F708192A3B4C5{n:08X}.png",
                    "height": 1080,
                    "width": 1920,
                    "size": 245761 + n,
                    "url": (
                        "https://multimedia.nt.qq.com.cn/download?appid=1407"
                        f"&fileid=CgoxMjM0NTY3ODkwEhQ7LkHc0Zx2pQ9aB3kR8sT1uV4w{n:010d}"
                        "&rkey=CAQSKAB6JWENi5LMtWVWVxS2RfZdDr8dA9mzRk2mXq0&spec=0"
                    ),
                }
            ],
            "message_scene": {"source": "default"},
            "message_type": 0,
        },
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def dispatch_texts(count: int, first_seq: int = 2) -> list[str]:
    """``count`` unique dispatches with sequence numbers from ``first_seq`` on."""
    return [dispatch_text(n, first_seq + n) for n in range(count)]


# ------------------------------------------------------------------------ WebSocket framing


def server_frame(data: bytes, opcode: int = 1) -> bytes:
    """One unmasked, final server frame (text by default)."""
    size = len(data)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + data


def client_frame(data: bytes, opcode: int = 1) -> bytes:
    """One masked, final client frame (for the raw byte-counting client)."""
    mask = os.urandom(4)
    size = len(data)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return header + mask + _xor(data, mask)


def _xor(data: bytes, mask: bytes) -> bytes:
    key = int.from_bytes((mask * (len(data) // 4 + 1))[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(len(data), "big")


class _Reader:
    """Buffered reads from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def frame(self) -> tuple[int, bytes]:
        """One frame (masked or not): (opcode, payload)."""
        b0, b1 = self.exactly(2)
        size = b1 & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self.exactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self.exactly(8))
        mask = self.exactly(4) if b1 & 0x80 else None
        data = self.exactly(size)
        if mask is not None:
            data = _xor(data, mask)
        return b0 & 0x0F, data


def http_request(reader: _Reader) -> tuple[str, str, dict[str, str], bytes]:
    """Method, path, lower-cased headers and body of one HTTP/1.1 request."""
    head = reader.until(b"\r\n\r\n").decode("latin-1")
    request_line, *lines = head.split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.exactly(int(headers.get("content-length", "0") or 0))
    return method, target.split("?", 1)[0], headers, body


def _json_response(obj: object, status: str = "200 OK") -> bytes:
    body = json.dumps(obj).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ------------------------------------------------------------------------------- server


class BenchServer:
    """Serves every accepted connection on its own thread (see the module docstring)."""

    def __init__(self, *, count: int, interval_ms: int, start_after: int = 1) -> None:
        self.interval_ms = interval_ms
        self.start_after = start_after
        self.ready_sessions = 0
        self.all_ready = threading.Event()
        self.ready_lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        # Pre-encoded once: every client gets the very same bytes, in chunks that end on frame
        # boundaries (an ACK may be written between two chunks).
        self.chunks: list[bytes] = []
        pending: list[bytes] = []
        size = 0
        for text in dispatch_texts(count):
            frame = server_frame(text.encode())
            pending.append(frame)
            size += len(frame)
            if size >= _CHUNK:
                self.chunks.append(b"".join(pending))
                pending, size = [], 0
        if pending:
            self.chunks.append(b"".join(pending))
        self.total = sum(map(len, self.chunks))
        self.count = count

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve_forever(self) -> None:
        while True:
            sock, _ = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    def _handle(self, sock: socket.socket) -> None:
        reader = _Reader(sock)
        try:
            while True:
                method, path, headers, _ = http_request(reader)
                if headers.get("upgrade", "").lower() == "websocket":
                    self._websocket(sock, reader, headers)
                    return
                sock.sendall(self._route(method, path))
                if headers.get("connection", "").lower() == "close":
                    return
        except (EOFError, OSError, ValueError):
            pass
        finally:
            sock.close()

    def _route(self, method: str, path: str) -> bytes:
        if method == "POST" and path == TOKEN_PATH:
            return _json_response({"access_token": "BENCH-TOKEN", "expires_in": "7200"})
        if method == "GET" and path in {"/gateway", "/gateway/bot"}:
            return _json_response(
                {
                    "url": f"ws://127.0.0.1:{self.port}/websocket",
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 1000,
                        "reset_after": 86_400_000,
                        "max_concurrency": 1,
                    },
                }
            )
        if method == "GET" and path == "/users/@me":
            return _json_response({"id": APP_ID, "username": "bench-bot", "avatar": ""})
        return _json_response({"code": 404, "message": "not found"}, "404 Not Found")

    def _websocket(self, sock: socket.socket, reader: _Reader, headers: dict[str, str]) -> None:
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()  # noqa: S324
        sock.sendall(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        lock = threading.Lock()

        def send(obj: object) -> None:
            frame = server_frame(json.dumps(obj, separators=(",", ":")).encode())
            with lock:
                sock.sendall(frame)

        send({"op": 10, "d": {"heartbeat_interval": self.interval_ms}})
        while True:
            opcode, data = reader.frame()
            if opcode == 8:  # close: echo it, then hang up
                with lock:
                    sock.sendall(server_frame(data[:2], opcode=8))
                return
            if opcode == 9:  # ping
                with lock:
                    sock.sendall(server_frame(data, opcode=10))
                continue
            if opcode != 1:
                continue
            op = json.loads(data).get("op")
            if op == 1:
                send({"op": 11})
            elif op == 2:
                user = {"id": APP_ID, "username": "bench-bot", "bot": True}
                identify = json.loads(data).get("d") or {}
                d = {
                    "version": 1,
                    "session_id": SESSION_ID,
                    "user": user,
                    "shard": identify.get("shard") or [0, 1],
                    "bench_total_bytes": self.total,
                    "bench_count": self.count,
                }
                send({"op": 0, "s": 1, "t": "READY", "d": d})
                with self.ready_lock:
                    self.ready_sessions += 1
                    if self.ready_sessions >= self.start_after:
                        self.all_ready.set()
                if self.chunks:
                    threading.Thread(target=self._blast, args=(sock, lock), daemon=True).start()
            elif op == 6:
                send({"op": 0, "s": 1, "t": "RESUMED", "d": ""})

    def _blast(self, sock: socket.socket, lock: threading.Lock) -> None:
        self.all_ready.wait()
        try:
            for chunk in self.chunks:
                with lock:
                    sock.sendall(chunk)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=0, help="dispatches sent after READY")
    parser.add_argument("--interval-ms", type=int, default=41_250, help="Hello's interval")
    parser.add_argument(
        "--start-after", type=int, default=1, help="hold the dispatches until N sessions are READY"
    )
    args = parser.parse_args(argv)
    server = BenchServer(
        count=args.count, interval_ms=args.interval_ms, start_after=args.start_after
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"PORT {server.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    return 0


if __name__ == "__main__":
    sys.exit(main())

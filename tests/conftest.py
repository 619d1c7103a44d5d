"""Shared fixtures: a real ``redis-server`` for the Redis limiter and store tests."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

pytest_plugins = ["qqproto_io.testing.pytest_plugin"]  # the `qq` fixture (virtual time)

REDIS_START_TIMEOUT = 20.0  # generous: a cold CI machine


@dataclass(frozen=True)
class RedisServer:
    """A running ``redis-server`` on loopback."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes]) -> str:
    """Read the server's log until it accepts connections; return what it said."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + REDIS_START_TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            chunk = os.read(fd, 65536)  # unbuffered: a line never hides in a buffer
            if not chunk:  # exited
                break
            seen += chunk
            if b"Ready to accept connections" in seen:
                return seen.decode(errors="replace")
    proc.kill()
    proc.wait()
    pytest.fail("redis-server did not start:\n" + seen.decode(errors="replace"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A throwaway redis-server (no persistence) for the whole session; skips if absent."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server not found on PATH: the Redis tests need a real server "
            "(apt-get install redis-server; `python3 dev.py test` installs it as root)"
        )
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(  # noqa: S603 - the binary found on PATH, fixed arguments
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
        cwd=workdir,
    )
    _wait_ready(proc)
    # Keep reading its log so a chatty server never blocks on a full pipe.
    assert proc.stdout is not None
    drain = threading.Thread(target=proc.stdout.read, daemon=True)
    drain.start()
    try:
        yield RedisServer("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(timeout=10)
        proc.stdout.close()


# --- tests/test_hostile_peer.py: the long local run (begin) ---------------------------------
def pytest_addoption(parser):
    """``--soak``: run the hostile-peer property test long, with random seeds and shrinking."""
    group = parser.getgroup("hostile peer (tests/test_hostile_peer.py)")
    group.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="many random hostile-peer examples with shrinking, instead of the short CI run",
    )
    group.addoption(
        "--soak-examples",
        type=int,
        default=300,
        metavar="N",
        help="examples per backend under --soak (default: 300)",
    )


# --- tests/test_hostile_peer.py: the long local run (end) -----------------------------------


@pytest.fixture
def client_closes(monkeypatch) -> list[int | None]:
    """Every close code a client sent the fake gateway (``None``: its TCP link ended)."""
    from qqproto.testing import ServerConnection

    seen: list[int | None] = []
    original = ServerConnection.client_closed

    def record(self, code, now):
        seen.append(code)
        original(self, code, now)

    monkeypatch.setattr(ServerConnection, "client_closed", record)
    return seen

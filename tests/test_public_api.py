"""The public names of qqproto_io load on first use, and only what a process uses is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qqproto_io


def test_every_public_name_has_a_home_and_resolves():
    assert sorted(qqproto_io._HOME) == sorted(qqproto_io.__all__)
    for name in qqproto_io.__all__:
        assert getattr(qqproto_io, name) is not None
    assert dir(qqproto_io) == sorted(qqproto_io.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        qqproto_io.Nope  # noqa: B018


def test_a_session_does_not_load_the_optional_parts():
    # What `qqproto run` imports for a session without --health-port, --redis-url or the
    # embedded fake: none of prometheus_client, redis, the fake gateway or the simulator.
    code = (
        "import sys, qqproto_io, qqproto_io._cli;"
        "from qqproto_io import GatewayClient, StallMonitor, SystemdNotifier;"
        "print(sorted(m for m in ('prometheus_client', 'redis', 'qqproto.testing',"
        " 'qqproto_io._fake_server', 'qqproto_io._health') if m in sys.modules))"
    )
    done = subprocess.run(  # noqa: S603 - our interpreter, our code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"

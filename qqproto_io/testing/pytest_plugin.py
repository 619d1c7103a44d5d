# Fixtures over anyio's pytest plugin: the test, its async fixtures and the VirtualGateway
# run on the event loop the module's `anyio_backend` fixture names, which must be a virtual
# one (`virtual_time(...)`); the gateway refuses real time rather than run a day for real.
"""pytest fixtures for testing a bot on virtual time.

Load it from the top-level ``conftest.py``::

    pytest_plugins = ["qqproto_io.testing.pytest_plugin"]

and give each test module that uses ``qq`` a virtual clock::

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(request):
        return virtual_time(request.param)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from qqproto.testing import FakeGatewayConfig
from qqproto_io.testing._clock import repeatable_scheduling
from qqproto_io.testing._gateway import VirtualGateway

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["qq", "qq_config", "qq_seed"]


@pytest.fixture
def qq_config() -> FakeGatewayConfig:
    """How the fake platform behaves for ``qq``; override it in a module for other settings
    (the heartbeat interval, the reply windows, rotations...)."""
    return FakeGatewayConfig()


@pytest.fixture
def qq_seed() -> int:
    """The seed of ``qq``'s run: the fake's ids and tokens, the client's jitter, and trio's
    scheduling order. Override it to explore other runs."""
    return 0


@pytest.fixture
async def qq(
    qq_config: FakeGatewayConfig, qq_seed: int, anyio_backend: object
) -> AsyncIterator[VirtualGateway]:
    """A running :class:`~qqproto_io.testing.VirtualGateway` on virtual time: start the bot
    with ``await qq.start(setup)``, then send it messages and faults and read what it did
    (``qq.rest_posts``, ``qq.events``, ``qq.trace``)."""
    name = anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend
    with repeatable_scheduling("trio" if name == "trio" else "asyncio", qq_seed):
        async with VirtualGateway(qq_config, seed=qq_seed) as gateway:
            yield gateway

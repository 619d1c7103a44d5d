"""Test a bot's real code on virtual time: the production :class:`~qqproto_io.GatewayClient`
(its transports, HTTP client, token source and the bot's own handlers) against the fake QQ
platform over an in-memory network that carries real HTTP and WebSocket bytes, with the
faults of a real one (half-open links, partitions, outages, slow answers, rotations,
replays, closes with any code), a virtual day in seconds.

- :class:`VirtualGateway`: the fake platform, the client factory and the faults.
- :func:`virtual_time`: anyio backend options for a virtual clock, asyncio or trio.
- :func:`run`: ``anyio.run`` on a virtual clock, seeded.
- ``qqproto_io.testing.pytest_plugin``: the ``qq`` fixture (a running VirtualGateway).
"""

from __future__ import annotations

from qqproto_io.testing._clock import (
    Backend,
    VirtualEventLoop,
    is_virtual,
    repeatable_scheduling,
    run,
    virtual_time,
)
from qqproto_io.testing._gateway import (
    API_HOST,
    DEFAULT_UNIX_EPOCH,
    TOKEN_HOST,
    VirtualGateway,
)
from qqproto_io.testing._network import Link, VirtualNetwork

__all__ = [
    "API_HOST",
    "DEFAULT_UNIX_EPOCH",
    "TOKEN_HOST",
    "Backend",
    "Link",
    "VirtualEventLoop",
    "VirtualGateway",
    "VirtualNetwork",
    "is_virtual",
    "repeatable_scheduling",
    "run",
    "virtual_time",
]

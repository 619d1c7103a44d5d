"""qqproto_io: the anyio driver for the qqproto core (asyncio and trio).

`GatewayClient` is the application API; `ShardDriver` runs one core connection over real
sockets; `FakeGatewayServer` serves `qqproto.testing`'s fake gateway on loopback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qqproto_io._client import GatewayClient
from qqproto_io._driver import ShardDriver
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._health import HealthServer, Metrics
from qqproto_io._http import (
    DEFAULT_API_BASE,
    DEFAULT_TOKEN_URL,
    SANDBOX_API_BASE,
    Credentials,
    HttpFailure,
    RestApi,
    TokenSource,
)
from qqproto_io._proxy import ProxyConfig, ProxyError, proxy_from_env
from qqproto_io._shards import ShardPlan
from qqproto_io._stall import StallMonitor
from qqproto_io._stores import (
    IdentifyBudgetExhausted,
    IdentifyLimiter,
    LocalIdentifyLimiter,
    SnapshotStore,
    SqliteSnapshotStore,
)
from qqproto_io._systemd import SystemdNotifier, run_systemd, watchdog_verdict
from qqproto_io._transport import TransportLimits

if TYPE_CHECKING:
    from qqproto_io._redis import RedisIdentifyLimiter, RedisSnapshotStore

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_TOKEN_URL",
    "SANDBOX_API_BASE",
    "Credentials",
    "FakeGatewayServer",
    "GatewayClient",
    "HealthServer",
    "HttpFailure",
    "IdentifyBudgetExhausted",
    "IdentifyLimiter",
    "LocalIdentifyLimiter",
    "Metrics",
    "ProxyConfig",
    "ProxyError",
    "RedisIdentifyLimiter",
    "RedisSnapshotStore",
    "RestApi",
    "ShardDriver",
    "ShardPlan",
    "SnapshotStore",
    "SqliteSnapshotStore",
    "StallMonitor",
    "SystemdNotifier",
    "TokenSource",
    "TransportLimits",
    "proxy_from_env",
    "run_systemd",
    "watchdog_verdict",
]


def __getattr__(name: str) -> object:
    # The Redis classes import redis.asyncio (a quarter of a second); only their users pay.
    if name in {"RedisIdentifyLimiter", "RedisSnapshotStore"}:
        from qqproto_io import _redis  # noqa: PLC0415 - deliberately lazy

        return getattr(_redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""qqproto_io: the anyio driver for the qqproto core (asyncio and trio).

`GatewayClient` is the application API; `ShardDriver` runs one core connection over real
sockets; `FakeGatewayServer` serves `qqproto.testing`'s fake gateway on loopback.
"""

from __future__ import annotations

from qqproto_io._client import GatewayClient
from qqproto_io._driver import ShardDriver
from qqproto_io._fake_server import FakeGatewayServer
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
from qqproto_io._stall import StallMonitor
from qqproto_io._stores import (
    IdentifyLimiter,
    JsonFileSnapshotStore,
    LocalIdentifyLimiter,
    SnapshotStore,
)
from qqproto_io._systemd import SystemdNotifier, run_systemd, watchdog_verdict
from qqproto_io._transport import TransportLimits

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_TOKEN_URL",
    "SANDBOX_API_BASE",
    "Credentials",
    "FakeGatewayServer",
    "GatewayClient",
    "HttpFailure",
    "IdentifyLimiter",
    "JsonFileSnapshotStore",
    "LocalIdentifyLimiter",
    "ProxyConfig",
    "ProxyError",
    "RestApi",
    "ShardDriver",
    "SnapshotStore",
    "StallMonitor",
    "SystemdNotifier",
    "TokenSource",
    "TransportLimits",
    "proxy_from_env",
    "run_systemd",
    "watchdog_verdict",
]

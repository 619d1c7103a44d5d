"""qqproto_io: the anyio driver for the qqproto core (asyncio and trio).

`GatewayClient` is the application API and `supervise` runs one as a service (signals,
systemd, health); `ShardDriver` runs one core connection over real sockets;
`FakeGatewayServer` serves `qqproto.testing`'s fake gateway on loopback.

The modules, by layer (each layer uses only those above it):

- network: `_network` (the seam), `_transport` + `_frames` (WebSocket), `_proxy` (CONNECT,
  SOCKS5), `_http` (REST, tokens), `_http_server` (the h11 read loop the servers share);
- protocol loop: `_driver` (one core connection), `_shards` (which shards);
- application face: `_client` (GatewayClient), `_messaging` (replies), `_webhook` +
  `_webhook_front` + `_asgi` (callbacks);
- stores: `_stores` (SQLite, the local limiter), `_redis`, `_webhook_redis`, `_delivery`
  (exactly once across restarts);
- operations: `_supervise`, `_health`, `_systemd`, `_stall`, `_logging` + `_describe`;
- command line: `_cli`, `_options`, `_entry`;
- fakes: `_fake_server`, `_fake_webhook`, and `qqproto_io.testing` (the real client on an
  in-memory network and a virtual clock).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

# A library logs and the application decides where it goes: without this, Python's "last
# resort" handler would print every WARNING of an unconfigured program to stderr.
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from qqproto_io._asgi import WebhookApp
    from qqproto_io._client import FatalStopError, GatewayClient, Handler
    from qqproto_io._driver import ShardDriver
    from qqproto_io._fake_server import FakeGatewayServer
    from qqproto_io._fake_webhook import FakeWebhookPoster
    from qqproto_io._health import HealthServer, Metrics
    from qqproto_io._http import (
        DEFAULT_API_BASE,
        DEFAULT_TOKEN_URL,
        SANDBOX_API_BASE,
        ApiAnswer,
        Credentials,
        HttpFailure,
        RestApi,
        TokenSource,
    )
    from qqproto_io._messaging import Messenger
    from qqproto_io._network import Network
    from qqproto_io._proxy import ProxyConfig, ProxyError, proxy_from_env
    from qqproto_io._redis import RedisIdentifyLimiter, RedisSnapshotStore
    from qqproto_io._shards import ShardPlan
    from qqproto_io._stall import StallMonitor
    from qqproto_io._stores import (
        IdentifyBudgetExhausted,
        IdentifyLimiter,
        LocalIdentifyLimiter,
        SnapshotStore,
        SqliteSnapshotStore,
    )
    from qqproto_io._supervise import supervise
    from qqproto_io._systemd import SystemdNotifier, run_systemd, watchdog_verdict
    from qqproto_io._transport import TransportLimits
    from qqproto_io._webhook import DeliveryClaims, WebhookInbox, WebhookServer
    from qqproto_io._webhook_redis import RedisDeliveryClaims

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_TOKEN_URL",
    "SANDBOX_API_BASE",
    "ApiAnswer",
    "Credentials",
    "DeliveryClaims",
    "FakeGatewayServer",
    "FakeWebhookPoster",
    "FatalStopError",
    "GatewayClient",
    "Handler",
    "HealthServer",
    "HttpFailure",
    "IdentifyBudgetExhausted",
    "IdentifyLimiter",
    "LocalIdentifyLimiter",
    "Messenger",
    "Metrics",
    "Network",
    "ProxyConfig",
    "ProxyError",
    "RedisDeliveryClaims",
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
    "WebhookApp",
    "WebhookInbox",
    "WebhookServer",
    "proxy_from_env",
    "run_systemd",
    "supervise",
    "watchdog_verdict",
]


# Each name is imported on first use, so that a process pays only for what it uses: the CLI
# without --health-port never loads prometheus_client, a bot never loads the fake gateway,
# and nobody but a fleet loads redis (idle RSS is one of the benchmarks).
_HOME = {
    "GatewayClient": "_client",
    "FatalStopError": "_client",
    "Handler": "_client",
    "supervise": "_supervise",
    "ShardDriver": "_driver",
    "FakeGatewayServer": "_fake_server",
    "HealthServer": "_health",
    "Metrics": "_health",
    "DEFAULT_API_BASE": "_http",
    "DEFAULT_TOKEN_URL": "_http",
    "SANDBOX_API_BASE": "_http",
    "ApiAnswer": "_http",
    "Credentials": "_http",
    "HttpFailure": "_http",
    "RestApi": "_http",
    "TokenSource": "_http",
    "Messenger": "_messaging",
    "Network": "_network",
    "ProxyConfig": "_proxy",
    "ProxyError": "_proxy",
    "proxy_from_env": "_proxy",
    "RedisIdentifyLimiter": "_redis",
    "RedisSnapshotStore": "_redis",
    "ShardPlan": "_shards",
    "StallMonitor": "_stall",
    "IdentifyBudgetExhausted": "_stores",
    "IdentifyLimiter": "_stores",
    "LocalIdentifyLimiter": "_stores",
    "SnapshotStore": "_stores",
    "SqliteSnapshotStore": "_stores",
    "SystemdNotifier": "_systemd",
    "run_systemd": "_systemd",
    "watchdog_verdict": "_systemd",
    "TransportLimits": "_transport",
    "WebhookApp": "_asgi",
    "FakeWebhookPoster": "_fake_webhook",
    "DeliveryClaims": "_webhook",
    "WebhookInbox": "_webhook",
    "WebhookServer": "_webhook",
    "RedisDeliveryClaims": "_webhook_redis",
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

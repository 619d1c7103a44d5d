"""Test your bot's gateway behaviour without a network: a fake gateway and a simulator.

`FakeGateway` is the server side of the QQ gateway protocol (token endpoint, gateway URL,
sessions, replays, rotations, message sends checked as the platform checks them), sans-IO,
with every known misbehaviour as a switch on `Faults`. `Simulation` joins one or more
`GatewayConnection`s to it over a simulated network on a virtual clock: latency, half-open
links, outages, process stalls and restarts, seeded and reproducible. See docs/testing.md
for a walk-through.
"""

from __future__ import annotations

from qqproto.testing._fake_gateway import (
    MESSAGE_KINDS,
    FakeGateway,
    FakeGatewayConfig,
    Faults,
    HttpReply,
    MessageKind,
    RestCall,
    RestFault,
    ServerClose,
    ServerConnection,
    ServerDrop,
    ServerOutput,
    ServerSend,
    UserMessage,
)
from qqproto.testing._fake_webhook import (
    SignedRequest,
    WebhookRetryPolicy,
    WebhookSigner,
    is_ack,
)
from qqproto.testing._simulator import Link, SimClient, Simulation, TraceEntry

__all__ = [
    "MESSAGE_KINDS",
    "FakeGateway",
    "FakeGatewayConfig",
    "Faults",
    "HttpReply",
    "Link",
    "MessageKind",
    "RestCall",
    "RestFault",
    "ServerClose",
    "ServerConnection",
    "ServerDrop",
    "ServerOutput",
    "ServerSend",
    "SignedRequest",
    "SimClient",
    "Simulation",
    "TraceEntry",
    "UserMessage",
    "WebhookRetryPolicy",
    "WebhookSigner",
    "is_ack",
]

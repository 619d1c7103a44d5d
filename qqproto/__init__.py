"""qqproto: a sans-IO QQ Bot gateway session core.

One :class:`GatewayConnection` per shard consumes payloads, transport events and clock
ticks, and produces commands (for whatever does the IO) and events (for the application).
It never touches a socket, a clock, a thread, an event loop or the global random generator.
See the README for a worked example and ``state_diagram.md`` for the lifecycle.
"""

from __future__ import annotations

from qqproto._close_codes import CLOSE_CODE_POLICY, ClosePolicy, NextStep, policy_for_close
from qqproto._codec import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    JSONValue,
    Opcode,
    Payload,
    decode_payload,
    encode_heartbeat,
    encode_identify,
    encode_resume,
)
from qqproto._config import Intents, SessionConfig
from qqproto._connection import GatewayConnection
from qqproto._errors import (
    FailureKind,
    InvalidEnvelope,
    InvalidResponse,
    InvalidUTF8,
    LocalProtocolError,
    MalformedJSON,
    PayloadTooLarge,
    ProtocolError,
    QQProtoError,
    RemoteProtocolError,
    UnexpectedPayload,
    UnknownOpcode,
)
from qqproto._heartbeat import Health, Latency
from qqproto._outputs import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Command,
    Disconnected,
    DisconnectStorm,
    Dispatch,
    DuplicateDropped,
    Event,
    EventsDropped,
    FatalStop,
    FetchGateway,
    FetchToken,
    HeartbeatAcknowledged,
    HelloReceived,
    OpenConnection,
    Output,
    PersistSnapshot,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    RequestIdentifyPermit,
    Resumed,
    SendPayload,
    SessionInvalidated,
    StateChanged,
    ZombieDetected,
)
from qqproto._rest import (
    GatewayInfo,
    SessionStartLimit,
    TokenGrant,
    check_gateway_url,
    classify_status,
    parse_expires_in,
    parse_gateway_response,
    parse_token_response,
)
from qqproto._snapshot import InvalidSnapshot, SessionSnapshot
from qqproto._states import SessionState

__version__ = "0.1.0.dev0"
"""The version of the installed qqproto (also printed by ``qqproto --version``)."""

__all__ = [
    "CLOSE_CODE_POLICY",
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "AbandonRequest",
    "AbortTransport",
    "CloseConnection",
    "ClosePolicy",
    "Command",
    "DisconnectStorm",
    "Disconnected",
    "Dispatch",
    "DuplicateDropped",
    "Event",
    "EventsDropped",
    "FailureKind",
    "FatalStop",
    "FetchGateway",
    "FetchToken",
    "GatewayConnection",
    "GatewayInfo",
    "Health",
    "HeartbeatAcknowledged",
    "HelloReceived",
    "Intents",
    "InvalidEnvelope",
    "InvalidResponse",
    "InvalidSnapshot",
    "InvalidUTF8",
    "JSONValue",
    "Latency",
    "LocalProtocolError",
    "MalformedJSON",
    "NextStep",
    "Opcode",
    "OpenConnection",
    "Output",
    "Payload",
    "PayloadTooLarge",
    "PersistSnapshot",
    "ProtocolError",
    "ProtocolViolation",
    "QQProtoError",
    "Ready",
    "ReconnectScheduled",
    "RemoteProtocolError",
    "RequestIdentifyPermit",
    "Resumed",
    "SendPayload",
    "SessionConfig",
    "SessionInvalidated",
    "SessionSnapshot",
    "SessionStartLimit",
    "SessionState",
    "StateChanged",
    "TokenGrant",
    "UnexpectedPayload",
    "UnknownOpcode",
    "ZombieDetected",
    "__version__",
    "check_gateway_url",
    "classify_status",
    "decode_payload",
    "encode_heartbeat",
    "encode_identify",
    "encode_resume",
    "parse_expires_in",
    "parse_gateway_response",
    "parse_token_response",
    "policy_for_close",
]

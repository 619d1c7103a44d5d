# The webhook receiver: QQ's signed HTTP callbacks turned into the core's own events.
#
# Theory of operation. The platform POSTs the same envelope the WebSocket carries, signed
# with Ed25519 over `X-Signature-Timestamp` + the raw body; the key pair comes from a seed
# that is the bot secret repeated to 32 bytes. A receiver takes one request (method, path,
# headers, body bytes and the caller's clock) and returns what to answer plus the events to
# deliver, as `WebhookResult`. It does no IO and keeps no task: the HTTP server, the ASGI
# application and the tests all drive the same object.
#
# Why the checks come in this order. Everything a stranger can send is answered before any
# expensive or stateful step: method, path and declared size first (`precheck`, which a
# server calls before reading the body, so a 1 GiB upload is refused without reading it),
# then the app id, then the signature over the exact bytes received (re-serialising would
# break it), and only then JSON. An unsigned request is parsed only to see whether it is
# the console's op 13 validation, which the platform may send unsigned.
#
# Why op 13 is not a signing oracle. The answer to op 13 is a signature over event_ts +
# plain_token with the same key that signs dispatches over timestamp + body. Signing
# whatever arrives would hand anybody a valid signature for a forged dispatch: put the body
# in plain_token and the timestamp in event_ts. So only what the platform sends is signed: a
# digits-only event_ts and a short token of letters, digits, '-' and '_'. Every message
# signed that way matches [0-9]+[A-Za-z0-9_-]+, while every accepted dispatch's message is
# digits followed by a JSON object, which starts with '{' or JSON whitespace, never with one
# of those characters. No op 13 answer can therefore verify as a dispatch.
#
# Deduplication. The platform retries a slow or failed ack with the same envelope `id`
# (`s` may be absent), so the id is the key, in a `SeenIds` that can be the one a
# `GatewayConnection` uses: an event reaching the bot over both transports during a
# migration is delivered once. Message events are also deduplicated by `d.id`, as the core
# does. A duplicate is acknowledged like the first one (so the platform stops retrying) and
# reported as the core's `DuplicateDropped`.
#
# The queue. The ack promises the event will be handled, so it is sent only once the event
# is recorded and has a place in the application's queue. The caller says whether there is
# room (`room=`); without room the answer is a 503 with `{"op":12,"d":1}` ("failed, retry")
# and the id is *not* recorded, so the platform's retry is delivered normally later.
#
# Secrets: the seed and the key live in private slots, never in a repr or an error text.
"""Verify and answer QQ's webhook (HTTP callback) requests, without doing IO."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import orjson

from qqproto._codec import Opcode, decode_payload
from qqproto._config import SessionConfig
from qqproto._dedup import SeenIds
from qqproto._errors import LocalProtocolError, RemoteProtocolError, UnknownOpcode
from qqproto._outputs import DuplicateDropped, make_dispatch
from qqproto._webhook_answers import (
    _ACK,
    _RETRY,
    WEBHOOK_MAX_BODY,
    DeliveryMemory,
    WebhookOutcome,
    WebhookResponse,
    WebhookResult,
    _check_endpoint,
    _header_map,
    _one,
    _reject,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from qqproto._codec import JSONValue

__all__ = ["WebhookReceiver", "derive_seed"]

_SIG_LEN: Final = 64
_SEED_LEN: Final = 32
# The platform's token is 20 characters and its event_ts 10 digits; the bounds leave room
# for change without letting anything long (a forged body) through.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TS_RE: Final = re.compile(r"[0-9]{1,20}")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def derive_seed(secret: str | bytes) -> bytes:
    """The Ed25519 seed of a bot secret: the secret repeated to 32 bytes, first 32 bytes.

    Raises:
        LocalProtocolError: the secret is empty.
    """
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise LocalProtocolError("the bot secret is empty")
    return (raw * (_SEED_LEN // len(raw) + 1))[:_SEED_LEN]


def _private_key(secret: str | bytes) -> Ed25519PrivateKey:
    # Imported here so that `import qqproto` never loads cryptography: WebSocket-only bots
    # and the core's own tests do not pay for it.
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )
    except ImportError:
        raise LocalProtocolError(
            "webhooks need the cryptography package: pip install 'qqproto[webhook]'"
        ) from None

    return Ed25519PrivateKey.from_private_bytes(derive_seed(secret))


class WebhookReceiver:
    """The webhook endpoint of one bot, without IO.

    Call :meth:`precheck` when a request's head has arrived (it refuses a wrong method, path
    or size before the body is read), then :meth:`receive` with the whole body. Both return
    a :class:`WebhookResult` and never raise for anything a peer sends.

    Args:
        app_id: the bot's app id; requests must carry it in ``X-Bot-Appid``.
        secret: the bot secret (the Ed25519 seed is derived from it); never logged.
        path: the callback path to serve, or ``None`` for any path (the server routes).
        max_body: largest body accepted (413 above it).
        seen_events: the memory of delivered envelope ids. Pass the one of a
            :class:`~qqproto.GatewayConnection` (or of another receiver) to deduplicate
            across transports and endpoints; the clock of ``now`` must then be that
            connection's clock.
        seen_messages: the memory of delivered message ids (``d.id`` of message events).
        config: where the default memories' bounds and the message event types come from.
        max_skew: if set, refuse a signed request whose ``X-Signature-Timestamp`` is further
            than this many seconds from ``wall_time`` (a replay long after the dedup window).
            Off by default: whether a platform retry carries a fresh timestamp is unknown.
    """

    __slots__ = (
        "_dedup_types",
        "_key",
        "_max_body",
        "_max_skew",
        "_public",
        "_seen_events",
        "_seen_messages",
        "app_id",
        "counts",
        "path",
    )

    def __init__(
        self,
        *,
        app_id: str,
        secret: str | bytes,
        path: str | None = None,
        max_body: int = WEBHOOK_MAX_BODY,
        seen_events: DeliveryMemory | None = None,
        seen_messages: DeliveryMemory | None = None,
        config: SessionConfig | None = None,
        max_skew: float | None = None,
    ) -> None:
        if not app_id:
            raise LocalProtocolError("the app id is empty")
        cfg = config if config is not None else SessionConfig()
        self.app_id = app_id
        """The bot's app id."""
        self.path = path
        """The served path, or ``None`` for any."""
        self._key = _private_key(secret)
        self._public: Ed25519PublicKey = self._key.public_key()
        self._max_body = max_body
        self._max_skew = max_skew
        # `is None`, not `or`: an empty SeenIds is falsy, and a shared one starts empty.
        if seen_events is None:
            seen_events = SeenIds(max_items=cfg.dedup_max_ids, max_age=cfg.dedup_max_age)
        if seen_messages is None:
            seen_messages = SeenIds(max_items=cfg.dedup_max_ids, max_age=cfg.dedup_max_age)
        self._seen_events: DeliveryMemory = seen_events
        self._seen_messages: DeliveryMemory = seen_messages
        self._dedup_types = cfg.dedup_event_types
        self.counts: dict[str, int] = {}
        """Requests by outcome and rejection reason (``"delivered"``, ``"bad_signature"``...)."""

    def __repr__(self) -> str:
        return f"WebhookReceiver(app_id={self.app_id!r}, path={self.path!r})"

    @property
    def seen_events(self) -> DeliveryMemory:
        """The envelope-id memory (to share with another receiver or a connection)."""
        return self._seen_events

    @property
    def seen_messages(self) -> DeliveryMemory:
        """The message-id memory (to share with another receiver or a connection)."""
        return self._seen_messages

    @property
    def max_body(self) -> int:
        """Largest body accepted, in bytes."""
        return self._max_body

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key (safe to show: it verifies, never signs)."""
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
            Encoding,
            PublicFormat,
        )

        return self._public.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def _count(self, result: WebhookResult) -> WebhookResult:
        key = result.error.reason if result.error is not None else result.outcome.value
        self.counts[key] = self.counts.get(key, 0) + 1
        return result

    # ------------------------------------------------------------------------ requests

    def precheck(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]],
        content_length: int | None,
    ) -> WebhookResult | None:
        """Refuse a request from its head alone, or return ``None`` to read the body.

        ``content_length`` is the declared ``Content-Length`` (``None`` if chunked).
        """
        result = self._check_head(method, path, _header_map(headers), content_length)
        return None if result is None else self._count(result)

    def _check_head(
        self,
        method: bytes | str,
        path: bytes | str,
        headers: Mapping[str, list[str]],
        content_length: int | None,
    ) -> WebhookResult | None:
        refused = _check_endpoint(method, path, content_length, self.path, self._max_body)
        if refused is not None:
            return refused
        app_id = _one(headers, "x-bot-appid")
        if app_id is None:
            return _reject(403, "missing_app_id", "no X-Bot-Appid header")
        if app_id != self.app_id:
            return _reject(403, "wrong_app_id", "X-Bot-Appid names another bot")
        return None

    def receive(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]],
        body: bytes,
        now: float,
        wall_time: float | None = None,
        room: bool = True,
    ) -> WebhookResult:
        """Answer one whole request.

        Args:
            method: the HTTP method.
            path: the request target (a query string is ignored).
            headers: the request headers, names in any case.
            body: the raw body bytes, exactly as received.
            now: the caller's clock, for the dedup memory.
            wall_time: Unix time, for ``max_skew`` (ignored when it is off).
            room: whether the application's queue can take one more event. Without room a
                new dispatch is answered 503 ``{"op":12,"d":1}`` and not recorded.

        Returns:
            The response and the events to deliver after sending it.
        """
        hmap = _header_map(headers)
        result = self._check_head(method, path, hmap, len(body))
        if result is None:
            result = self._receive(hmap, body, now, wall_time, room)
        return self._count(result)

    def _receive(
        self,
        headers: Mapping[str, list[str]],
        body: bytes,
        now: float,
        wall_time: float | None,
        room: bool,
    ) -> WebhookResult:
        app_id = self.app_id
        sig_hex = _one(headers, "x-signature-ed25519")
        timestamp = _one(headers, "x-signature-timestamp")
        if sig_hex is None and timestamp is None:
            # Unsigned: only the console's validation may be answered (see the module note).
            try:
                payload = decode_payload(body, max_size=self._max_body)
            except RemoteProtocolError:
                return _reject(401, "missing_signature", "unsigned request", app_id)
            if payload.op is not Opcode.CALLBACK_URL_VALIDATION:
                return _reject(401, "missing_signature", "unsigned request", app_id)
            return self._validate(payload.d)
        error = self._verify(sig_hex, timestamp, body, wall_time)
        if error is not None:
            return error
        try:
            payload = decode_payload(body, max_size=self._max_body)
        except UnknownOpcode:
            # Signed by the platform, just newer than us: acknowledge, so it is not retried.
            return WebhookResult(response=_ACK, outcome=WebhookOutcome.IGNORED, app_id=app_id)
        except RemoteProtocolError as exc:
            return _reject(400, "invalid_body", f"signed body is not an envelope: {exc}", app_id)
        op = payload.op
        if op is Opcode.DISPATCH:
            return self._dispatch(payload.t, payload.s, payload.id, payload.d, now, room)
        if op is Opcode.CALLBACK_URL_VALIDATION:
            return self._validate(payload.d)
        if op is Opcode.HEARTBEAT:
            seq = payload.d if type(payload.d) is int else 0
            body_out = orjson.dumps({"op": 11, "d": seq})
            return WebhookResult(
                response=WebhookResponse(status=200, body=body_out),
                outcome=WebhookOutcome.HEARTBEAT,
                app_id=app_id,
            )
        return WebhookResult(response=_ACK, outcome=WebhookOutcome.IGNORED, app_id=app_id)

    def _verify(
        self, sig_hex: str | None, timestamp: str | None, body: bytes, wall_time: float | None
    ) -> WebhookResult | None:
        app_id = self.app_id
        if not sig_hex or not timestamp:
            return _reject(401, "missing_signature", "signature or timestamp missing", app_id)
        if not _TS_RE.fullmatch(timestamp):
            return _reject(401, "bad_timestamp", "timestamp is not Unix seconds", app_id)
        raw = sig_hex.encode("latin-1")
        # bytes.fromhex would skip spaces: check length and alphabet first.
        if len(raw) != 2 * _SIG_LEN or not _HEX.issuperset(raw):
            return _reject(401, "bad_signature", "signature is not 128 hex digits", app_id)
        signature = bytes.fromhex(sig_hex)
        if signature[63] & 0xE0:
            # A non-canonical encoding of S: libraries differ on whether they accept it, and
            # the platform never produces one.
            return _reject(401, "bad_signature", "signature is not canonical", app_id)
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

        try:
            self._public.verify(signature, timestamp.encode("ascii") + body)
        except InvalidSignature:
            return _reject(401, "bad_signature", "signature does not verify", app_id)
        max_skew = self._max_skew
        if (
            max_skew is not None
            and wall_time is not None
            and abs(wall_time - int(timestamp)) > max_skew
        ):
            return _reject(401, "stale_timestamp", "timestamp outside the window", app_id)
        return None

    def _validate(self, d: JSONValue) -> WebhookResult:
        app_id = self.app_id
        if type(d) is not dict:
            return _reject(400, "bad_validation", "op 13 without an object 'd'", app_id)
        token = d.get("plain_token")
        event_ts = d.get("event_ts")
        if type(event_ts) is int and event_ts >= 0:
            event_ts = str(event_ts)
        if type(token) is not str or type(event_ts) is not str:
            return _reject(400, "bad_validation", "op 13 fields missing", app_id)
        if not _TOKEN_RE.fullmatch(token) or not _TS_RE.fullmatch(event_ts):
            # What an attacker sends to get a dispatch signed: refuse, sign nothing.
            return _reject(400, "unsafe_validation", "op 13 fields not token-shaped", app_id)
        signature = self._key.sign((event_ts + token).encode("ascii")).hex()
        body = orjson.dumps({"plain_token": token, "signature": signature})
        return WebhookResult(
            response=WebhookResponse(status=200, body=body),
            outcome=WebhookOutcome.VALIDATED,
            app_id=app_id,
        )

    def _dispatch(  # noqa: PLR0917 - the envelope's fields, in envelope order
        self,
        t: str | None,
        s: int | None,
        event_id: str | None,
        d: JSONValue,
        now: float,
        room: bool,
    ) -> WebhookResult:
        app_id = self.app_id
        if t is None:
            return _reject(400, "invalid_body", "dispatch without 't'", app_id)
        if not room:
            # Not recorded: the retry the 503 asks for must be delivered, not dropped.
            return WebhookResult(
                response=_RETRY, outcome=WebhookOutcome.QUEUE_FULL, app_id=app_id, event_id=event_id
            )
        key: str | None = None
        if event_id is not None and self._seen_events.check_and_add(event_id, now):
            key = "event_id"
        elif t in self._dedup_types and type(d) is dict:
            message_id = d.get("id")
            if type(message_id) is str and self._seen_messages.check_and_add(message_id, now):
                key = "message_id"
        if key is not None:
            return WebhookResult(
                response=_ACK,
                outcome=WebhookOutcome.DUPLICATE,
                events=(DuplicateDropped(type=t, seq=s, key=key),),
                app_id=app_id,
                event_id=event_id,
            )
        return WebhookResult(
            response=_ACK,
            outcome=WebhookOutcome.DELIVERED,
            events=(make_dispatch(t, s, event_id, d),),
            app_id=app_id,
            event_id=event_id,
        )

# The platform's side of webhook delivery, without IO: what QQ would POST, signed as QQ
# signs it, plus the bad requests tests need (forged, tampered, truncated, replayed).
#
# The retry rule is modelled as a small plan (`WebhookRetryPolicy`): the platform re-sends
# the same callback, byte for byte with the same envelope `id`, when the ack is slow or not
# a 2xx, reportedly up to 3 times. Whether a retry is re-signed with a fresh timestamp is
# not known, so `resign=` lets a test try both.
"""A sans-IO signer of QQ webhook requests, for tests and the fake gateway."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from qqproto._webhook import derive_seed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from qqproto._codec import JSONValue

__all__ = ["SignedRequest", "WebhookRetryPolicy", "WebhookSigner", "is_ack"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedRequest:
    """One callback as the platform sends it.

    Attributes:
        headers: the request headers (names as the platform spells them).
        body: the exact body bytes that were signed (or tampered with).
        event_id: the envelope ``id`` (``None`` for op 13).
    """

    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)
    event_id: str | None = None

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``."""
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)

    def with_header(self, name: str, value: str | None) -> SignedRequest:
        """A copy with header ``name`` set to ``value`` (removed when ``None``)."""
        lower = name.lower()
        kept = tuple((k, v) for k, v in self.headers if k.lower() != lower)
        headers = kept if value is None else (*kept, (name, value))
        return dataclasses.replace(self, headers=headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookRetryPolicy:
    """How the platform retries a callback whose ack was slow or failed.

    Attributes:
        retries: re-sends after the first attempt (3, reportedly).
        ack_timeout: seconds an attempt waits for its answer.
        spacing: seconds between a failed attempt and the next.
    """

    retries: int = 3
    ack_timeout: float = 5.0
    spacing: float = 0.0

    @property
    def attempts(self) -> int:
        """Attempts in all, the first one included."""
        return self.retries + 1


def is_ack(status: int, body: bytes) -> bool:
    """Whether an answer acknowledges a dispatch (a 2xx with op 12, ``d`` 0)."""
    if not 200 <= status < 300:
        return False
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, dict) and value.get("op") == 12 and value.get("d") == 0


def _key(secret: str | bytes) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    return Ed25519PrivateKey.from_private_bytes(derive_seed(secret))


class WebhookSigner:
    """Builds and signs the requests the platform POSTs to a bot's callback URL.

    Args:
        app_id: the bot's app id (sent as ``X-Bot-Appid``).
        secret: the bot secret, from which the signing key is derived; never in the repr.
        clock: Unix seconds for ``X-Signature-Timestamp`` when a call passes none.
    """

    __slots__ = ("_ids", "_key", "_seq", "_tag", "app_id", "clock")

    def __init__(self, *, app_id: str, secret: str | bytes, clock: int = 1_728_981_195) -> None:
        self.app_id = app_id
        """The bot's app id."""
        self.clock = clock
        """The default timestamp (Unix seconds)."""
        self._key = _key(secret)
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        # Two signers (two test helpers, a retried demo) must never make the same id.
        self._tag = uuid.uuid4().hex[:12]

    def __repr__(self) -> str:
        return f"WebhookSigner(app_id={self.app_id!r})"

    def sign(self, timestamp: str, body: bytes) -> str:
        """The hex signature of ``timestamp + body``."""
        return self._key.sign(timestamp.encode("ascii") + body).hex()

    def signed(self, body: bytes, *, timestamp: int | str | None = None) -> SignedRequest:
        """``body`` with the platform's headers and a valid signature."""
        ts = str(self.clock if timestamp is None else timestamp)
        event_id: str | None = None
        try:
            envelope = orjson.loads(body)
        except orjson.JSONDecodeError:
            envelope = None
        if isinstance(envelope, dict) and isinstance(envelope.get("id"), str):
            event_id = envelope["id"]
        headers = (
            ("User-Agent", "QQBot-Callback"),
            ("X-Bot-Appid", self.app_id),
            ("X-Signature-Method", "Ed25519"),
            ("X-Signature-Timestamp", ts),
            ("X-Signature-Ed25519", self.sign(ts, body)),
        )
        return SignedRequest(headers=headers, body=body, event_id=event_id)

    def dispatch(
        self,
        t: str,
        d: JSONValue,
        *,
        event_id: str | None = None,
        seq: int | None = None,
        timestamp: int | str | None = None,
    ) -> SignedRequest:
        """A signed op 0 dispatch; ``event_id`` defaults to a fresh one, ``s`` is left out
        unless ``seq`` is given (the platform may omit it)."""
        envelope: dict[str, JSONValue] = {
            "id": event_id if event_id is not None else f"{t}:fake-{self._tag}-{next(self._ids)}",
            "op": 0,
            "d": d,
            "t": t,
        }
        if seq is not None:
            envelope["s"] = seq
        return self.signed(orjson.dumps(envelope), timestamp=timestamp)

    def message(self, content: str = "hello", *, event_id: str | None = None) -> SignedRequest:
        """A signed ``C2C_MESSAGE_CREATE`` with a fresh message id."""
        n = next(self._seq)
        d: dict[str, JSONValue] = {
            "id": f"ROBOT1.0_fake-{self._tag}-{n}",
            "content": content,
            "timestamp": "2024-10-15T16:33:15+08:00",
            "author": {"id": "675860273", "user_openid": "675860273"},
        }
        return self.dispatch("C2C_MESSAGE_CREATE", d, event_id=event_id)

    def validation(
        self,
        plain_token: str = "Arq0D5A61EgUu4OxUvOp",  # noqa: S107 - the official docs' example
        event_ts: str = "1725442341",
    ) -> SignedRequest:
        """The console's op 13 callback validation (unsigned, as most receivers expect)."""
        body = orjson.dumps({"d": {"plain_token": plain_token, "event_ts": event_ts}, "op": 13})
        headers = (("User-Agent", "QQBot-Callback"), ("X-Bot-Appid", self.app_id))
        return SignedRequest(headers=headers, body=body)

    def check_validation(self, request: SignedRequest, status: int, body: bytes) -> bool:
        """Whether ``body`` is a correct answer to the validation ``request``."""
        if status != 200:
            return False
        try:
            sent = orjson.loads(request.body)["d"]
            answer = orjson.loads(body)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False
        if not isinstance(answer, dict) or answer.get("plain_token") != sent["plain_token"]:
            return False
        expected = self.sign(sent["event_ts"], sent["plain_token"].encode())
        return answer.get("signature") == expected

    # ------------------------------------------------------------------ bad requests

    @staticmethod
    def forge(request: SignedRequest, *, secret: str | None = None) -> SignedRequest:
        """The same request signed with another key (what an impostor can do): the one
        derived from ``secret``, or a fresh random key."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )

        ts = request.header("X-Signature-Timestamp") or "0"
        key = Ed25519PrivateKey.generate() if secret is None else _key(secret)
        signature = key.sign(ts.encode("ascii") + request.body).hex()
        return request.with_header("X-Signature-Ed25519", signature)

    @staticmethod
    def tamper(request: SignedRequest, *, at: int = -2) -> SignedRequest:
        """The request with one body byte changed and the signature kept."""
        body = bytearray(request.body)
        body[at] ^= 0x01
        return dataclasses.replace(request, body=bytes(body))

    @staticmethod
    def truncate(request: SignedRequest, *, chars: int = 2) -> SignedRequest:
        """The request with its signature cut short by ``chars`` hex digits."""
        signature = request.header("X-Signature-Ed25519") or ""
        return request.with_header("X-Signature-Ed25519", signature[:-chars])

    def resign(self, request: SignedRequest, *, timestamp: int | str) -> SignedRequest:
        """The same body, signed again with another timestamp (a re-signed retry)."""
        ts = str(timestamp)
        return request.with_header("X-Signature-Timestamp", ts).with_header(
            "X-Signature-Ed25519", self.sign(ts, request.body)
        )

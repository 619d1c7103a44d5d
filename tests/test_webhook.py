"""The sans-IO webhook receiver: signatures, op 13, dedup, limits, routing, totality."""

from __future__ import annotations

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qqproto import (
    Dispatch,
    DuplicateDropped,
    LocalProtocolError,
    WebhookOutcome,
    WebhookReceiver,
    WebhookRejected,
    WebhookResult,
    WebhookRouter,
    derive_seed,
)
from qqproto._dedup import SeenIds
from qqproto._webhook_answers import ACK_BODY, RETRY_BODY
from qqproto.testing._fake_webhook import SignedRequest, WebhookSigner, is_ack

APP = "102000001"
SECRET = "DG5g3B4j9X2KOErG"

# The official validation vector (bot-docs, "Webhook方式").
VALIDATION_BODY = b'{"d":{"plain_token":"Arq0D5A61EgUu4OxUvOp","event_ts":"1725442341"},"op":13}'
VALIDATION_SIGNATURE = (
    "87befc99c42c651b3aac0278e71ada338433ae26fcb24307bdc5ad38c1adc2d0"
    "1bcfcadc0842edac85e85205028a1132afe09280305f13aa6909ffc2d652c706"
)
# botgo's interaction/signature unit test.
BOTGO_SECRET = "123456abcdef"
BOTGO_TIMESTAMP = "1728981195"
BOTGO_BODY = (
    '{"id":"ROBOT1.0_veoihSEXDc8Q.g-6eLpNIa11bH8MisOjn-m-LKxCPntMk6exUXgcWCGpVO7L2QKTNZzjZzFFD'
    'SbiOFcqAPWyVA!!","content":"哦一下","timestamp":"2024-10-15T16:33:15+08:00","author":'
    '{"id":"675860273","user_openid":"675860273"}}'
).encode()
BOTGO_SIGNATURE = (
    "e949b5b94ef4103df903fb031d1d16e358db3db83e79e117edd404c8508be3ce"
    "8a76d7bad1bed353194c126a1a5915b4ad8b5288c1191cc53a12acffccd82004"
)


def receiver(secret: str = SECRET, **kwargs) -> WebhookReceiver:
    return WebhookReceiver(app_id=APP, secret=secret, **kwargs)


def signer(secret: str = SECRET) -> WebhookSigner:
    return WebhookSigner(app_id=APP, secret=secret)


def send(
    rx: WebhookReceiver | WebhookRouter,
    request: SignedRequest,
    *,
    now: float = 0.0,
    method: str = "POST",
    room: bool = True,
) -> WebhookResult:
    return rx.receive(
        method=method, path="/qq", headers=request.headers, body=request.body, now=now, room=room
    )


def raw(headers, body: bytes) -> SignedRequest:
    return SignedRequest(headers=tuple(headers), body=body)


# ------------------------------------------------------------------------------ vectors


def test_key_derivation_vector():
    secret = "naOC0ocQE3shWLAfffVLB1rhYPG7"
    assert derive_seed(secret) == b"naOC0ocQE3shWLAfffVLB1rhYPG7naOC"
    assert receiver(secret).public_key.hex() == (
        "d7c362fe78aef81ff23287b493628b5db02a3c4fe30b215e4d19609b5d76673a"
    )


def test_seed_of_short_and_long_secrets():
    assert derive_seed("ab") == b"ab" * 16
    assert derive_seed("x" * 40) == b"x" * 32
    assert derive_seed(SECRET) == b"DG5g3B4j9X2KOErGDG5g3B4j9X2KOErG"
    with pytest.raises(LocalProtocolError):
        derive_seed("")


def test_official_validation_vector():
    result = send(receiver(), raw([("X-Bot-Appid", APP)], VALIDATION_BODY))
    assert result.outcome is WebhookOutcome.VALIDATED
    assert result.response.status == 200
    assert orjson.loads(result.response.body) == {
        "plain_token": "Arq0D5A61EgUu4OxUvOp",
        "signature": VALIDATION_SIGNATURE,
    }
    assert result.events == ()


def test_botgo_dispatch_vector_verifies():
    rx = receiver(BOTGO_SECRET)
    key = Ed25519PublicKey.from_public_bytes(rx.public_key)
    key.verify(bytes.fromhex(BOTGO_SIGNATURE), BOTGO_TIMESTAMP.encode() + BOTGO_BODY)
    headers = [
        ("X-Bot-Appid", APP),
        ("X-Signature-Ed25519", BOTGO_SIGNATURE),
        ("X-Signature-Timestamp", BOTGO_TIMESTAMP),
    ]
    result = send(rx, raw(headers, BOTGO_BODY))
    # botgo's body is a message object, not an envelope (no "op"): it passes the signature
    # check and is then refused as a signed non-envelope, 400, not 401.
    assert result.error is not None
    assert (result.response.status, result.error.reason) == (400, "invalid_body")
    tampered = send(rx, raw(headers, BOTGO_BODY.replace(b"675860273", b"675860274", 1)))
    assert tampered.error is not None
    assert (tampered.response.status, tampered.error.reason) == (401, "bad_signature")


def test_signer_agrees_with_the_vectors():
    assert signer(BOTGO_SECRET).sign(BOTGO_TIMESTAMP, BOTGO_BODY) == BOTGO_SIGNATURE
    s = signer()
    request = s.validation()
    assert request.body == orjson.dumps(
        {"d": {"plain_token": "Arq0D5A61EgUu4OxUvOp", "event_ts": "1725442341"}, "op": 13}
    )
    answer = send(receiver(), request)
    assert s.check_validation(request, answer.response.status, answer.response.body)
    assert not s.check_validation(request, 200, b'{"plain_token":"x","signature":"00"}')


# --------------------------------------------------------------------------- dispatches


def test_signed_dispatch_becomes_the_cores_dispatch():
    s = signer()
    request = s.dispatch("C2C_MESSAGE_CREATE", {"id": "m-1", "content": "hi"}, event_id="ev-1")
    result = send(receiver(), request)
    assert result.outcome is WebhookOutcome.DELIVERED
    assert result.response.status == 200
    assert result.response.body == ACK_BODY
    assert is_ack(result.response.status, result.response.body)
    assert result.events == (
        Dispatch(
            type="C2C_MESSAGE_CREATE",
            seq=None,
            event_id="ev-1",
            data={"id": "m-1", "content": "hi"},
        ),
    )
    assert result.event_id == "ev-1"
    assert result.app_id == APP


def test_seq_is_kept_when_sent():
    result = send(receiver(), signer().dispatch("GROUP_ADD_ROBOT", {}, seq=42))
    assert isinstance(result.events[0], Dispatch)
    assert result.events[0].seq == 42


def test_uppercase_hex_signature_accepted():
    request = signer().dispatch("GROUP_ADD_ROBOT", {"x": 1})
    upper = request.with_header(
        "X-Signature-Ed25519", (request.header("X-Signature-Ed25519") or "").upper()
    )
    assert send(receiver(), upper).outcome is WebhookOutcome.DELIVERED


def _sig(request: SignedRequest) -> str:
    value = request.header("X-Signature-Ed25519")
    assert value is not None
    return value


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (WebhookSigner.forge, "bad_signature"),
        (lambda r: WebhookSigner.forge(r, secret="another-bots-secret"), "bad_signature"),
        (WebhookSigner.tamper, "bad_signature"),
        (lambda r: WebhookSigner.tamper(r, at=0), "bad_signature"),
        (WebhookSigner.truncate, "bad_signature"),
        (lambda r: WebhookSigner.truncate(r, chars=127), "bad_signature"),
        (lambda r: r.with_header("X-Signature-Ed25519", _sig(r) + "00"), "bad_signature"),
        (lambda r: r.with_header("X-Signature-Ed25519", "zz" + _sig(r)[2:]), "bad_signature"),
        # bytes.fromhex would skip the space and read 63 bytes.
        (lambda r: r.with_header("X-Signature-Ed25519", _sig(r)[:-2] + " 0"), "bad_signature"),
        (lambda r: r.with_header("X-Signature-Ed25519", "é" * 128), "bad_signature"),
        (lambda r: r.with_header("X-Signature-Ed25519", None), "missing_signature"),
        (lambda r: r.with_header("X-Signature-Ed25519", ""), "missing_signature"),
        (lambda r: r.with_header("X-Signature-Timestamp", None), "missing_signature"),
        (lambda r: r.with_header("X-Signature-Timestamp", "12a"), "bad_timestamp"),
        (lambda r: r.with_header("X-Signature-Timestamp", "١٢٣"), "bad_timestamp"),
        (lambda r: r.with_header("X-Signature-Timestamp", "1728981196"), "bad_signature"),
        (
            lambda r: r.with_header("X-Signature-Timestamp", None).with_header(
                "X-Signature-Ed25519", None
            ),
            "missing_signature",
        ),
    ],
)
def test_bad_signatures_rejected(mutate, reason):
    request = signer().dispatch("C2C_MESSAGE_CREATE", {"id": "m-1"}, event_id="ev-1")
    rx = receiver()
    result = send(rx, mutate(request))
    assert result.outcome is WebhookOutcome.REJECTED
    assert result.response.status == 401
    assert result.error is not None
    assert result.error.reason == reason
    assert result.events == ()
    # Nothing was recorded: the genuine request is still delivered afterwards.
    assert send(rx, request).outcome is WebhookOutcome.DELIVERED


def test_repeated_signature_header_rejected():
    request = signer().dispatch("GROUP_ADD_ROBOT", {})
    doubled = raw([*request.headers, ("x-signature-ed25519", _sig(request))], request.body)
    result = send(receiver(), doubled)
    assert result.response.status == 401


def test_non_canonical_signature_rejected_before_verifying():
    request = signer().dispatch("GROUP_ADD_ROBOT", {})
    sig = bytearray(bytes.fromhex(_sig(request)))
    sig[63] |= 0x20
    result = send(receiver(), request.with_header("X-Signature-Ed25519", sig.hex()))
    assert result.error is not None
    assert result.error.reason == "bad_signature"
    assert "canonical" in str(result.error)


# ------------------------------------------------------------------------ signing oracle


def test_op13_cannot_be_used_to_sign_a_forged_dispatch():
    """The attack: the forged body in plain_token, its timestamp in event_ts."""
    rx = receiver()
    forged = orjson.dumps(
        {"id": "evil", "op": 0, "t": "C2C_MESSAGE_CREATE", "d": {"content": "pay me"}}
    )
    timestamp = "1728981195"
    attack = orjson.dumps({"op": 13, "d": {"plain_token": forged.decode(), "event_ts": timestamp}})
    answer = send(rx, raw([("X-Bot-Appid", APP)], attack))
    assert answer.outcome is WebhookOutcome.REJECTED
    assert answer.response.status == 400
    assert answer.error is not None
    assert answer.error.reason == "unsafe_validation"
    assert b"signature" not in answer.response.body
    # Had it been signed, the signature would have been a valid one for the forgery:
    oracle = signer().sign(timestamp, forged)
    forged_request = raw(
        [
            ("X-Bot-Appid", APP),
            ("X-Signature-Timestamp", timestamp),
            ("X-Signature-Ed25519", oracle),
        ],
        forged,
    )
    assert send(receiver(), forged_request).outcome is WebhookOutcome.DELIVERED


@pytest.mark.parametrize(
    "d",
    [
        {"plain_token": "abc def", "event_ts": "1"},
        {"plain_token": "{", "event_ts": "1"},
        {"plain_token": "a" * 65, "event_ts": "1"},
        {"plain_token": "", "event_ts": "1"},
        {"plain_token": "abc", "event_ts": "1.5"},
        {"plain_token": "abc", "event_ts": " 1"},
        {"plain_token": "abc", "event_ts": "1" * 21},
        {"plain_token": "abc", "event_ts": "{}"},
        {"plain_token": "abc", "event_ts": -1},
    ],
)
def test_op13_refuses_anything_not_token_shaped(d):
    result = send(receiver(), raw([("X-Bot-Appid", APP)], orjson.dumps({"op": 13, "d": d})))
    assert result.response.status == 400
    assert result.error is not None
    assert result.error.reason in {"unsafe_validation", "bad_validation"}


@pytest.mark.parametrize("d", [None, [], "x", {"plain_token": "abc"}, {"event_ts": "1"}])
def test_op13_without_its_fields(d):
    result = send(receiver(), raw([("X-Bot-Appid", APP)], orjson.dumps({"op": 13, "d": d})))
    assert result.response.status == 400
    assert result.error is not None
    assert result.error.reason == "bad_validation"


def test_op13_integer_event_ts_is_signed_as_its_digits():
    body = orjson.dumps({"op": 13, "d": {"plain_token": "Arq0D5A61EgUu4OxUvOp", "event_ts": 17}})
    result = send(receiver(), raw([("X-Bot-Appid", APP)], body))
    assert orjson.loads(result.response.body)["signature"] == signer().sign(
        "17", b"Arq0D5A61EgUu4OxUvOp"
    )


_TOKENS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=1,
    max_size=64,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=_TOKENS, ts=st.from_regex(r"[0-9]{1,20}", fullmatch=True))
def test_no_validation_answer_verifies_as_a_dispatch(token, ts):
    rx = receiver()
    body = orjson.dumps({"op": 13, "d": {"plain_token": token, "event_ts": ts}})
    answer = send(rx, raw([("X-Bot-Appid", APP)], body))
    assert answer.outcome is WebhookOutcome.VALIDATED
    signature = orjson.loads(answer.response.body)["signature"]
    message = (ts + token).encode()
    for cut in range(1, len(message)):
        reused = raw(
            [
                ("X-Bot-Appid", APP),
                ("X-Signature-Timestamp", message[:cut].decode()),
                ("X-Signature-Ed25519", signature),
            ],
            message[cut:],
        )
        result = send(rx, reused, now=1.0)
        assert result.outcome not in {WebhookOutcome.DELIVERED, WebhookOutcome.DUPLICATE}
        assert result.events == ()


def test_signed_op13_is_answered_and_a_forged_signed_one_is_not():
    s = signer()
    signed = s.signed(VALIDATION_BODY)
    assert send(receiver(), signed).outcome is WebhookOutcome.VALIDATED
    assert send(receiver(), WebhookSigner.forge(signed)).response.status == 401


# ------------------------------------------------------------------------------- dedup


def test_sequential_retries_delivered_once():
    s = signer()
    rx = receiver()
    request = s.dispatch("C2C_MESSAGE_CREATE", {"id": "m-1"}, event_id="ev-1")
    results = [send(rx, request, now=float(i)) for i in range(4)]
    assert [r.outcome for r in results] == [
        WebhookOutcome.DELIVERED,
        WebhookOutcome.DUPLICATE,
        WebhookOutcome.DUPLICATE,
        WebhookOutcome.DUPLICATE,
    ]
    assert all(r.response.body == ACK_BODY and r.response.status == 200 for r in results)
    assert results[1].events == (
        DuplicateDropped(type="C2C_MESSAGE_CREATE", seq=None, key="event_id"),
    )
    assert rx.counts == {"delivered": 1, "duplicate": 3}


def test_resigned_retry_with_a_fresh_timestamp_is_still_a_duplicate():
    s = signer()
    rx = receiver()
    request = s.dispatch("GROUP_ADD_ROBOT", {}, event_id="ev-9")
    assert send(rx, request).outcome is WebhookOutcome.DELIVERED
    assert send(rx, s.resign(request, timestamp=1728981300)).outcome is WebhookOutcome.DUPLICATE


def test_same_message_under_another_envelope_id_is_a_duplicate():
    s = signer()
    rx = receiver()
    d = {"id": "ROBOT1.0_msg", "content": "hi"}
    assert send(rx, s.dispatch("C2C_MESSAGE_CREATE", d, event_id="a")).outcome.value == "delivered"
    second = send(rx, s.dispatch("C2C_MESSAGE_CREATE", d, event_id="b"))
    assert second.events == (
        DuplicateDropped(type="C2C_MESSAGE_CREATE", seq=None, key="message_id"),
    )
    # Not a message type: `d.id` names something else (a guild) and is not deduplicated.
    assert send(rx, s.dispatch("GUILD_UPDATE", d, event_id="c")).outcome.value == "delivered"
    assert send(rx, s.dispatch("GUILD_UPDATE", d, event_id="d")).outcome.value == "delivered"


def test_an_id_is_forgotten_after_the_dedup_window():
    rx = receiver()
    request = signer().dispatch("GROUP_ADD_ROBOT", {}, event_id="ev-1")
    assert send(rx, request, now=0.0).outcome is WebhookOutcome.DELIVERED
    assert send(rx, request, now=3600.0).outcome is WebhookOutcome.DUPLICATE
    assert send(rx, request, now=3601.0).outcome is WebhookOutcome.DELIVERED


def test_a_shared_memory_deduplicates_across_receivers():
    # Shared while empty: an empty SeenIds is falsy, and must still be the one used.
    shared = SeenIds(max_items=100, max_age=60.0)
    first, second = receiver(seen_events=shared), receiver(seen_events=shared)
    assert first.seen_events is shared
    request = signer().dispatch("GROUP_ADD_ROBOT", {}, event_id="ev-1")
    assert send(first, request).outcome is WebhookOutcome.DELIVERED
    assert send(second, request).outcome is WebhookOutcome.DUPLICATE
    # What a GatewayConnection recorded (same SeenIds, same clock) counts as delivered too.
    shared.check_and_add("ev-from-websocket", 0.0)
    ws = signer().dispatch("GROUP_ADD_ROBOT", {}, event_id="ev-from-websocket")
    assert send(second, ws).outcome is WebhookOutcome.DUPLICATE


def test_dispatch_without_id_is_delivered_every_time():
    rx = receiver()
    body = orjson.dumps({"op": 0, "t": "GROUP_ADD_ROBOT", "d": {}})
    request = signer().signed(body)
    assert send(rx, request).outcome is WebhookOutcome.DELIVERED
    assert send(rx, request).outcome is WebhookOutcome.DELIVERED


# --------------------------------------------------------------------------- queue full


def test_queue_full_asks_for_a_retry_and_records_nothing():
    rx = receiver()
    request = signer().dispatch("GROUP_ADD_ROBOT", {}, event_id="ev-1")
    full = send(rx, request, room=False)
    assert full.outcome is WebhookOutcome.QUEUE_FULL
    assert (full.response.status, full.response.body) == (503, RETRY_BODY)
    assert full.events == ()
    assert not is_ack(full.response.status, full.response.body)
    assert rx.counts["queue_full"] == 1
    assert send(rx, request).outcome is WebhookOutcome.DELIVERED


def test_queue_full_does_not_refuse_validation():
    assert send(receiver(), signer().validation(), room=False).outcome is WebhookOutcome.VALIDATED


# ------------------------------------------------------------------------------ limits


def test_methods_other_than_post_are_405():
    rx = receiver()
    for method in ("GET", "PUT", "HEAD", "DELETE", b"OPTIONS"):
        result = rx.receive(method=method, path="/", headers=[], body=b"", now=0.0)
        assert result.response.status == 405
        assert (b"allow", b"POST") in result.response.headers


def test_body_over_the_limit_is_413_from_the_head_or_the_body():
    rx = receiver(max_body=100)
    headers = [(b"x-bot-appid", APP.encode())]
    pre = rx.precheck(method="POST", path="/", headers=headers, content_length=101)
    assert pre is not None
    assert pre.response.status == 413
    assert rx.precheck(method="POST", path="/", headers=headers, content_length=100) is None
    assert rx.precheck(method="POST", path="/", headers=headers, content_length=None) is None
    result = rx.receive(method="POST", path="/", headers=headers, body=b"x" * 101, now=0.0)
    assert result.response.status == 413


def test_the_default_limit_is_one_mebibyte():
    rx = receiver()
    assert rx.max_body == 1 << 20
    pre = rx.precheck(method="POST", path="/", headers=[], content_length=(1 << 20) + 1)
    assert pre is not None
    assert pre.response.status == 413


@pytest.mark.parametrize(
    ("appid", "reason"), [(None, "missing_app_id"), ("999", "wrong_app_id"), ("", "wrong_app_id")]
)
def test_wrong_or_missing_app_id_is_403(appid, reason):
    request = signer().dispatch("GROUP_ADD_ROBOT", {}).with_header("X-Bot-Appid", appid)
    result = send(receiver(), request)
    assert result.response.status == 403
    assert result.error is not None
    assert result.error.reason == reason


def test_path_is_checked_when_configured():
    rx = receiver(path="/qq")
    request = signer().dispatch("GROUP_ADD_ROBOT", {})
    kwargs = {"method": "POST", "headers": request.headers, "body": request.body, "now": 0.0}
    assert rx.receive(path="/other", **kwargs).response.status == 404
    assert rx.receive(path="/qq?x=1", **kwargs).response.status == 200


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1,2]", b'{"op":"0"}', b'{"op":0,"d":{}}', b"\xff\xfe", b'{"op":0,"t":1}'],
)
def test_signed_but_not_an_envelope_is_400(body):
    result = send(receiver(), signer().signed(body))
    assert result.response.status == 400
    assert result.error is not None
    assert result.error.reason == "invalid_body"


def test_unsigned_non_validation_is_401_even_if_not_json():
    rx = receiver()
    for body in (b"not json", orjson.dumps({"op": 0, "t": "X", "d": {}, "id": "a"})):
        result = send(rx, raw([("X-Bot-Appid", APP)], body))
        assert result.response.status == 401


def test_other_signed_opcodes():
    rx = receiver()
    beat = send(rx, signer().signed(b'{"op":1,"d":7}'))
    assert beat.outcome is WebhookOutcome.HEARTBEAT
    assert orjson.loads(beat.response.body) == {"op": 11, "d": 7}
    unknown = send(rx, signer().signed(b'{"op":99,"d":null}'))
    assert unknown.outcome is WebhookOutcome.IGNORED
    assert unknown.response.status == 200


def test_timestamp_window_when_enabled():
    rx = receiver(max_skew=300.0)
    request = signer().dispatch("GROUP_ADD_ROBOT", {}, timestamp=1_000_000)
    kwargs = {"method": "POST", "path": "/", "headers": request.headers, "body": request.body}
    stale = rx.receive(now=0.0, wall_time=1_000_301.0, **kwargs)
    assert stale.error is not None
    assert stale.error.reason == "stale_timestamp"
    assert rx.receive(now=0.0, wall_time=1_000_299.0, **kwargs).outcome.value == "delivered"


# ------------------------------------------------------------------------------ router


def test_router_routes_by_app_id():
    a = WebhookReceiver(app_id="1", secret="secret-one")
    b = WebhookReceiver(app_id="2", secret="secret-two")
    router = WebhookRouter([a, b])
    sa = WebhookSigner(app_id="1", secret="secret-one")
    sb = WebhookSigner(app_id="2", secret="secret-two")
    ra = send(router, sa.dispatch("GROUP_ADD_ROBOT", {}, event_id="same"))
    rb = send(router, sb.dispatch("GROUP_ADD_ROBOT", {}, event_id="same"))
    assert (ra.app_id, ra.outcome, rb.app_id, rb.outcome) == (
        "1",
        WebhookOutcome.DELIVERED,
        "2",
        WebhookOutcome.DELIVERED,
    )
    # Bot 2's signature is no good for bot 1.
    crossed = sb.dispatch("GROUP_ADD_ROBOT", {}).with_header("X-Bot-Appid", "1")
    assert send(router, crossed).response.status == 401
    unknown = send(router, sa.dispatch("GROUP_ADD_ROBOT", {}).with_header("X-Bot-Appid", "3"))
    assert unknown.response.status == 403
    assert router.counts == {"unknown_app_id": 1}
    assert send(router, sa.validation()).outcome is WebhookOutcome.VALIDATED
    assert router.precheck(method="GET", path="/", headers=[], content_length=0) is not None


def test_router_refuses_duplicate_app_ids_and_emptiness():
    with pytest.raises(LocalProtocolError):
        WebhookRouter([receiver(), receiver()])
    with pytest.raises(LocalProtocolError):
        WebhookRouter([])


# ------------------------------------------------------------------------------ secrets


def test_secrets_never_in_repr_or_errors():
    secret = "Sup3rS3cretValue"
    rx = receiver(secret)
    seed = derive_seed(secret)
    texts = [repr(rx), repr(WebhookRouter([rx])), repr(WebhookSigner(app_id=APP, secret=secret))]
    request = WebhookSigner(app_id=APP, secret=secret).dispatch("X", {"content": "private"})
    for bad in (WebhookSigner.forge(request), WebhookSigner.tamper(request), raw([], b"{")):
        result = send(rx, bad)
        texts += [repr(result), str(result.error), result.response.body.decode()]
    texts.append(repr(send(rx, request)))
    for text in texts:
        assert secret not in text
        assert seed.decode() not in text
        assert "private" not in text


# --------------------------------------------------------------------------- totality

_HEADER_NAMES = st.sampled_from(
    [
        "X-Bot-Appid",
        "x-signature-ed25519",
        "X-Signature-Timestamp",
        "content-type",
        "User-Agent",
        "X-Other",
    ]
)
_VALUES = st.one_of(
    st.text(max_size=140),
    st.just(APP),
    st.from_regex(r"[0-9a-fA-F]{128}", fullmatch=True),
    st.from_regex(r"[0-9]{1,12}", fullmatch=True),
)
_BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda op, d, t, i: orjson.dumps({"op": op, "d": d, "t": t, "id": i}),
        st.integers(-2, 20),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=10), inner, max_size=3)
            ),
            max_leaves=10,
        ),
        st.none() | st.text(max_size=10),
        st.none() | st.text(max_size=10),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["POST", "GET", "post", "", "PATCH"]),
    headers=st.lists(st.tuples(_HEADER_NAMES, _VALUES), max_size=6),
    body=_BODIES,
    sign=st.booleans(),
    room=st.booleans(),
)
def test_any_request_gets_a_typed_answer(method, headers, body, sign, room):
    rx = receiver()
    if sign:
        headers = [*headers, *signer().signed(body).headers]
    result = rx.receive(method=method, path="/", headers=headers, body=body, now=0.0, room=room)
    assert isinstance(result, WebhookResult)
    status = result.response.status
    assert status in {200, 400, 401, 403, 405, 413, 503}
    if status >= 400 and status != 503:
        assert result.outcome is WebhookOutcome.REJECTED
        assert isinstance(result.error, WebhookRejected)
        assert result.error.status == status
        assert result.events == ()
    else:
        assert result.error is None
    if result.outcome is WebhookOutcome.DELIVERED:
        assert sign  # nothing unsigned is ever delivered
        assert len(result.events) == 1
    orjson.loads(result.response.body)  # always a JSON body

"""Webhook signatures: sign, and what a receiver verifies."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from conveyor.tasks.webhook import WebhookPayload, sign, verify

SECRET = b"s3cret"
BODY = b'{"event":"done","id":1}'
TS = "1700000000"


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, TS, BODY) == f"sha256={expected}"


def test_signature_depends_on_every_input() -> None:
    base = sign(SECRET, TS, BODY)
    assert sign(b"other", TS, BODY) != base
    assert sign(SECRET, "1700000001", BODY) != base
    assert sign(SECRET, TS, BODY + b" ") != base


def test_verify_accepts_a_fresh_signature() -> None:
    assert verify(SECRET, TS, BODY, sign(SECRET, TS, BODY), now=1700000000.0)


def test_verify_uses_the_clock_by_default() -> None:
    ts = str(int(time.time()))
    assert verify(SECRET, ts, BODY, sign(SECRET, ts, BODY))
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, old, BODY, sign(SECRET, old, BODY))


@pytest.mark.parametrize(("offset", "ok"), [
    (0, True), (300, True), (-300, True), (301, False), (-301, False), (10_000, False),
])
def test_verify_tolerance(offset: float, ok: bool) -> None:
    signature = sign(SECRET, TS, BODY)
    assert verify(SECRET, TS, BODY, signature, now=1700000000 + offset) is ok


def test_verify_custom_tolerance() -> None:
    signature = sign(SECRET, TS, BODY)
    assert verify(SECRET, TS, BODY, signature, tolerance_s=5, now=1700000005)
    assert not verify(SECRET, TS, BODY, signature, tolerance_s=5, now=1700000006)


def test_verify_rejects_tampered_body() -> None:
    signature = sign(SECRET, TS, BODY)
    tampered = BODY.replace(b"1", b"2")
    assert not verify(SECRET, TS, tampered, signature, now=1700000000)


def test_verify_rejects_wrong_secret_and_replayed_timestamp() -> None:
    signature = sign(SECRET, TS, BODY)
    assert not verify(b"guess", TS, BODY, signature, now=1700000000)
    # the timestamp is signed: moving it forward breaks the signature
    assert not verify(SECRET, "1700000100", BODY, signature, now=1700000100)


@pytest.mark.parametrize("signature", ["", "sha256=", "sha1=abc", "sha256=" + "0" * 64])
def test_verify_rejects_malformed_signatures(signature: str) -> None:
    assert not verify(SECRET, TS, BODY, signature, now=1700000000)


@pytest.mark.parametrize("timestamp", ["", "soon", "1700000000.5", "0x10"])
def test_verify_rejects_non_integer_timestamps(timestamp: str) -> None:
    assert not verify(SECRET, timestamp, BODY, sign(SECRET, timestamp, BODY), now=1700000000)


def test_payload_defaults_and_validation() -> None:
    payload = WebhookPayload.model_validate({"url": "https://example.com/hook"})
    assert payload.body == {}
    assert payload.headers == {}
    assert payload.timeout_s == 10.0
    for bad in ({"url": "not a url"}, {"url": "https://e.x", "timeout_s": 0},
                {"url": "https://e.x", "extra": 1}):
        with pytest.raises(ValueError, match="validation error"):
            WebhookPayload.model_validate(bad)

"""Webhook signatures: sign, and what a receiver verifies."""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx
import pytest
import structlog
from structlog.testing import capture_logs

from conveyor.config import DEV_WEBHOOK_SECRET, Settings
from conveyor.egress.policy import EgressPolicy, installed
from conveyor.tasks import app as builtin
from conveyor.tasks import webhook
from conveyor.tasks.webhook import WebhookPayload, sign, verify, verify_request

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


def test_verify_request_reads_the_headers_in_any_case() -> None:
    signature = sign("s3cret", TS, BODY)
    headers = {"x-conveyor-timestamp": TS, "X-CONVEYOR-SIGNATURE": signature}
    assert verify_request("s3cret", headers, BODY, now=1700000000)
    assert verify_request(SECRET, headers, BODY, now=1700000000)  # bytes or str
    assert not verify_request("other", headers, BODY, now=1700000000)
    assert not verify_request("s3cret", {"X-Conveyor-Timestamp": TS}, BODY, now=1700000000)
    assert not verify_request("s3cret", headers, BODY, now=1700000000 + 301)


def test_the_development_secret_is_a_warning_for_webhook_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A logger cached by an earlier `logs.configure()` would bypass capture_logs.
    monkeypatch.setattr(webhook, "log", structlog.get_logger("conveyor.webhook"))
    types = list(builtin.registry)
    thumbnail_only = [t for t in types if t.name == "thumbnail"]
    development = Settings(webhook_secret=DEV_WEBHOOK_SECRET)
    configured = Settings(webhook_secret="set-in-production")
    with capture_logs() as logs:
        assert webhook.warn_if_development_secret(development, types)
        assert not webhook.warn_if_development_secret(development, thumbnail_only)
        assert not webhook.warn_if_development_secret(configured, types)
    assert [(e["event"], e["log_level"], e["task_types"]) for e in logs] == [
        ("webhook.secret.development", "warning", ["webhook"])]


@pytest.mark.parametrize(("url", "named"), [
    ("http://2130706433/", "127.0.0.1 is loopback"),
    ("http://0x7f000001/", "127.0.0.1 is loopback"),
    ("http://0.0.0.0/", "0.0.0.0 is 'this network'"),
    ("http://[::ffff:127.0.0.1]/", "(127.0.0.1) is loopback"),
    ("http://localhost:8080/", "localhost names the loopback interface"),
    ("http://hooks.localhost/", "hooks.localhost names the loopback interface"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
    ("https://example.com:11211/", "port 11211 is memcached's"),
])
def test_the_payload_refuses_a_destination_the_url_shows_is_denied(url: str, named: str) -> None:
    with pytest.raises(ValueError, match="destination refused") as refused:
        WebhookPayload.model_validate({"url": url})
    assert named in str(refused.value)


def test_the_payload_checks_under_the_installed_allow_ranges() -> None:
    loopback = EgressPolicy.allowing(["127.0.0.1/32"])
    with installed(loopback):
        assert WebhookPayload.model_validate({"url": "http://127.0.0.1:8080/"}).url.port == 8080
        with pytest.raises(ValueError, match="cloud metadata"):
            WebhookPayload.model_validate({"url": "http://169.254.169.254/"})
    with pytest.raises(ValueError, match="loopback"):
        WebhookPayload.model_validate({"url": "http://127.0.0.1:8080/"})
    # a name is left to the connect-time check, which resolves it
    assert WebhookPayload.model_validate({"url": "https://hooks.example.com/x"})


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), ("99999", webhook.MAX_RETRY_AFTER_S), ("", None), ("soon", None),
    ("1.5", None), ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ("²", None), ("٣", None),  # digits to str.isdigit, not to float(): no ValueError
])
def test_retry_after_takes_ascii_seconds_only(value: str, expected: float | None) -> None:
    response = httpx.Response(503, headers=[(b"retry-after", value.encode())])
    assert webhook._retry_after(response) == expected


@pytest.mark.parametrize("name", [
    "Host", "host", "Content-Length", "Transfer-Encoding", "Connection",
    "x-conveyor-signature", "X-CONVEYOR-TIMESTAMP", "x-conveyor-task-id", "content-type",
])
def test_headers_that_would_redirect_or_forge_the_request_are_refused(name: str) -> None:
    # A `Host` would replace the hostname the connection was checked and pinned for; a second
    # signature or a framing header would be sent beside Conveyor's own.
    with pytest.raises(ValueError, match=name):
        WebhookPayload.model_validate({"url": "https://example.com/hook",
                                       "headers": {name: "x"}})
    ok = WebhookPayload.model_validate({"url": "https://example.com/hook",
                                        "headers": {"Authorization": "Bearer t", "X-Mine": "1"}})
    assert ok.headers == {"Authorization": "Bearer t", "X-Mine": "1"}

"""Pure parts of api/auth.py (no servers): loopback addresses, bearer parsing, type limits."""

from __future__ import annotations

import hmac
from typing import cast

import pytest

from conveyor.api.auth import Authenticator, Principal, bearer, is_loopback
from conveyor.errors import Forbidden
from conveyor.queue.ratelimit import RateLimiter
from conveyor.store.keys import KeyStore


def test_only_loopback_addresses_count_as_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.1", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_bearer_takes_the_token_of_a_bearer_header_only() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    for header in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert bearer(header) is None, header


def test_a_type_limited_principal_names_every_type_it_may_not_enqueue() -> None:
    limited = Principal("ci", frozenset({"tasks:enqueue"}), frozenset({"webhook"}))
    limited.check_types(["webhook", "webhook"])
    with pytest.raises(Forbidden, match="may not enqueue a, thumbnail") as refused:
        limited.check_types(["thumbnail", "webhook", "a"])
    assert refused.value.types == ["a", "thumbnail"]
    Principal("any", frozenset({"tasks:enqueue"})).check_types(["thumbnail"])


async def test_bootstrap_keys_are_each_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    # A matching bootstrap key never reaches the store or the limiter.
    authenticator = Authenticator(cast(KeyStore, None), cast(RateLimiter, None),
                                  env_keys=["first", "second", "third"])
    principal = await authenticator.principal("first")
    assert principal.name == "bootstrap key 1"
    assert principal.may("admin")
    # Every key is compared, not only up to the first match, so timing tells nothing.
    assert [b for _, b in compared] == [b"first", b"second", b"third"]

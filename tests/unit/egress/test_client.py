"""The worker's outbound client: made once at first use, remade after a close, and sent to a
process pool as a fresh one of the same policy."""

from __future__ import annotations

import pickle

import pytest

from conveyor.config import load_settings
from conveyor.egress.client import OutboundHttp
from conveyor.egress.policy import EgressPolicy
from conveyor.egress.transport import GuardedTransport
from conveyor.errors import ConfigError


async def test_one_client_made_at_first_use_and_closed_by_its_owner() -> None:
    outbound = OutboundHttp(EgressPolicy.allowing(["10.0.0.0/8"]))
    client = outbound.client
    assert outbound.client is client
    assert isinstance(client._transport, GuardedTransport)
    assert client.follow_redirects is False
    assert client.trust_env is False
    await outbound.aclose()
    assert client.is_closed
    assert outbound.client is not client
    await outbound.aclose()


def test_a_pickled_copy_keeps_the_policy_not_the_client() -> None:
    outbound = OutboundHttp(EgressPolicy.allowing(["10.0.0.0/8"]))
    copy = pickle.loads(pickle.dumps(outbound))
    assert copy.policy == outbound.policy
    assert copy._client is None


def test_allow_ranges_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_WEBHOOK_ALLOW_CIDRS", "127.0.0.1/32,10.20.0.0/16")
    policy = EgressPolicy.from_settings(load_settings())
    assert [str(n) for n in policy.allow] == ["127.0.0.1/32", "10.20.0.0/16"]
    monkeypatch.setenv("CONVEYOR_WEBHOOK_ALLOW_CIDRS", "10.20.0.1/16")
    with pytest.raises(ConfigError, match="CONVEYOR_WEBHOOK_ALLOW_CIDRS"):
        load_settings()

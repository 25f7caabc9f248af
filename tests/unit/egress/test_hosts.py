"""Hosts told apart before any lookup: IP literals in every form, loopback names, ports."""

from __future__ import annotations

import ipaddress

import pytest

from conveyor.egress.hosts import destination_refusal, is_loopback_name, literal_address
from conveyor.egress.policy import EgressPolicy

DEFAULT = EgressPolicy()


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("0x7F.0.0.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("0", "0.0.0.0"), ("0.0.0.0", "0.0.0.0"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[::1]", "::1"), ("::1", "::1"), ("8.8.8.8.", "8.8.8.8"),
])
def test_literal_addresses_in_every_form(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "deadbeef", "0x.example", "1.2.3.4.5",
                                  "256.0.0.1", "cafe", "localhost"])
def test_names_are_not_literals(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LOCALHOST.", True), ("api.localhost", True),
    ("localhost.localdomain", True), ("ip6-localhost", True),
    ("localhost.example.com", False), ("mylocalhost", False), ("example.com", False),
])
def test_loopback_names(host: str, loopback: bool) -> None:
    assert is_loopback_name(host) is loopback


@pytest.mark.parametrize(("host", "port", "named"), [
    ("127.0.0.1", 80, "127.0.0.1 is loopback"),
    ("2130706433", 80, "2130706433 is 127.0.0.1: 127.0.0.1 is loopback"),
    ("0x7f000001", 443, "127.0.0.1 is loopback"),
    ("0.0.0.0", 80, "'this network'"),
    ("[::ffff:127.0.0.1]", 80, "(127.0.0.1) is loopback"),
    ("localhost", 80, "localhost names the loopback interface"),
    ("a.localhost", 80, "a.localhost names the loopback interface"),
    ("169.254.169.254", 80, "cloud metadata address"),
    ("example.com", 5432, "port 5432 is PostgreSQL's"),
    ("example.com", 22, "port 22 is a system service port"),
])
def test_refused_before_any_lookup(host: str, port: int, named: str) -> None:
    assert named in (destination_refusal(host, port, DEFAULT) or "")


def test_names_and_allowed_literals_wait_for_the_connect() -> None:
    assert destination_refusal("example.com", 443, DEFAULT) is None
    assert destination_refusal("1.1.1.1", 8080, DEFAULT) is None
    loopback = EgressPolicy.allowing(["127.0.0.0/8", "::1/128"])
    assert destination_refusal("127.0.0.1", 8080, loopback) is None
    assert destination_refusal("localhost", 8080, loopback) is None
    only_v4 = EgressPolicy.allowing(["127.0.0.1/32"])
    assert "::1 is loopback" in (destination_refusal("localhost", 8080, only_v4) or "")

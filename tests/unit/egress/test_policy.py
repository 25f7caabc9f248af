"""The denied table, range by range: first and last address of each, the neighbours just
outside, embedded IPv4 forms, metadata addresses, allow ranges and ports."""

from __future__ import annotations

import ipaddress

import pytest

from conveyor.config import Settings
from conveyor.egress.policy import (
    DENIED_NETWORKS,
    METADATA_ADDRESSES,
    EgressPolicy,
    current_policy,
    embedded_ipv4,
    installed,
)

DEFAULT = EgressPolicy()
ISSUE_TABLE = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/32",
    "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
]


def refused(address: str, policy: EgressPolicy = DEFAULT) -> str | None:
    return policy.address_refusal(ipaddress.ip_address(address))


def test_the_table_holds_every_range_of_the_issue() -> None:
    table = {str(network) for network, _ in DENIED_NETWORKS}
    assert set(ISSUE_TABLE) <= table
    assert table - set(ISSUE_TABLE) == {"::/96"}  # IPv4-compatible forms, deprecated


@pytest.mark.parametrize("cidr", ISSUE_TABLE)
def test_first_and_last_address_of_every_range_are_refused(cidr: str) -> None:
    network = ipaddress.ip_network(cidr)
    for address in (network[0], network[-1]):
        why = DEFAULT.address_refusal(address)
        assert why is not None, address
        assert str(address) in why


@pytest.mark.parametrize("address", [
    "1.1.1.1", "8.8.8.8", "9.255.255.255", "11.0.0.0", "100.63.255.255", "100.128.0.0",
    "126.255.255.255", "128.0.0.0", "169.253.255.255", "169.255.0.0", "172.15.255.255",
    "172.32.0.0", "192.0.1.0", "192.0.3.0", "192.167.255.255", "192.169.0.0",
    "198.17.255.255", "198.20.0.0", "198.51.99.255", "198.51.101.0", "203.0.112.255",
    "203.0.114.0", "223.255.255.255",
    "2606:4700:4700::1111", "2001:4860:4860::8888", "2001:1::1", "2001:db7:ffff::1",
    "2001:db9::", "2003::1", "fbff:ffff::1", "fe00::1", "fec0::1", "64:ff9b:2::1",
    "100:0:0:1::", "::ffff:8.8.8.8",
])
def test_public_neighbours_of_the_ranges_are_allowed(address: str) -> None:
    assert refused(address) is None


def test_the_reason_names_the_address_the_kind_and_the_range() -> None:
    assert refused("127.0.0.1") == (
        "127.0.0.1 is loopback (127.0.0.0/8); CONVEYOR_WEBHOOK_ALLOW_CIDRS can allow it")
    assert "multicast (224.0.0.0/4)" in (refused("239.255.255.250") or "")
    assert "multicast (ff00::/8)" in (refused("ff02::1") or "")
    assert "unspecified" in (refused("::") or "")


def test_ipv4_mapped_addresses_are_judged_by_the_ipv4_inside() -> None:
    assert "::ffff:7f00:1 (127.0.0.1) is loopback" in (refused("::ffff:127.0.0.1") or "")
    assert "private" in (refused("::ffff:10.1.2.3") or "")
    assert refused("::ffff:1.1.1.1") is None
    allowed = EgressPolicy.allowing(["127.0.0.1/32"])
    assert refused("::ffff:127.0.0.1", allowed) is None


def test_nat64_and_6to4_forms_of_loopback_are_refused() -> None:
    nat64 = "64:ff9b::7f00:1"  # 127.0.0.1 through NAT64
    sixtofour = "2002:7f00:1::"  # 127.0.0.1 as a 6to4 prefix
    assert embedded_ipv4(ipaddress.IPv6Address(nat64)) == ipaddress.IPv4Address("127.0.0.1")
    assert embedded_ipv4(ipaddress.IPv6Address(sixtofour)) == ipaddress.IPv4Address(
        "127.0.0.1")
    assert "NAT64 (64:ff9b::/96)" in (refused(nat64) or "")
    assert "6to4 (2002::/16)" in (refused(sixtofour) or "")
    assert "IPv4-compatible" in (refused("::127.0.0.1") or "")
    # loopback allowed does not open its NAT64 form: that is another range
    assert refused(nat64, EgressPolicy.allowing(["127.0.0.1/32"])) is not None


@pytest.mark.parametrize("address", ["224.0.0.1", "239.255.255.255", "ff02::1", "ff05::2"])
def test_multicast_is_refused(address: str) -> None:
    assert "multicast" in (refused(address) or "")


def test_allow_ranges_open_exactly_what_they_cover() -> None:
    policy = EgressPolicy.allowing(["127.0.0.1/32", "10.8.0.0/16", "fd12::/16"])
    assert refused("127.0.0.1", policy) is None
    assert refused("127.0.0.2", policy) is not None
    assert refused("10.8.255.255", policy) is None
    assert refused("10.9.0.0", policy) is not None
    assert refused("fd12::1", policy) is None
    assert refused("fd13::1", policy) is not None


@pytest.mark.parametrize("address", sorted(str(a) for a in METADATA_ADDRESSES))
def test_metadata_addresses_are_refused_whatever_the_allow_ranges(address: str) -> None:
    everything = EgressPolicy.allowing(["0.0.0.0/0", "::/0"])
    assert "cloud metadata address" in (refused(address, everything) or "")


@pytest.mark.parametrize("address", [
    "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
])
def test_metadata_addresses_are_refused_in_their_ipv6_forms(address: str) -> None:
    everything = EgressPolicy.allowing(["0.0.0.0/0", "::/0"])
    assert "cloud metadata address" in (refused(address, everything) or "")


@pytest.mark.parametrize("address", [
    "fd00:ec2::254%eth0", "fd00:ec2::254%1", "::ffff:169.254.169.254%2",
])
def test_metadata_addresses_are_refused_with_a_zone_id(address: str) -> None:
    # `fd00:ec2::254%eth0` dials the metadata address; a zone id must not hide it.
    everything = EgressPolicy.allowing(["0.0.0.0/0", "::/0"])
    assert "cloud metadata address" in (refused(address, everything) or "")


@pytest.mark.parametrize(("port", "allowed"), [
    (80, True), (443, True), (1024, True), (8080, True), (8443, True), (65535, True),
    (0, False), (22, False), (25, False), (53, False), (1023, False),
    (5432, False), (6379, False), (11211, False), (9200, False), (2375, False),
    (27017, False), (65536, False),
])
def test_ports(port: int, allowed: bool) -> None:
    assert (DEFAULT.port_refusal(port) is None) is allowed


def test_the_policy_comes_from_the_settings() -> None:
    settings = Settings(webhook_allow_cidrs="127.0.0.1/32, fd00::/8")
    policy = EgressPolicy.from_settings(settings)
    assert [str(n) for n in policy.allow] == ["127.0.0.1/32", "fd00::/8"]
    assert Settings().webhook_allow_cidrs == []


def test_installed_policies_nest_and_end_out_of_order() -> None:
    first, second = EgressPolicy.allowing(["10.0.0.0/8"]), EgressPolicy.allowing([])
    assert current_policy() == EgressPolicy()
    with installed(first):
        outer = installed(second)
        outer.__enter__()
        assert current_policy() is second
        outer.__exit__(None, None, None)
        assert current_policy() is first
    assert current_policy() == EgressPolicy()

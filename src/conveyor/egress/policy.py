"""Which destinations outbound requests may reach: an explicit table of denied networks (not
`ipaddress`'s `is_private`/`is_global`, which miss multicast, NAT64 and 6to4 forms of
loopback), the ranges a deployment opts back in, addresses never allowed, and ports.

An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is judged as the IPv4 address it carries; the
IPv4 inside NAT64 and 6to4 addresses is checked against the metadata addresses too, so no
allow range can open those through another form.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from conveyor.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (network, why it is not a public destination); from the IANA special-purpose registries.
DENIED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), why) for cidr, why in (
        ("0.0.0.0/8", "'this network'"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (and broadcast)"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b::/96", "NAT64"),
        ("64:ff9b:1::/48", "local NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)

# Cloud instance metadata services: never allowed, whatever CONVEYOR_WEBHOOK_ALLOW_CIDRS says.
METADATA_ADDRESSES: dict[IPAddress, str] = {
    ipaddress.ip_address(address): who for address, who in (
        ("169.254.169.254", "AWS, GCP, Azure, Oracle, OpenStack, DigitalOcean"),
        ("169.254.170.2", "AWS ECS task metadata"),
        ("169.254.169.253", "AWS VPC DNS"),
        ("fd00:ec2::254", "AWS IPv6"),
        ("100.100.100.200", "Alibaba Cloud"),
        ("169.254.0.23", "Tencent Cloud"),
    )
}

# Ports below 1024 other than 80 and 443 are system services (ssh, smtp, dns...); these
# above it are databases, brokers and control planes that trust their network.
DENIED_PORTS: dict[int, str] = {
    1433: "SQL Server", 1521: "Oracle", 2181: "ZooKeeper", 2375: "Docker API",
    2376: "Docker API (TLS)", 2379: "etcd", 2380: "etcd peers", 3306: "MySQL",
    4369: "Erlang port mapper", 5432: "PostgreSQL", 5672: "AMQP", 5984: "CouchDB",
    6379: "Redis", 6443: "Kubernetes API", 8500: "Consul", 9042: "Cassandra",
    9092: "Kafka", 9200: "Elasticsearch", 9300: "Elasticsearch nodes", 10250: "kubelet",
    11211: "memcached", 15672: "RabbitMQ management", 26379: "Redis Sentinel",
    27017: "MongoDB",
}
WEB_PORTS = frozenset({80, 443})


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 address."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def unscoped(address: IPAddress) -> IPAddress:
    """`address` without its IPv6 zone id (which compares and hashes apart from the bare
    address, so a set or dict lookup would miss it)."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return ipaddress.IPv6Address(int(address))
    return address


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Denies `DENIED_NETWORKS` less `allow`, and always `METADATA_ADDRESSES`; ports 80, 443
    and 1024-65535 except `DENIED_PORTS`."""

    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        return cls(tuple(settings.webhook_allow_cidrs))

    @classmethod
    def allowing(cls, cidrs: Iterable[str]) -> EgressPolicy:
        return cls(tuple(ipaddress.ip_network(c) for c in cidrs))

    def address_refusal(self, address: IPAddress) -> str | None:
        """Why `address` may not be reached, or None if it may (a zone id, `%eth0`, is no
        part of the address judged: `fd00:ec2::254%eth0` is the metadata address)."""
        address = unscoped(address)
        inner = embedded_ipv4(address)
        for candidate in (address, inner):
            if candidate is not None and candidate in METADATA_ADDRESSES:
                return (f"{address} is a cloud metadata address "
                        f"({METADATA_ADDRESSES[candidate]}), never allowed")
        if address.version == 6 and address.ipv4_mapped is not None:
            judged: IPAddress = address.ipv4_mapped
        else:
            judged = address
        if any(judged.version == net.version and judged in net for net in self.allow):
            return None
        for network, why in DENIED_NETWORKS:
            if judged.version == network.version and judged in network:
                shown = f"{address} ({judged})" if judged != address else str(address)
                return (f"{shown} is {why} ({network}); CONVEYOR_WEBHOOK_ALLOW_CIDRS "
                        "can allow it")
        return None

    def port_refusal(self, port: int) -> str | None:
        """Why `port` may not be reached, or None if it may."""
        if port in WEB_PORTS:
            return None
        if port < 1024:
            return f"port {port} is a system service port (only 80 and 443 are below 1024)"
        if port in DENIED_PORTS:
            return f"port {port} is {DENIED_PORTS[port]}'s, never a webhook receiver's"
        if port > 65535:
            return f"port {port} does not exist"
        return None


# The policy of enqueue-time checks (payload validation): that of the most recently opened
# state still open (`conveyor.state.open_state` installs its settings' policy), else the
# default. Connect-time checks never read it: their transport is given its policy.
_installed: list[EgressPolicy] = []
DEFAULT_POLICY = EgressPolicy()


def current_policy() -> EgressPolicy:
    """The policy that payload validation applies in this process."""
    return _installed[-1] if _installed else DEFAULT_POLICY


@contextlib.contextmanager
def installed(policy: EgressPolicy) -> Iterator[None]:
    """Make `policy` the process's `current_policy()` until the block ends."""
    _installed.append(policy)
    try:
        yield
    finally:
        for i in range(len(_installed) - 1, -1, -1):
            if _installed[i] is policy:
                del _installed[i]
                break

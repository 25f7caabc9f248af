"""What can be told about a destination before any lookup: a host written as an IP address
(in any form the C resolver accepts: `2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`,
`[::ffff:127.0.0.1]`), a `localhost` name, and its port: the enqueue-time check."""

from __future__ import annotations

import ipaddress
import re
import socket

from conveyor.egress.policy import EgressPolicy, IPAddress

# Numbers and dots only, each part decimal, octal or 0x-hex: what inet_aton reads as IPv4.
_NUMERIC_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.I)
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def literal_address(host: str) -> IPAddress | None:
    """The address `host` names without a lookup, or None if it is a name."""
    bare = host.strip().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if _NUMERIC_IPV4.match(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def is_loopback_name(host: str) -> bool:
    """`localhost`, `*.localhost` (RFC 6761: always loopback) and the usual hosts-file names."""
    name = host.strip().rstrip(".").lower()
    return name in LOOPBACK_NAMES or name.endswith(".localhost")


def destination_refusal(host: str, port: int, policy: EgressPolicy) -> str | None:
    """Why `host:port` is refused before any lookup, or None if only connecting can tell."""
    refused = policy.port_refusal(port)
    if refused is not None:
        return refused
    if is_loopback_name(host):
        loopback = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
        why = next((w for w in map(policy.address_refusal, loopback) if w), None)
        return f"{host} names the loopback interface: {why}" if why else None
    address = literal_address(host)
    if address is None:
        return None
    why = policy.address_refusal(address)
    if why is None:
        return None
    written = host.strip().removeprefix("[").removesuffix("]")
    return why if written == str(address) else f"{host} is {address}: {why}"

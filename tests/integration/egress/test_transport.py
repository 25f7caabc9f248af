"""The guarded transport against real servers, all on loopback: every refusal happens before
a connection, so nothing here dials anything but 127.0.0.1 and 127.0.0.2."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme

from conveyor.egress.client import guarded_client
from conveyor.egress.policy import EgressPolicy, IPAddress
from conveyor.egress.transport import TRUNCATED
from conveyor.errors import EgressDenied, Fail
from conveyor.testing.servers import free_port
from tests.receiver import Answer, serve_receiver

LOOPBACK = ipaddress.ip_address("127.0.0.1")
ALIAS = ipaddress.ip_address("127.0.0.2")  # stands in for a public address: allowed below
ONLY_ALIAS = EgressPolicy.allowing(["127.0.0.2/32"])


@dataclass
class Rebinding:
    """A resolver that answers `first`, then `then` on every later lookup."""

    first: list[IPAddress]
    then: list[IPAddress]
    lookups: list[str] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        return self.first if len(self.lookups) == 1 else self.then


@contextlib.asynccontextmanager
async def both_loopbacks() -> AsyncIterator[tuple[Answer, Answer, int]]:
    """Two servers on one port: 127.0.0.2 (allowed) and 127.0.0.1 (denied)."""
    port = free_port()
    async with serve_receiver(Answer(), "127.0.0.2", port) as (alias, _), \
            serve_receiver(Answer(), "127.0.0.1", port) as (loopback, _):
        yield alias, loopback, port


async def test_the_connection_goes_to_the_checked_address_and_host_stays_the_name() -> None:
    resolver = Rebinding([ALIAS], [LOOPBACK])
    async with both_loopbacks() as (alias, loopback, port), \
            guarded_client(ONLY_ALIAS, resolver=resolver) as http:
        response = await http.post(f"http://hook.test:{port}/hook", json={})
        again = await http.post(f"http://hook.test:{port}/hook", json={})  # pooled
    assert (response.status_code, again.status_code) == (200, 200)
    assert alias.hosts == [f"hook.test:{port}"] * 2
    assert loopback.hosts == []
    assert resolver.lookups == ["hook.test"]  # once: the dial used the answer it checked


async def test_a_rebinding_answer_is_refused_on_the_next_connection() -> None:
    resolver = Rebinding([ALIAS], [LOOPBACK])
    async with both_loopbacks() as (alias, loopback, port):
        async with guarded_client(ONLY_ALIAS, resolver=resolver) as http:
            assert (await http.get(f"http://hook.test:{port}/")).status_code == 200
        async with guarded_client(ONLY_ALIAS, resolver=resolver) as http:
            with pytest.raises(EgressDenied) as refused:
                await http.get(f"http://hook.test:{port}/")
    assert "it resolves to 127.0.0.1; 127.0.0.1 is loopback" in str(refused.value)
    assert isinstance(refused.value, Fail)  # permanent: a task letting it out ends dead
    assert len(alias.hosts) == 1
    assert loopback.hosts == []


async def test_one_denied_answer_among_allowed_ones_refuses_the_host() -> None:
    resolver = Rebinding([ALIAS, LOOPBACK], [])
    async with both_loopbacks() as (alias, loopback, port), \
            guarded_client(ONLY_ALIAS, resolver=resolver) as http:
        with pytest.raises(EgressDenied, match=re.escape("resolves to 127.0.0.1")):
            await http.get(f"http://hook.test:{port}/")
    assert alias.hosts == loopback.hosts == []


@pytest.mark.parametrize(("host", "named"), [
    ("127.0.0.1", "127.0.0.1 is loopback"),
    ("localhost", "resolves to 127.0.0.1"),
    ("[::ffff:127.0.0.1]", "(127.0.0.1) is loopback"),
    ("2130706433", "resolves to 127.0.0.1"),
    ("0x7f000001", "resolves to 127.0.0.1"),
    ("0.0.0.0", "'this network'"),
])
async def test_loopback_in_any_form_is_refused_at_connect(host: str, named: str) -> None:
    async with serve_receiver(Answer()) as (receiver, url), guarded_client() as http:
        port = httpx.URL(url).port
        with pytest.raises(EgressDenied, match=re.escape(named)):
            await http.get(f"http://{host}:{port}/")
    assert receiver.hosts == []


async def test_the_allow_range_opens_loopback() -> None:
    async with serve_receiver(Answer()) as (receiver, url), \
            guarded_client(EgressPolicy.allowing(["127.0.0.1/32"])) as http:
        assert (await http.get(url)).status_code == 200
    assert len(receiver.hosts) == 1


async def test_metadata_addresses_are_refused_even_inside_an_allow_range() -> None:
    policy = EgressPolicy.allowing(["169.254.0.0/16", "100.64.0.0/10"])
    async with guarded_client(policy) as http:
        for url in ("http://169.254.169.254/latest/meta-data/", "http://100.100.100.200/",
                    "http://[::ffff:169.254.169.254]/"):
            with pytest.raises(EgressDenied, match="cloud metadata address"):
                await http.get(url)


async def test_a_refused_port_is_refused_before_any_lookup() -> None:
    resolver = Rebinding([ALIAS], [ALIAS])
    async with guarded_client(ONLY_ALIAS, resolver=resolver) as http:
        with pytest.raises(EgressDenied, match="port 6379 is Redis's"):
            await http.get("http://hook.test:6379/")
    assert resolver.lookups == []


async def test_redirects_are_not_followed_and_a_followed_hop_is_checked() -> None:
    async with serve_receiver(Answer()) as (denied, denied_url), \
            serve_receiver(Answer(302, [(b"location", denied_url.encode())]), "127.0.0.2") \
            as (redirecting, url), guarded_client(ONLY_ALIAS) as http:
        response = await http.get(url)
        assert response.status_code == 302
        assert response.headers["location"] == denied_url
        with pytest.raises(EgressDenied, match=re.escape("127.0.0.1 is loopback")):
            await http.get(url, follow_redirects=True)
    assert len(redirecting.hosts) == 2
    assert denied.hosts == []


async def test_the_response_body_is_cut_at_64_kib() -> None:
    allowed = EgressPolicy.allowing(["127.0.0.1/32"])
    async with serve_receiver(Answer(size=1024 * 1024)) as (_, url), \
            guarded_client(allowed) as http:
        big = await http.get(url)
        assert len(big.content) == 64 * 1024
        assert big.extensions[TRUNCATED] is True
    async with serve_receiver(Answer(size=64 * 1024)) as (_, url), \
            guarded_client(allowed) as http:
        exact = await http.get(url)
        assert len(exact.content) == 64 * 1024
        assert exact.extensions[TRUNCATED] is False


async def test_proxy_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_receiver(Answer()) as (proxy, proxy_url), \
            serve_receiver(Answer(), "127.0.0.2") as (receiver, url):
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "HTTPS_PROXY"):
            monkeypatch.setenv(name, proxy_url)
        async with guarded_client(ONLY_ALIAS) as http:
            assert (await http.get(url)).status_code == 200
    assert len(receiver.hosts) == 1
    assert proxy.hosts == []


async def test_tls_verifies_the_certificate_of_the_name_on_the_pinned_address(
    tmp_path: Path,
) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("hook.test")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    async with serve_receiver(Answer(), "127.0.0.2", tls=(str(certfile), str(keyfile))) \
            as (receiver, url):
        port = httpx.URL(url).port
        named = guarded_client(ONLY_ALIAS, resolver=Rebinding([ALIAS], [ALIAS]),
                               verify=trusted)
        async with named as http:
            response = await http.get(f"https://hook.test:{port}/")
        assert response.status_code == 200
        assert receiver.hosts == [f"hook.test:{port}"]
        # the certificate is checked against the name asked for, not the address dialled
        other = guarded_client(ONLY_ALIAS, resolver=Rebinding([ALIAS], [ALIAS]),
                               verify=trusted)
        async with other as http:
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await http.get(f"https://other.test:{port}/")
    assert len(receiver.hosts) == 1


async def test_only_http_urls() -> None:
    async with guarded_client() as http:
        with pytest.raises(EgressDenied, match="only http and https"):
            await http.get("ftp://example.com/")

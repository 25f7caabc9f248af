"""The metrics port's app: Prometheus text after the pre-scrape hook, an optional key, and an
open `/healthz`."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from conveyor.runtime.metrics_server import MetricsServer


def client(server: MetricsServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                             base_url="http://metrics")


async def test_a_scrape_runs_the_hook_first_and_a_key_guards_metrics_only() -> None:
    registry = CollectorRegistry()
    scrapes = Counter("scrapes", "hook runs", registry=registry)

    async def hook() -> None:
        scrapes.inc()

    server = MetricsServer(host="127.0.0.1", port=0, registry=registry, before_scrape=hook,
                           health=lambda: {"processes": 2}, key="k")
    async with client(server) as http:
        refused = await http.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert "CONVEYOR_METRICS_KEY" in refused.json()["detail"]
        assert (await http.get("/metrics", headers={"Authorization": "Bearer no"})
                ).status_code == 401
        ok = await http.get("/metrics", headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/plain")
        values = {s.name: s.value for f in text_string_to_metric_families(ok.text)
                  for s in f.samples}
        assert values["scrapes_total"] == 1  # the hook ran before the text was written
        health = await http.get("/healthz")
        assert health.json() == {"status": "ok", "processes": 2}


async def test_without_a_key_metrics_are_open() -> None:
    async with client(MetricsServer(host="127.0.0.1", port=0)) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert "process_cpu_seconds_total" in response.text or "python_info" in response.text


async def test_the_key_is_read_as_the_api_reads_one() -> None:
    # The scheme is case-insensitive (RFC 9110), as on the API's /metrics; a bare key is not
    # a bearer credential.
    server = MetricsServer(host="127.0.0.1", port=0, registry=CollectorRegistry(), key="k")
    async with client(server) as http:
        for header, status in (("bearer k", 200), ("BEARER  k", 200), ("Bearer k", 200),
                               ("k", 401), ("Basic k", 401), ("Bearer", 401)):
            response = await http.get("/metrics", headers={"Authorization": header})
            assert response.status_code == status, header

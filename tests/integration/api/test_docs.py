"""`/docs` from the service alone (no CDN), and an OpenAPI document that says how to
authenticate and what every error looks like."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.state import AppState

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png",
                 ".json": "application/json"}


@pytest.fixture
async def http(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    keyed = state.settings.model_copy(update={"api_keys": ["s3cret"]})
    app = create_app(dataclasses.replace(state, settings=keyed))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://conveyor.test") as client:
        yield client


class Assets(HTMLParser):
    """Every URL a page loads: src and href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


async def test_docs_load_every_asset_from_the_service_itself(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")  # no key: the docs stay open
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    parser = Assets()
    parser.feed(page.text)
    spec_urls = re.findall(r"url: '([^']+)'", page.text)
    urls = parser.urls + spec_urls
    assert {u.rsplit(".", 1)[-1] for u in urls} >= {"js", "css", "png", "json"}
    assert "://" not in page.text  # nothing absolute, to any host
    for url in urls:
        assert not urlsplit(url).netloc, url
        asset = await http.get(urljoin("/docs", url))
        assert asset.status_code == 200, url
        suffix = "." + url.rsplit(".", 1)[-1]
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], url
        if suffix == ".css":  # and the stylesheet pulls in nothing from elsewhere
            imported = re.findall(r"url\(\s*['\"]?([^'\")]+)", asset.text)
            assert all(u.startswith("data:") for u in imported), imported
    assert "SwaggerUIBundle" in (await http.get("/docs/assets/swagger-ui-bundle.js")).text
    assert (await http.get("/docs/assets/nope.js")).status_code == 404
    redoc = await http.get("/redoc", headers={"Authorization": "Bearer s3cret"})
    assert redoc.status_code == 404  # ReDoc would need a CDN


async def test_openapi_has_a_bearer_scheme_and_problem_errors(http: httpx.AsyncClient) -> None:
    spec: dict[str, Any] = (await http.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    paths = spec["paths"]
    assert paths["/v1/tasks"]["post"]["security"] == [{"bearer": []}]
    assert paths["/v1/tasks"]["get"]["security"] == [{"bearer": []}]
    assert paths["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert paths["/healthz"]["get"]["security"] == []
    problem = spec["components"]["schemas"]["Problem"]
    assert {"title", "status", "detail"} <= set(problem["required"])
    assert "FieldError" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    errors = 0
    for path, item in paths.items():
        for method, operation in item.items():
            for code, response in operation["responses"].items():
                if code[0] in "45":
                    errors += 1
                    assert response["content"] == {"application/problem+json": {
                        "schema": {"$ref": "#/components/schemas/Problem"}}}, (path, method, code)
    assert errors > 20
    post = paths["/v1/tasks"]["post"]["responses"]
    assert {"400", "401", "409", "413", "415", "422", "500", "503"} <= set(post)
    assert "401" in paths["/v1/tasks/{task_id}"]["get"]["responses"]
    assert "401" not in paths["/healthz"]["get"]["responses"]
    listing = paths["/v1/tasks"]["get"]["parameters"]
    assert "fields" in {p["name"] for p in listing}


async def test_try_it_out_sends_the_key(http: httpx.AsyncClient) -> None:
    # What Swagger UI sends once a key is entered under "Authorize" (scheme `bearer`).
    assert (await http.get("/v1/queues")).status_code == 401
    ok = await http.get("/v1/queues", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200

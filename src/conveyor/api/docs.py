"""`/docs`: Swagger UI served from the package's own copy (`static/swagger-ui/`), so the
documentation renders with no network access. ReDoc is not served (it would need a CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
ASSETS_DIR = Path(__file__).parent / "static" / "swagger-ui"
# Swagger UI would otherwise send the document to validator.swagger.io for a badge.
_UI_PARAMETERS = {"validatorUrl": None, "persistAuthorization": True}


def install(app: FastAPI) -> None:
    """Serve the assets under `ASSETS_PATH` and the UI page at `DOCS_PATH`.

    `app` must be built with `docs_url=None, redoc_url=None`.
    """
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} API",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=_UI_PARAMETERS,
        )

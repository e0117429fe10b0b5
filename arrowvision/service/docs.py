"""``/docs``: the interactive API page, working offline.

FastAPI's own ``/docs`` loads Swagger UI from a CDN (and ``/redoc`` ReDoc), so on a machine
without internet access, or behind a strict firewall, it shows a blank page, and every visit
tells the CDN who uses the service. Here Swagger UI is served from the ``swagger-ui-bundle-v2``
package (the ``serve`` extra) under ``/docs/assets/``; the page names no URL outside the app.
Without the package there is no ``/docs`` (``/openapi.json`` still describes the API).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from starlette.exceptions import HTTPException

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def add_docs_routes(app: Any, title: str) -> bool:
    """Register ``/docs`` and its assets on ``app`` (created with ``docs_url=None, redoc_url=None``);
    False when Swagger UI is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return False

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{title} - API",
                                   swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no call to validator.swagger.io

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if name not in ASSETS:  # a fixed list: no path ever reaches the file system
            raise HTTPException(404, "no such asset")
        data = (swagger_ui_path / name).read_bytes()
        return Response(data, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})

    return True

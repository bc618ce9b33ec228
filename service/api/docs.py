"""``/docs`` (Swagger UI) and ``/redoc`` from assets the service serves itself.

FastAPI's own pages load their JavaScript from a public CDN, which leaves them blank in an
air-gapped cluster. The assets come from the pinned ``fastapi-offline`` package (Swagger UI 5,
which reads OpenAPI 3.1, and ReDoc 2); only those named in :data:`_ASSETS` are served, so the asset
route is a closed set, not a window onto the file system. The validator badge is off: Swagger UI
would fetch it from another host.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse

from service.api.deps import scoped
from service.scopes import PUBLIC

ASSET_PREFIX = "/docs/assets"

_STATIC = Path(str(resources.files("fastapi_offline") / "static"))
_ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
#: Swagger UI settings: no badge from the public validator, and operations shown expanded so a
#: reader (or a headless browser) sees every one at once.
SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None, "docExpansion": "list"}

# public, like the probes: the pages hold no data, and /openapi.json is public too
router = APIRouter(include_in_schema=False, dependencies=[scoped(PUBLIC)])


def _asset_url(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSET_PREFIX}/{name}"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=_asset_url(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset_url(request, "swagger-ui.css"),
        swagger_favicon_url=_asset_url(request, "favicon.png"),
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=f"{request.scope.get('root_path', '')}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=_asset_url(request, "redoc.standalone.js"),
        redoc_favicon_url=_asset_url(request, "favicon.png"),
        with_google_fonts=False,
    )


@router.get(ASSET_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404)  # the envelope's not_found, as for any unknown path
    # the bundles are versioned by the pinned package: a day's caching is safe across restarts
    return FileResponse(_STATIC / name, media_type=media_type, headers={"Cache-Control": "max-age=86400"})

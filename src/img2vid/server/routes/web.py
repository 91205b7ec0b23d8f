"""The web page, its two assets, and Swagger UI at /docs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}

router = APIRouter(include_in_schema=False)


def _web_file(path: str):
    name, media_type = WEB_FILES[path]

    def handler():
        return FileResponse(WEB_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return handler


for _path in WEB_FILES:
    router.add_api_route(_path, _web_file(_path), methods=["GET"])


@router.get("/docs")
def docs(request: Request):
    # Only reached with a valid token (or none needed); pass it on so Swagger can fetch the schema.
    t = request.query_params.get("token")
    url = "/openapi.json" + (f"?token={quote(t)}" if t else "")
    return get_swagger_ui_html(openapi_url=url, title="img2vid API")

"""`/console`: the review console, a static page and its script (service/api/console/), served
as files: no build step, nothing from a CDN. It talks to the same `/v1` API with the key the
reviewer pastes (sent as a Bearer header from this tab's sessionStorage; no cookies)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
# The page may load only its own script and style, and talk only to this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/console")
def console() -> FileResponse:
    return FileResponse(
        CONSOLE_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )


def static_files() -> StaticFiles:
    return StaticFiles(directory=CONSOLE_DIR)

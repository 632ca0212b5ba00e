"""The web dashboard: its page at ``/`` and its static files under ``/ui/``, both public.

The page is static HTML, CSS and JavaScript modules (``api/static/``, no build step) that call
``/v1`` from the browser with the key the user typed, so serving it needs no key and holds no
data. Every response carries a Content-Security-Policy that runs only this origin's scripts and
lets the page talk only to this origin: user strings the page shows can never become code.
Neither route is in the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/ui"
PAGE_PATH = "/"

# img-src blob: the sweep's pareto.svg, fetched with the key and shown through an object URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (ETag / Last-Modified): an upgraded service serves its new files.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """``StaticFiles`` whose answers carry the dashboard's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


router = APIRouter(include_in_schema=False)
router.mount(STATIC_PREFIX, DashboardFiles(directory=STATIC_DIR), name="dashboard-static")


@router.get(PAGE_PATH, response_class=FileResponse)
def dashboard_page() -> FileResponse:
    """The dashboard's single page; it routes by the URL's fragment (``#/jobs/<id>``)."""
    return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

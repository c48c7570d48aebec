"""The chat page: `/` and its files under `/assets/`.

The page is static: `web/index.html` and a bundle built from the repository's `web/` folder by
`npm run build` and committed, so installing Threadline needs no Node and the page needs no
network at run time. Every response carries a Content-Security-Policy that lets scripts,
styles and connections (fetch and the WebSocket) come from this origin only, and allows no
inline script or style; the page has neither, and its Markdown is sanitized besides.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from threadline.errors import NotFoundError

router = APIRouter(include_in_schema=False)
WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# 'self' in connect-src also covers ws:/wss: to the same host and port (CSP Level 3; checked
# by tests/e2e/test_page.py, which fails on any reported violation).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate every time (FileResponse answers 304 from its ETag): a new bundle after an
    # upgrade is picked up at once, and an unchanged one costs no transfer.
    "Cache-Control": "no-cache",
}
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}


@cache
def _assets() -> dict[str, Path]:
    """The files the page may load, by name; nothing outside the assets folder is reachable."""
    folder = WEB_DIR / "assets"
    return {path.name: path for path in folder.iterdir() if path.suffix in _TYPES}


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.api_route("/assets/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    path = _assets().get(name)
    if path is None:
        raise NotFoundError("asset", name)
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)

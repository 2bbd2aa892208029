"""The built-in playground and live-metrics page: `GET /` and its assets under `/static/`.

Everything the page needs ships in `service/api/static/` (plain HTML, CSS and JS, no build step, no CDN),
so it works with no internet. The page talks only to this server's own routes (`/v1/*`, `/ready`,
`/metrics`) and keeps API keys in page memory. A Content-Security-Policy of `'self'` makes the browser
refuse any request to another origin, so the page cannot leak prompts or keys elsewhere. The page is
open even when API keys are configured: it holds no data, and every request it makes carries the key
the user types in.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "metrics.js": "text/javascript", "app.css": "text/css"}
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The playground, compare, live-metrics and admin page."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's own assets (a fixed list: nothing else on disk is reachable)."""
    if name not in ASSETS:
        raise HTTPException(404, f"no asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)

"""The web page (streamd/api/static/: plain HTML, CSS and JS modules; no build step, nothing from another site),
served at / and /ui/<file>. The files hold no data and need no token: the page asks for one (kept in the tab's
session storage) and sends it as a bearer header to the API. Only the files shipped in the package are served, with
a Content-Security-Policy that allows this origin's scripts, styles and connections and nothing else (no inline
script, no framing)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from streamd.api.errors import ApiError

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
FILES = {p.name: p for p in STATIC.iterdir() if p.suffix in TYPES} if STATIC.is_dir() else {}


def _file(name: str) -> web.Response:
    path = FILES.get(name)
    if path is None:
        raise ApiError(404, "not_found", "no such file")
    return web.Response(body=path.read_bytes(), content_type=TYPES[path.suffix], charset="utf-8",
                        headers=HEADERS)


async def index(request: web.Request) -> web.Response:
    return _file("index.html")


async def asset(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


def add_page(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui/{name}", asset)

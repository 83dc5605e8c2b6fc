"""The route table's entry type and the middlewares: JSON errors (also for what aiohttp answers itself), CORS,
authentication, scopes and rate limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import RedisError

from streamd.api.context import AUTH, AUTH_FAILURES, CFG, LIMITER, PRINCIPAL
from streamd.api.errors import ApiError, error_response
from streamd.api.security import Principal
from streamd.config import ApiConfig
from streamd.log import get_logger, redact_text

log = get_logger("streamd.api")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Any
    scope: str | None  # None = public
    summary: str
    body: Any = None
    tag: str = "streams"
    ok: int = 200
    response: Any = None  # pydantic model of the success body (for the OpenAPI document)
    etag: bool = False  # the success answer carries an ETag
    if_match: bool = False  # takes If-Match (412 precondition_failed)
    media: str = "application/json"  # of the success body (image/jpeg, text/event-stream ...)
    query: tuple[dict[str, Any], ...] = ()  # OpenAPI query parameters



HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
              500: "internal"}


# -- errors aiohttp answers itself --------------------------------------------------------------------------------
class _JsonErrorsHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (a request line or header over 8190 bytes, a bad method ...)
    itself, before any middleware, in plain text echoing the request line: this one answers in the API's shape
    and never echoes the request. aiohttp still logs the error and closes the connection."""

    __slots__ = ()  # the layout of RequestHandler: an instance can take this class (see _JsonErrorsServer)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response was sent already
        if isinstance(exc, http_exceptions.LineTooLong):
            text = "a request line or header is too long"
        elif isinstance(exc, http_exceptions.BadStatusLine):
            text = "not an HTTP request line"
        elif isinstance(exc, http_exceptions.BadHttpMessage):
            text = "a malformed HTTP request"
        else:
            text = "the request failed" if status >= 500 else "a bad request"
        details = {"reason": type(exc).__name__} if exc is not None and status < 500 else None
        resp = error_response(status, HTTP_CODES.get(status, "http_error"), text, details)
        resp.force_close()
        return resp


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonErrorsHandler
        return handler


class ApiRunner(web.AppRunner):
    """web.AppRunner whose connections answer aiohttp's own errors in the API's JSON shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer
        return server


# -- middlewares ----------------------------------------------------------------------------------------------
@web.middleware
async def errors_mw(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error as JSON, with the CORS headers a browser needs to read it (an allowed origin's page sees why
    its request was refused, a 401 included)."""
    resp = await _errors(request, handler)
    if resp.status >= 400 and not resp.prepared:
        resp.headers.update(cors_headers(request, request.app[CFG]))
    return resp


async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message, e.details, e.headers)
    except (RedisError, ConnectionError) as e:  # state lives in Redis: try again when it is back
        if _pool_exhausted(e):  # Redis answers, but every connection of the API's pool is in use
            log.warning("API request refused: every Redis connection of the API is busy", path=request.path)
            return error_response(503, "busy", "the daemon is busy (every Redis connection of the API is in use); "
                                  "try again", {"pool": "api.redis_pool"}, {"Retry-After": "1"})
        log.warning("API request failed: Redis unreachable", path=request.path, error=str(e) or type(e).__name__)
        return error_response(503, "redis_unavailable", "Redis is unreachable; try again",
                              {"reason": redact_text(str(e) or type(e).__name__)}, {"Retry-After": "1"})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(e.status, HTTP_CODES.get(e.status, "http_error"), e.reason or "error", None, headers)
    except Exception as e:  # noqa: BLE001 - never leak a traceback; log it
        log.exception("API handler failed", path=request.path)
        return error_response(500, "internal", redact_text(f"{type(e).__name__}: {e}"))


def _pool_exhausted(e: BaseException) -> bool:
    """redis-py's blocking pool found no free connection within its timeout, or (Redis Cluster) a master's
    connections were all in use: not an unreachable Redis."""
    return isinstance(e, MaxConnectionsError) or \
        isinstance(e, RedisConnectionError) and str(e).startswith("No connection available")


def cors_headers(request: web.Request, cfg: ApiConfig) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if not origin or origin not in cfg.cors_origins:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match, Last-Event-ID",
            "Access-Control-Expose-Headers": "ETag, Retry-After, X-Streamd-Entry-Id, X-Streamd-Seq, "
                                             "X-Streamd-Capture-Ts",
            "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS", "Access-Control-Max-Age": "600"}


@web.middleware
async def cors_mw(request: web.Request, handler: Any) -> web.StreamResponse:
    cfg = request.app[CFG]
    headers = cors_headers(request, cfg)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not headers:
            return error_response(403, "cors_denied", "origin not allowed")
        return web.Response(status=204, headers=headers)
    resp = await handler(request)
    resp.headers.update(headers)
    return resp


JSON_TYPES = ("application/json",)
MUTATING = ("POST", "PUT", "PATCH", "DELETE")


@web.middleware
async def same_site_mw(request: web.Request, handler: Any) -> web.StreamResponse:
    """Without tokens (loopback only) anything that can reach the port may act, so the API makes sure the request
    comes from this machine's own clients, not from a web page on another site the user happens to open: `Host`
    must be a loopback name or address with the API's port (a DNS-rebinding page sends its own host name),
    `Origin` must be absent, the API's own, or in api.cors_origins, `Sec-Fetch-Site: cross-site` is refused, and
    a mutating request's body must be JSON (`text/plain` and form bodies are what a page may send without a
    preflight). With tokens none of this is needed: a page cannot send the Authorization header cross-site."""
    if request.app[AUTH].enabled:
        return await handler(request)
    host = request.headers.get("Host", "")
    if not _loopback_host(host, _local_port(request)):
        raise ApiError(403, "host_not_allowed", "without tokens the API answers only requests addressed to a "
                       "loopback host and its own port (Host: 127.0.0.1:<port> or localhost:<port>)",
                       {"host": host[:200]})
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != f"{request.scheme}://{host}".lower() \
            and origin not in request.app[CFG].cors_origins:
        raise ApiError(403, "cross_origin_refused", "without tokens the API refuses requests from another "
                       "origin's pages (api.cors_origins lists the allowed ones)", {"origin": origin[:200]})
    if request.headers.get("Sec-Fetch-Site") == "cross-site" and origin is None:
        raise ApiError(403, "cross_origin_refused", "without tokens the API refuses cross-site requests")
    if request.method in MUTATING and request.can_read_body and not _upload(request) \
            and request.content_type not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "a request body must be JSON (Content-Type: "
                       "application/json)", {"content_type": request.content_type})
    return await handler(request)


def _upload(request: web.Request) -> bool:
    """Routes that take images or videos (predict, job uploads): their own media types, checked by them."""
    return request.path.startswith("/api/v1/predict/") or request.method == "POST" and request.path == "/api/v1/jobs"


def _local_port(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return sock[1] if isinstance(sock, tuple) and len(sock) >= 2 else None


def _loopback_host(host: str, port: int | None) -> bool:
    """`host` (a Host header) names a loopback address or localhost, with `port` (80 when it names none)."""
    if host.startswith("["):  # [::1]:8080
        end = host.find("]")
        name, rest = host[1:end], host[end + 1 :]
        if end < 0 or rest and not rest.startswith(":"):
            return False
        port_s = rest[1:]
    else:
        name, _, port_s = host.partition(":")
    try:
        given = int(port_s) if port_s else 80
    except ValueError:
        return False
    if port is not None and given != port:
        return False
    name = name.lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def auth_mw(routes: dict[tuple[str, str], Route]) -> Any:
    @web.middleware
    async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
        info = request.match_info.route.resource
        method = "GET" if request.method == "HEAD" else request.method  # HEAD: GET's answer without the body
        key = (method, info.canonical if info is not None else "")
        route = routes.get(key)
        cfg, auth = request.app[CFG], request.app[AUTH]
        if route is None or (route.scope is None and (cfg.public_health or not auth.enabled)):
            return await handler(request)
        client = request.remote or "?"
        failures = request.app[AUTH_FAILURES]
        if auth.enabled:
            wait = failures.blocked(client)
            if wait > 0:  # the token is not even checked
                raise ApiError(429, "too_many_auth_failures", "too many failed authentications from this address",
                               {"retry_after_s": round(wait, 3)},
                               headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        try:
            principal: Principal = auth.principal(request)
        except ApiError:
            if "Authorization" in request.headers:  # a credential was presented and refused: a guess
                failures.failed(client)
            raise
        wait = request.app[LIMITER].check(principal.name if auth.enabled else client)
        if wait > 0:
            raise ApiError(429, "rate_limited", "too many requests", {"retry_after_s": round(wait, 3)},
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        needed = route.scope or "read"
        if not principal.allows(needed):
            raise ApiError(403, "forbidden", f"this needs the {needed!r} scope", {"needed": needed})
        request[PRINCIPAL] = principal
        return await handler(request)

    return mw


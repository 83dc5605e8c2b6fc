"""Routes, middlewares and the OpenAPI document, built from one route table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from streamd import jsonsafe, pipelines as pipeline_files
from streamd.api import responses as R
from streamd.api.context import (AUTH, AUTH_FAILURES, CFG, DAEMON, LIMITER, PRINCIPAL, STREAM_LOCKS,
                                 daemon as _daemon)
from streamd.api.etag import (KeyedLocks, if_match, matches, precondition_failed, prompt_etag, prompt_versions,
                              stream_etag)
from streamd.api.errors import ApiError, error_response, json_response, validation_details
from streamd.api.cluster import cluster
from streamd.api.health import health, health_live, health_ready, metrics
from streamd.api.schemas import PromptUpdate, Rollback, StreamPatch
from streamd.api.security import (AuthFailures, Authenticator, Principal, RateLimiter,
                                  check_ffmpeg_options, check_stream_url)
from streamd.api_streams import StreamExists, StreamNotFound
from streamd.fleet_streams import CapacityExhausted
from streamd.config import ApiConfig, StreamConfig
from streamd.errors import ConfigError, StreamdError
from streamd.log import get_logger, redact_text
from streamd.prompts import KINDS, SCOPE_RE, PreconditionFailed, PromptDeleted, PromptNotFound, RollbackToDeletion
from streamd.supervisor import TERMINAL

if TYPE_CHECKING:
    from streamd.daemon import Daemon

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


MAX_DEPTH = 64  # arrays and objects in a request body (a prompt's JSON schema is the deepest part)


def _depth(data: Any) -> int:
    """How deeply arrays and objects nest in `data` (without recursion)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def _raw_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, outside strings, without parsing it. Only scanned when
    the text has more than MAX_DEPTH opening brackets at all (a normal body has a handful)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    in_str = escaped = False
    for c in raw:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


async def _json_body(request: web.Request, model: Any) -> Any:
    """The body as `model`; any parser error is a 400 `invalid_json`, a body the schema refuses a 422. A body that
    nests deeper than MAX_DEPTH is refused before it is parsed: the parser's RecursionError leaves CPython 3.11's
    recursion bookkeeping out of step (a later `ast.parse` in the process fails with SystemError)."""
    raw = await request.read()  # raises 413 past client_max_size
    if _raw_depth(raw) > MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests arrays or objects deeper than {MAX_DEPTH} levels")
    try:
        data = jsonsafe.loads(raw or b"null")  # NaN, Infinity and 1e999 are refused, not read as floats
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", f"the body nests arrays or objects deeper than {MAX_DEPTH} levels") \
            from None
    if _depth(data) > MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests arrays or objects deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_body", "the body must be a JSON object",
                       {"errors": [{"path": "<body>", "message": "not an object", "type": "dict_type"}]})
    try:  # strict types ("2" is no number, "yes" no boolean); JSON mode, so enums still come as their strings
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        raise ApiError(422, "invalid_body", "the body does not match the schema", validation_details(e)) from None


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
    """redis-py's blocking pool found no free connection within its timeout (not an unreachable Redis)."""
    return isinstance(e, RedisConnectionError) and str(e).startswith("No connection available")


def _cors_headers(request: web.Request, cfg: ApiConfig) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if not origin or origin not in cfg.cors_origins:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
            "Access-Control-Expose-Headers": "ETag, Retry-After",
            "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS", "Access-Control-Max-Age": "600"}


@web.middleware
async def cors_mw(request: web.Request, handler: Any) -> web.StreamResponse:
    cfg = request.app[CFG]
    headers = _cors_headers(request, cfg)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not headers:
            return error_response(403, "cors_denied", "origin not allowed")
        return web.Response(status=204, headers=headers)
    resp = await handler(request)
    resp.headers.update(headers)
    return resp


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


# -- streams --------------------------------------------------------------------------------------------------
def _stream(request: web.Request) -> str:
    sid = request.match_info["id"]
    if not _daemon(request).has_stream(sid):  # fleet mode: also a stream another daemon runs
        raise ApiError(404, "stream_not_found", f"no stream {sid!r}")
    return sid


async def streams_list(request: web.Request) -> web.Response:
    d = _daemon(request)
    return json_response({"streams": [d.stream_info(s) for s in d.stream_ids()]})


def _with_etag(resp: web.Response, etag: str) -> web.Response:
    resp.headers["ETag"] = etag
    return resp


async def stream_get(request: web.Request) -> web.Response:
    d = _daemon(request)
    sid = _stream(request)
    return _with_etag(json_response(d.stream_info(sid)), stream_etag(d.stream_config(sid)))


def _stream_precondition(request: web.Request, sid: str) -> StreamConfig:
    """The stream's configuration, once If-Match holds for it (called holding the stream's lock)."""
    d = _daemon(request)
    if not d.has_stream(sid):  # removed meanwhile
        raise ApiError(404, "stream_not_found", f"no stream {sid!r}")
    old = d.stream_config(sid)
    if not matches(if_match(request), stream_etag(old)):
        raise precondition_failed(stream_etag(old))
    return old


async def _check_source(request: web.Request, s: StreamConfig, old: StreamConfig | None) -> None:
    """Refuse a URL or FFmpeg options a client must not set. A PATCH of a config-file stream that leaves its URL
    as the operator wrote it (a file, say) does not check that URL against the API's rules, nor options it leaves
    alone; a new URL checks every option (they would go to another host). API-added streams are checked whole."""
    d = _daemon(request)
    configured = next((c for c in d.cfg.streams if c.id == s.id), None)
    operators_url = old is not None and configured is not None and s.url == old.url == configured.url
    options_changed = old is None or s.ffmpeg_options != old.ffmpeg_options
    if not operators_url:
        await check_stream_url(s.url, request.app[CFG], d.cfg.egress, s.ffmpeg_options)
    elif options_changed:
        check_ffmpeg_options(s.ffmpeg_options)


async def _start(request: web.Request, s: StreamConfig, replace: bool, old: StreamConfig | None = None) \
        -> web.Response:
    d = _daemon(request)
    await _check_source(request, s, old)
    known = pipeline_files.available(d.cfg)
    if s.pipeline not in known:  # only names of pipelines: never a path to some other YAML file
        raise ApiError(422, "invalid_pipeline", f"unknown pipeline {s.pipeline!r}",
                       {"path": "pipeline", "available": known})
    try:
        await d.api_put_stream(s, replace=replace)
    except ConfigError as e:
        raise ApiError(422, "invalid_pipeline", str(e), {"path": "pipeline", "key": e.key}) from None
    except CapacityExhausted as e:  # fleet mode: every daemon is full
        raise ApiError(503, "capacity_exhausted", str(e), {"streams": e.streams, "capacity": e.capacity},
                       headers={"Retry-After": "30"}) from None
    except StreamExists as e:  # another request added the same id meanwhile
        raise ApiError(409, "stream_exists", str(e)) from None
    except StreamNotFound as e:  # another request removed it meanwhile
        raise ApiError(404, "stream_not_found", str(e)) from None
    log.info("stream set through the API", stream=s.id, by=request[PRINCIPAL].name)
    return _with_etag(json_response(d.stream_info(s.id), status=200 if replace else 201), stream_etag(s))


async def stream_create(request: web.Request) -> web.Response:
    s = await _json_body(request, StreamConfig)
    d = _daemon(request)
    async with request.app[STREAM_LOCKS].hold(s.id):
        if d.has_stream(s.id):
            raise ApiError(409, "stream_exists", f"stream {s.id!r} exists")
        return await _start(request, s, replace=False)


async def stream_update(request: web.Request) -> web.Response:
    sid = _stream(request)
    patch = await _json_body(request, StreamPatch)
    d = _daemon(request)
    async with request.app[STREAM_LOCKS].hold(sid):  # If-Match is checked against the stream this PATCH changes
        old = _stream_precondition(request, sid)
        merged = {**old.model_dump(mode="json", exclude_unset=True),
                  **patch.model_dump(mode="json", exclude_unset=True)}
        try:
            s = StreamConfig.model_validate(merged)
        except ValidationError as e:
            raise ApiError(422, "invalid_body", "the stream would be invalid", validation_details(e)) from None
        if s.model_dump() == old.model_dump() and s.model_fields_set == old.model_fields_set \
                and (sid not in d.runners or d.runners[sid].state not in TERMINAL):
            # no change (an empty body, the same values): nothing happens
            return _with_etag(json_response(d.stream_info(sid)), stream_etag(old))
        return await _start(request, s, replace=True, old=old)


async def stream_delete(request: web.Request) -> web.Response:
    sid = _stream(request)
    async with request.app[STREAM_LOCKS].hold(sid):
        _stream_precondition(request, sid)
        try:
            await _daemon(request).api_delete_stream(sid)
        except StreamNotFound as e:  # another request removed it meanwhile
            raise ApiError(404, "stream_not_found", str(e)) from None
    return web.Response(status=204)


# -- prompts --------------------------------------------------------------------------------------------------
def _prompt_key(request: web.Request) -> tuple[str, str]:
    kind, scope = request.match_info["kind"], request.match_info["scope"]
    if kind not in KINDS:
        raise ApiError(404, "unknown_prompt_kind", f"prompt kinds: {', '.join(KINDS)}")
    if not SCOPE_RE.match(scope):
        raise ApiError(422, "invalid_scope", "scope is global, pipeline:<name> or stream:<id>", {"path": "scope"})
    return kind, scope


def _author(request: web.Request, given: str | None) -> str:
    p: Principal = request[PRINCIPAL]
    return p.name if request.app[AUTH].enabled else (given or "anonymous")


IGNORED_BY_KIND = {"vlm": frozenset({"phrases"}), "vocabulary": frozenset({"text", "schema_"})}


async def prompts_list(request: web.Request) -> web.Response:
    return json_response({"prompts": await _daemon(request).prompts.all_current()})  # type: ignore[union-attr]


def _deleted(e: PromptDeleted) -> ApiError:
    rec = e.record
    return ApiError(404, "prompt_deleted", f"the {rec['kind']} prompt for {rec['scope']} was deleted (version "
                    f"{rec['version']}); its history is kept", {"version": rec["version"]})


def _prompt_precondition_failed(e: PreconditionFailed) -> ApiError:
    return precondition_failed(None if e.current is None else prompt_etag(e.current))


async def prompt_get(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    try:
        rec = await _daemon(request).prompts.current(kind, scope)  # type: ignore[union-attr]
    except PromptDeleted as e:
        raise _deleted(e) from None
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no {kind} prompt for {scope}") from None
    return _with_etag(json_response(rec), prompt_etag(rec["version"]))


async def prompt_put(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    body = await _json_body(request, PromptUpdate)
    ignored = sorted("schema" if f == "schema_" else f for f in body.model_fields_set & IGNORED_BY_KIND[kind])
    if ignored:  # refused, not dropped: the client meant something the prompt would not do
        raise ApiError(422, "invalid_body", f"a {kind} prompt takes no {', '.join(ignored)}",
                       {"errors": [{"path": f, "message": f"not used by a {kind} prompt", "type": "extra_forbidden"}
                                   for f in ignored]})
    if kind == "vlm" and not body.text:
        raise ApiError(422, "invalid_body", "a vlm prompt needs text", {"path": "text"})
    if kind == "vocabulary" and not body.phrases:
        raise ApiError(422, "invalid_body", "a vocabulary needs phrases", {"path": "phrases"})
    content: dict[str, Any] = {"text": body.text} if kind == "vlm" else {"phrases": body.phrases}
    if kind == "vlm" and body.schema_ is not None:
        content["schema"] = body.schema_
    try:
        rec = await _daemon(request).prompts.put(  # type: ignore[union-attr]
            kind, scope, content, _author(request, body.author), body.note,
            if_match=prompt_versions(if_match(request)))
    except PreconditionFailed as e:
        raise _prompt_precondition_failed(e) from None
    return _with_etag(json_response(rec, status=201), prompt_etag(rec["version"]))


async def prompt_delete(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    note = request.query.get("note")
    if note is not None and len(note) > 1000:
        raise ApiError(422, "invalid_query", "note is at most 1000 characters", {"path": "note"})
    try:
        rec = await _daemon(request).prompts.delete(  # type: ignore[union-attr]
            kind, scope, _author(request, None), note, if_match=prompt_versions(if_match(request)))
    except PromptDeleted as e:
        raise _deleted(e) from None
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no {kind} prompt for {scope}") from None
    except PreconditionFailed as e:
        raise _prompt_precondition_failed(e) from None
    log.info("prompt deleted through the API", kind=kind, scope=scope, version=rec["version"],
             by=request[PRINCIPAL].name)
    return json_response(rec)


async def prompt_history(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    try:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise ApiError(422, "invalid_query", "offset and limit are integers") from None
    if offset < 0 or not 1 <= limit <= 500:
        raise ApiError(422, "invalid_query", "offset >= 0 and 1 <= limit <= 500")
    try:
        total, items = await _daemon(request).prompts.history(kind, scope, offset, limit)  # type: ignore
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no {kind} prompt for {scope}") from None
    return json_response({"total": total, "offset": offset, "limit": limit, "versions": items})


async def prompt_rollback(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    body = await _json_body(request, Rollback)
    try:
        rec = await _daemon(request).prompts.rollback(  # type: ignore[union-attr]
            kind, scope, body.version, _author(request, body.author), body.note,
            if_match=prompt_versions(if_match(request)))
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no version {body.version} of the {kind} prompt for {scope}") \
            from None
    except RollbackToDeletion as e:
        raise ApiError(422, "invalid_body", f"{e}: DELETE the prompt instead", {"errors": [
            {"path": "version", "message": "a deletion (tombstone) version", "type": "value_error"}]}) from None
    except PreconditionFailed as e:
        raise _prompt_precondition_failed(e) from None
    return _with_etag(json_response(rec, status=201), prompt_etag(rec["version"]))


# -- pipelines and models -------------------------------------------------------------------------------------
async def pipelines_list(request: web.Request) -> web.Response:
    d = _daemon(request)
    out = []
    for name in pipeline_files.available(d.cfg):
        try:
            pcfg = pipeline_files.resolve(d.cfg, name, "pipeline")
        except StreamdError as e:
            out.append({"name": name, "error": str(e)})
            continue
        stages = [{"type": st.type, "name": st.name or st.type, **({"model": st.model_extra["model"]}
                   if st.model_extra and "model" in st.model_extra else {})} for st in pcfg.stages]
        out.append({"name": name, "description": pcfg.description, "stages": stages,
                    "running": name in d.pipelines,
                    "streams": sorted(s for s, r in d.runners.items() if r.cfg.pipeline == name)})
    return json_response({"pipelines": out})


async def models_list(request: web.Request) -> web.Response:
    return json_response({"loaded": _daemon(request).models.loaded()})


async def openapi(request: web.Request) -> web.Response:
    from streamd.api.openapi import document

    return json_response(document(ROUTES))


async def docs(request: web.Request) -> web.Response:
    from streamd.api.openapi import docs_html

    return web.Response(text=docs_html(ROUTES), content_type="text/html")


P = "/api/v1"
ROUTES: list[Route] = [
    Route("GET", "/health/live", health_live, None, "the event loop answers (never depends on Redis)", tag="health",
          response=R.Live),
    Route("GET", "/health/ready", health_ready, None, "Redis reachable and models loaded", tag="health",
          response=R.Ready),
    Route("GET", "/health", health, "read", "summary with per-stream states", tag="health", response=R.Health),
    Route("GET", "/metrics", metrics, "read", "Prometheus metrics", tag="health"),
    Route("GET", "/openapi.json", openapi, "read", "this API's OpenAPI 3 document", tag="docs"),
    Route("GET", "/docs", docs, "read", "human-readable API reference", tag="docs"),
    Route("GET", f"{P}/streams", streams_list, "read", "list streams", response=R.StreamList),
    Route("POST", f"{P}/streams", stream_create, "operate", "add a stream", StreamConfig, ok=201,
          response=R.StreamInfo, etag=True),
    Route("GET", f"{P}/streams/{{id}}", stream_get, "read", "one stream's state and rates", response=R.StreamInfo,
          etag=True),
    Route("PATCH", f"{P}/streams/{{id}}", stream_update, "operate",
          "change a stream (fps, stall_timeout_s: live; other fields restart it)", StreamPatch, response=R.StreamInfo,
          etag=True, if_match=True),
    Route("DELETE", f"{P}/streams/{{id}}", stream_delete, "operate", "remove a stream", ok=204, if_match=True),
    Route("GET", f"{P}/prompts", prompts_list, "read", "current prompts of every scope", tag="prompts",
          response=R.PromptList),
    Route("GET", f"{P}/prompts/{{kind}}/{{scope}}", prompt_get, "read", "current version", tag="prompts",
          response=R.PromptRecord, etag=True),
    Route("PUT", f"{P}/prompts/{{kind}}/{{scope}}", prompt_put, "operate", "new version", PromptUpdate,
          tag="prompts", ok=201, response=R.PromptRecord, etag=True, if_match=True),
    Route("DELETE", f"{P}/prompts/{{kind}}/{{scope}}", prompt_delete, "operate",
          "delete: a tombstone version (history kept); the next scope's prompt applies", tag="prompts",
          response=R.PromptRecord, if_match=True),
    Route("GET", f"{P}/prompts/{{kind}}/{{scope}}/history", prompt_history, "read", "versions, newest first",
          tag="prompts", response=R.PromptHistory),
    Route("POST", f"{P}/prompts/{{kind}}/{{scope}}/rollback", prompt_rollback, "operate",
          "new version with an old version's content", Rollback, tag="prompts", ok=201, response=R.PromptRecord,
          etag=True, if_match=True),
    Route("GET", f"{P}/pipelines", pipelines_list, "read", "pipelines and the models they use", tag="pipelines",
          response=R.PipelineList),
    Route("GET", f"{P}/models", models_list, "read", "models loaded now", tag="pipelines", response=R.ModelList),
    Route("GET", f"{P}/cluster", cluster, "read", "the daemons sharing this Redis (fleet mode) and their load",
          tag="health", response=R.Cluster),
]


def build_app(daemon: "Daemon", cfg: ApiConfig, environ: dict[str, str]) -> web.Application:
    table = {(r.method, r.path): r for r in ROUTES}
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[errors_mw, cors_mw, auth_mw(table)])
    app[DAEMON] = daemon
    app[CFG] = cfg
    app[AUTH] = Authenticator(cfg, environ)
    app[LIMITER] = RateLimiter(cfg.rate_limit_per_s, cfg.rate_limit_burst)
    app[AUTH_FAILURES] = AuthFailures(cfg.auth_failure_limit, cfg.auth_failure_window_s)
    app[STREAM_LOCKS] = KeyedLocks()
    for r in ROUTES:
        if r.method == "GET":
            app.router.add_get(r.path, r.handler, allow_head=True)  # HEAD too
        else:
            app.router.add_route(r.method, r.path, r.handler)
    return app

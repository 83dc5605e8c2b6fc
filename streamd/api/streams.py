"""Handlers of /api/v1/streams and /api/v1/pipelines: they reach the stream manager (STREAMS), never the daemon."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from streamd import pipelines as pipeline_files
from streamd.api.body import json_body as _json_body
from streamd.api.context import CFG, PRINCIPAL, STREAM_LOCKS
from streamd.api.context import streams as _streams
from streamd.api.errors import ApiError, json_response, validation_details
from streamd.api.etag import if_match, matches, precondition_failed, stream_etag
from streamd.api.schemas import StreamPatch
from streamd.api.security import check_ffmpeg_options, check_stream_url
from streamd.config import StreamConfig
from streamd.errors import ConfigError, StreamdError
from streamd.log import get_logger
from streamd.streams.fleet import CapacityExhausted
from streamd.fleet import ConfigStreamInFleet, StandingAside
from streamd.streams.store import StreamExists, StreamNotFound
from streamd.streams.supervisor import TERMINAL

log = get_logger("streamd.api")


# -- streams --------------------------------------------------------------------------------------------------
def _stream(request: web.Request) -> str:
    sid = request.match_info["id"]
    d = _streams(request)
    # fleet mode: also a stream another daemon runs, one this daemon's config file does not name included
    if not d.has_stream(sid) and d.elsewhere(sid) is None:
        raise ApiError(404, "stream_not_found", f"no stream {sid!r}")
    return sid


def _not_here(d: Any, sid: str, owner: str | None) -> ApiError:
    """A change of a stream only other daemons' config files name (this daemon does not know its configuration)."""
    members = d.fleet.fleet.wanted_elsewhere(sid) or ([owner] if owner else [])
    return ApiError(409, "stream_in_config", f"stream {sid!r} is in the config file of {', '.join(members)}, not "
                    "in this daemon's: change it in their config files", {"stream_id": sid, "members": members})


def _aside(d: Any, e: StandingAside) -> ApiError:
    f = d.fleet.fleet
    return ApiError(409, "standing_aside", str(e), {"member_id": f.member_id, "other_instance": f.duplicate})


async def _synced(request: web.Request, sid: str) -> None:
    """Fleet mode: a stream added through another daemon's API that this daemon's sync has not read yet (another
    member's heartbeat says it runs it, `source: api`) is read from Redis now, so a change of it works here too."""
    d = _streams(request)
    if d.fleet is not None and not d.has_stream(sid) and (remote := d.elsewhere(sid)) is not None \
            and remote.get("source") == "api":
        await d.fleet.sync()


async def streams_list(request: web.Request) -> web.Response:
    d = _streams(request)
    ids = sorted(set(d.stream_ids()) | set(d.elsewhere_ids()))
    return json_response({"streams": [d.stream_info(s) for s in ids]})


def _with_etag(resp: web.Response, etag: str) -> web.Response:
    resp.headers["ETag"] = etag
    return resp


async def stream_get(request: web.Request) -> web.Response:
    d = _streams(request)
    sid = _stream(request)
    if not d.has_stream(sid):  # another daemon's config-file stream: its configuration (the ETag's) is not here
        return json_response(d.stream_info(sid))
    return _with_etag(json_response(d.stream_info(sid)), stream_etag(d.stream_config(sid)))


def _stream_precondition(request: web.Request, sid: str) -> StreamConfig:
    """The stream's configuration, once If-Match holds for it (called holding the stream's lock)."""
    d = _streams(request)
    if not d.has_stream(sid):  # removed meanwhile, or another daemon's config-file stream
        if (remote := d.elsewhere(sid)) is not None and remote.get("source") != "api":
            raise _not_here(d, sid, remote["owner"])
        raise ApiError(404, "stream_not_found", f"no stream {sid!r}")
    old = d.stream_config(sid)
    if not matches(if_match(request), stream_etag(old)):
        raise precondition_failed(stream_etag(old))
    return old


async def _check_source(request: web.Request, s: StreamConfig, old: StreamConfig | None) -> None:
    """Refuse a URL or FFmpeg options a client must not set. A PATCH of a config-file stream that leaves its URL
    as the operator wrote it (a file, say) does not check that URL against the API's rules, nor options it leaves
    alone; a new URL checks every option (they would go to another host). API-added streams are checked whole."""
    d = _streams(request)
    configured = next((c for c in d.cfg.streams if c.id == s.id), None)
    operators_url = old is not None and configured is not None and s.url == old.url == configured.url
    options_changed = old is None or s.ffmpeg_options != old.ffmpeg_options
    if not operators_url:
        await check_stream_url(s.url, request.app[CFG], d.cfg.egress, s.ffmpeg_options)
    elif options_changed:
        check_ffmpeg_options(s.ffmpeg_options)


async def _start(request: web.Request, s: StreamConfig, replace: bool, old: StreamConfig | None = None,
                 pending: bool = False) -> web.Response:
    d = _streams(request)
    await _check_source(request, s, old)
    known = pipeline_files.available(d.cfg)
    if s.pipeline not in known:  # only names of pipelines: never a path to some other YAML file
        raise ApiError(422, "invalid_pipeline", f"unknown pipeline {s.pipeline!r}",
                       {"path": "pipeline", "available": known})
    try:
        await d.api_put_stream(s, replace=replace, pending=pending)
    except ConfigError as e:
        raise ApiError(422, "invalid_pipeline", str(e), {"path": "pipeline", "key": e.key}) from None
    except CapacityExhausted as e:  # fleet mode: every daemon is full
        raise ApiError(503, "capacity_exhausted", str(e), {"streams": e.streams, "capacity": e.capacity,
                                                           "overloaded": e.overloaded, "admission": "refuse"},
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except StreamExists as e:  # another request added the same id meanwhile
        raise ApiError(409, "stream_exists", str(e)) from None
    except StreamNotFound as e:  # another request removed it meanwhile
        raise ApiError(404, "stream_not_found", str(e)) from None
    except StandingAside as e:
        raise _aside(d, e) from None
    log.info("stream set through the API", stream=s.id, by=request[PRINCIPAL].name)
    if not d.has_stream(s.id):  # fleet mode: deleted through another daemon while this one was placing it
        raise ApiError(404, "stream_not_found", f"stream {s.id!r} was set, then deleted by another request")
    return _with_etag(json_response(d.stream_info(s.id), status=200 if replace else 201), stream_etag(s))


RETRY_AFTER_S = 30  # a full fleet: room comes back when a stream is removed, a load falls or a daemon joins
ADMISSIONS = ("refuse", "pending")


async def stream_create(request: web.Request) -> web.Response:
    """`?admission=refuse` (default): a fleet with no room answers 503 capacity_exhausted; `?admission=pending`:
    the stream is kept, shown `pending`, and starts on the first daemon that has room."""
    admission = request.query.get("admission", "refuse")
    if admission not in ADMISSIONS:
        raise ApiError(422, "invalid_query", f"admission is one of {', '.join(ADMISSIONS)}",
                       {"path": "admission"})
    s = await _json_body(request, StreamConfig)
    d = _streams(request)
    async with request.app[STREAM_LOCKS].hold(s.id):
        if d.has_stream(s.id) or d.elsewhere(s.id) is not None:  # in fleet mode: in another daemon's config file
            raise ApiError(409, "stream_exists", f"stream {s.id!r} exists")
        if d.fleet is not None and (others := d.fleet.fleet.wanted_elsewhere(s.id, named=True)):
            # another live daemon's config file names it, though nobody runs it now (its daemon full, restarting,
            # over its load limit): an API stream of that id would take it over
            raise ApiError(409, "stream_exists", f"stream {s.id!r} exists: it is in the config file of "
                           f"{', '.join(others)}", {"stream_id": s.id, "members": others})
        return await _start(request, s, replace=False, pending=admission == "pending")


async def stream_update(request: web.Request) -> web.Response:
    sid = _stream(request)
    patch = await _json_body(request, StreamPatch)
    d = _streams(request)
    async with request.app[STREAM_LOCKS].hold(sid):  # If-Match is checked against the stream this PATCH changes
        await _synced(request, sid)
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
        await _synced(request, sid)
        _stream_precondition(request, sid)
        try:
            await _streams(request).api_delete_stream(sid)
        except StreamNotFound as e:  # another request removed it meanwhile
            raise ApiError(404, "stream_not_found", str(e)) from None
        except ConfigStreamInFleet as e:
            raise ApiError(409, "stream_in_config", str(e), {"stream_id": sid, "members": e.members}) from None
        except StandingAside as e:
            raise _aside(_streams(request), e) from None
    return web.Response(status=204)



# -- pipelines and models -------------------------------------------------------------------------------------
async def pipelines_list(request: web.Request) -> web.Response:
    d = _streams(request)
    out = []
    for name in pipeline_files.available(d.cfg):
        try:
            pcfg = pipeline_files.resolve(d.cfg, name, "pipeline")
        except StreamdError as e:
            out.append({"name": name, "error": str(e)})
            continue
        stages = [{"type": st.type, "name": st.name or st.type, **({"model": st.model_extra["model"]}
                   if st.model_extra and "model" in st.model_extra else {})} for st in pcfg.stages]
        switches = d.pipelines.switches if d.pipelines is not None else None
        out.append({"name": name, "description": pcfg.description, "stages": stages,
                    "running": name in d.pipelines,
                    "streams": sorted(s for s, r in d.runners.items() if r.cfg.pipeline == name),
                    **(switches.describe(name, pcfg) if switches is not None else {})})  # its live changes
    return json_response({"pipelines": out})



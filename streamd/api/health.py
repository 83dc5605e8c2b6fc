"""Health and metrics handlers. `/health/live` never touches Redis; `/health/ready` is 200 once the daemon started,
Redis answers and every running pipeline's models are loaded (a pipeline whose setup failed fails its own streams,
not readiness); `/health` sums up streams and pipelines; `/metrics` is Prometheus text."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streamd.api.context import METRICS, streams
from streamd.api.errors import ApiError, json_response
from streamd.streams.manager import StreamManager

PING = web.AppKey("ping", dict)  # the last /health PING: {"at": monotonic time, "answer": future}


async def health_live(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


READY_CACHE_S = 1.0  # /health/ready is public: a flood of it sends at most one PING a second to Redis


async def _redis_ok(request: web.Request) -> bool:
    """Whether Redis answers a PING, asked at most once per READY_CACHE_S (concurrent callers share one PING)."""
    now = time.monotonic()
    last: dict[str, Any] = request.app[PING]
    if last and now - last["at"] < READY_CACHE_S:
        return await asyncio.shield(last["answer"])
    fut = asyncio.ensure_future(_ping(streams(request)))
    last.update(at=now, answer=fut)
    return await asyncio.shield(fut)


async def _ping(d: StreamManager) -> bool:
    try:
        return bool(await d.redis.ping())
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False


async def health_ready(request: web.Request) -> web.Response:
    """Ready: started, Redis answers, every running pipeline's models loaded. A pipeline whose setup failed does
    not make the daemon unready (its streams are failed, the others run; /health and the streams say why)."""
    d = streams(request)
    redis_ok = await _redis_ok(request)
    models_ok = all(p.ready.is_set() for p in d.pipelines.values())
    details = {"started": d.started.is_set(), "redis": redis_ok, "models_loaded": models_ok,
               "failed_pipelines": dict(d.pipelines.errors)}
    if not (redis_ok and models_ok and d.started.is_set()):
        why = [w for w, ok in (("Redis unreachable", redis_ok), ("models loading", models_ok),
                               ("starting", d.started.is_set())) if not ok]
        raise ApiError(503, "not_ready", f"not ready: {', '.join(why)}", details, headers={"Retry-After": "1"})
    return json_response({"status": "ready", "redis": True, "models_loaded": True,
                              "failed_pipelines": details["failed_pipelines"]})


async def health(request: web.Request) -> web.Response:
    d = streams(request)
    st = d.status()
    states: dict[str, int] = {}
    for s in st["streams"].values():
        states[s["state"]] = states.get(s["state"], 0) + 1
    redis_ok = await _redis_ok(request)
    flushing = d.sink.catching_up
    return json_response({
        "status": "ok" if redis_ok and not flushing else "degraded",
        "redis": {**st["redis"], "reachable": redis_ok, "catching_up": flushing},
        "states": states,
        "streams": {sid: {k: s[k] for k in ("state", "reason", "fps_in", "fps_out", "last_frame_ts")}
                    for sid, s in st["streams"].items()},
        "pipelines": {**{n: {"ready": False, "error": e} for n, e in d.pipelines.errors.items()},
                      **{n: {"ready": p.ready.is_set(), "error": None} for n, p in d.pipelines.items()}},
    })


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

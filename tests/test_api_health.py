"""Health endpoints against a real daemon while its Redis is killed and restarted, and with a pipeline whose setup
fails. The Redis here is this test's own (like tests/test_redis_outage.py): the session Redis is never touched."""

import time

import aiohttp
import redis.asyncio as aioredis

from streamd.testing.servers import ManagedRedis
from conftest import OPER, READ, api_cfg, h, make_config, results, running, until


def _error_shape(body):
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    return body["error"]


async def test_live_never_needs_redis_ready_follows_it(tmp_path, clip):
    srv = ManagedRedis(tmp_path / "redis").start()
    cam = {"id": "cam", "url": str(clip), "playback": "realtime", "loop": True, "fps": 2.0}
    try:
        async with running(api_cfg(srv.url, [cam])) as d, aiohttp.ClientSession() as s:
            async def get(path, token=None):
                async with s.get(d.api_url + path, headers=h(token) if token else None) as resp:
                    return resp.status, await resp.json(), resp.headers

            status, body, _ = await get("/health/ready")
            assert status == 200 and body["status"] == "ready" and body["failed_pipelines"] == {}
            await until(lambda: d.sink.results_by_stream.get("cam", 0) >= 1, 20, what="a result before the outage")

            srv.stop(kill=True)  # SIGKILL: no goodbye
            t0 = time.monotonic()
            status, body, _ = await get("/health/live")
            assert status == 200 and body == {"status": "ok"} and time.monotonic() - t0 < 1.0
            async def unready():  # readiness is cached for READY_CACHE_S (1 s): a PING a second at most
                return (await get("/health/ready"))[0] == 503

            await until(unready, 3, what="/health/ready to say 503 within the cache's second")
            status, body, headers = await get("/health/ready")
            assert status == 503 and headers["Retry-After"] == "1"
            err = _error_shape(body)
            assert err["code"] == "not_ready" and "Redis unreachable" in err["message"]
            assert err["details"]["redis"] is False and err["details"]["models_loaded"] is True
            status, body, _ = await get("/health", READ)
            assert status == 200 and body["status"] == "degraded" and body["redis"]["reachable"] is False
            assert body["streams"]["cam"]["state"] == "live"  # the camera keeps running
            # state kept in Redis cannot be read or written: 503 in the error shape, never a 500
            status, body, headers = await get("/api/v1/prompts", READ)
            assert status == 503 and _error_shape(body)["code"] == "redis_unavailable" and "Retry-After" in headers
            async with s.post(d.api_url + "/api/v1/streams", headers=h(OPER),
                              json={"id": "new", "url": "redis:frames:new", "pipeline": "frame_info"}) as resp:
                assert resp.status == 503 and _error_shape(await resp.json())["code"] == "redis_unavailable"
            assert "new" not in d.streams.runners  # not kept, so not started either
            status, _, _ = await get("/health/live")
            assert status == 200

            srv.start()  # same port, same URL
            async def ready():
                return (await get("/health/ready"))[0] == 200

            await until(ready, 20, what="/health/ready to answer 200 again")
            r = aioredis.Redis.from_url(srv.url)
            try:
                n = len(await results(r, "cam"))
                await until(lambda: _more(r, "cam", n), 20, what="results after Redis came back")
            finally:
                await r.aclose()
    finally:
        srv.stop()


async def _more(r, sid, n):
    return len(await results(r, sid)) > n


async def test_a_pipeline_whose_setup_fails_fails_its_streams_not_readiness(r, redis_server, clip):
    """Decision: readiness means this daemon can serve (Redis answers, the running pipelines' models are loaded).
    A pipeline whose setup failed fails its own streams (with the reason) and shows in /health and in
    /health/ready's `failed_pipelines`; it does not take the daemon (and its control API) out of service."""
    api = api_cfg(redis_server.url).api.model_dump()
    broken = {"stages": [{"type": "vlm", "backend": "openai", "model": "m", "endpoints": []}]}
    streams = [{"id": "ok", "url": str(clip), "playback": "realtime", "loop": True, "fps": 2.0},
               {"id": "vlm", "url": str(clip), "playback": "realtime", "loop": True, "pipeline": "broken"}]
    async with running(make_config(redis_server.url, streams, api=api, pipelines={"broken": broken})) as d, \
            aiohttp.ClientSession() as s:
        await until(lambda: d.streams.runners["vlm"].state.value == "failed", 20, what="the stream of the broken pipeline")
        async with s.get(d.api_url + "/api/v1/streams/vlm", headers=h(READ)) as resp:
            info = await resp.json()
        assert "pipeline 'broken' failed" in info["reason"] and "needs endpoints" in info["reason"]
        async with s.get(d.api_url + "/health/ready") as resp:
            body = await resp.json()
            assert resp.status == 200 and "needs endpoints" in body["failed_pipelines"]["broken"]
        async with s.get(d.api_url + "/health", headers=h(READ)) as resp:
            health = await resp.json()
        assert health["pipelines"]["broken"]["ready"] is False and "needs endpoints" in \
            health["pipelines"]["broken"]["error"]
        assert health["pipelines"]["frame_info"] == {"ready": True, "error": None}
        await until(lambda: _more(r, "ok", 2), 20, what="the other stream's results")

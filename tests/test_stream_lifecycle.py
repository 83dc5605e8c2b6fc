"""Streams added and removed through the API: a removed stream leaves no metric series behind, and one stream's
slow change never holds up another's."""

import asyncio
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from streamd.testing.media import push_frames
from conftest import make_config, running, until

import numpy as np


def api(redis_url):
    return make_config(redis_url, [], api={"enabled": True, "port": 0, "rate_limit_per_s": 10_000,
                                           "rate_limit_burst": 10_000})


async def _series(s, url, sid):
    async with s.get(url + "/metrics") as resp:
        text = await resp.text()
    return [(f.name, x.labels) for f in text_string_to_metric_families(text) for x in f.samples
            if x.labels.get("stream") == sid]


async def test_a_deleted_stream_leaves_no_metric_series(r, redis_server):
    await push_frames(r, "frames:gone", [np.zeros((16, 16, 3), np.uint8)] * 3)
    async with running(api(redis_server.url)) as d, aiohttp.ClientSession() as s:
        body = {"id": "gone", "url": "redis:frames:gone", "pipeline": "frame_info"}
        async with s.post(d.api_url + "/api/v1/streams", json=body) as resp:
            assert resp.status == 201, await resp.text()
        await until(lambda: d.streams.runners["gone"].frames >= 3, 10, what="frames")
        before = await _series(s, d.api_url, "gone")
        async with s.delete(d.api_url + "/api/v1/streams/gone") as resp:
            assert resp.status == 204
        after = await _series(s, d.api_url, "gone")
    assert {n for n, _ in before} >= {"streamd_stream_state", "streamd_frames_sampled"}, before
    assert after == []


async def test_a_slow_delete_does_not_hold_up_another_streams_change(r, redis_server):
    """A Redis input blocked in a 5 s XREADGROUP takes up to that long to stop: adding another stream meanwhile
    answers at once (before: one API-wide lock, 7-10 s)."""
    async with running(api(redis_server.url)) as d, aiohttp.ClientSession() as s:
        body = {"id": "slow", "url": "redis:frames:slow", "pipeline": "frame_info",
                "redis_input": {"block_ms": 5000, "claim_idle_ms": 60_000}}
        async with s.post(d.api_url + "/api/v1/streams", json=body) as resp:
            assert resp.status == 201, await resp.text()
        await until(lambda: d.streams.runners["slow"].state.value == "connecting", 5, what="slow reading")
        await asyncio.sleep(0.5)  # inside its blocking read now
        done: dict[str, float] = {}

        async def call(name, method, path, **kw):
            async with s.request(method, d.api_url + path, **kw) as resp:
                done[name] = time.monotonic()
                return resp.status

        t0 = time.monotonic()
        delete = asyncio.create_task(call("delete", "DELETE", "/api/v1/streams/slow"))
        await asyncio.sleep(0.1)
        added = await call("add", "POST", "/api/v1/streams",
                           json={"id": "quick", "url": "redis:frames:quick", "pipeline": "frame_info"})
        assert await delete == 204 and added == 201
    print({k: round(v - t0, 2) for k, v in done.items()})
    assert done["add"] < done["delete"], done


async def test_a_flood_of_public_readiness_checks_sends_redis_about_one_ping_a_second(r, redis_server):
    async def pings():
        return (await r.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0)

    async with running(api(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async def ready():
            async with s.get(d.api_url + "/health/ready") as resp:
                return resp.status

        before = await pings()
        t0 = time.monotonic()
        statuses = []
        while time.monotonic() - t0 < 1.5:
            statuses += await asyncio.gather(*(ready() for _ in range(50)))
        sent = await pings() - before
    assert statuses == [200] * len(statuses) and len(statuses) >= 100
    assert sent <= 3, sent  # one per second (and a redis-py health check at most), not one per request

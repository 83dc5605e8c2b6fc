"""Redis killed and restarted mid-run: the daemon keeps running, buffers, publishes when Redis is back, and
never acknowledges an input entry without its result."""

import asyncio

import numpy as np
import redis.asyncio as aioredis

from streamd.testing.media import push_frames
from streamd.testing.servers import ManagedRedis
from conftest import at_least, events, make_config, results, running, until


async def test_redis_killed_and_restarted(tmp_path, clip):
    srv = ManagedRedis(tmp_path / "redis", durable=True).start()
    r = aioredis.Redis.from_url(srv.url)
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(40)]
    try:
        ids = await push_frames(r, "frames:o", imgs[:20])
        cfg = make_config(srv.url, [
            {"id": "cam", "url": str(clip), "playback": "realtime", "loop": True, "fps": 4.0},
            {"id": "o", "url": "redis:frames:o",
             "reconnect": {"initial_s": 0.1, "max_s": 0.5, "max_attempts": None},
             "redis_input": {"claim_idle_ms": 500}},
        ])
        async with running(cfg) as d:
            await until(lambda: at_least(r, "cam", 2), 20, what="results before the outage")
            srv.stop(kill=True)  # SIGKILL: no goodbye
            await until(lambda: not d.sink.healthy, 10, what="the sink to notice")
            await asyncio.sleep(2)
            assert d.streams.runners["cam"].state.value == "live"  # the camera kept running
            assert len(d.sink) > 0  # and its records are buffered
            srv.start()
            await r.aclose()
            r = aioredis.Redis.from_url(srv.url)
            ids += await push_frames(r, "frames:o", imgs[20:])
            await until(lambda: d.sink.healthy and len(d.sink) == 0, 20, what="the buffer flushed")
            await until(lambda: _all_acked(r, "frames:o", ids), 30, what="every entry acknowledged")
            cam_after = len(await results(r, "cam"))
            await asyncio.sleep(1)
            assert len(await results(r, "cam")) > cam_after
        recs = await results(r, "o")
        with_result = {x["input"]["entry_id"] for x in recs}
        assert set(ids) <= with_result  # no acknowledged input without a result
        cam = await results(r, "cam")
        seqs = [x["seq"] for x in cam]
        assert seqs == sorted(seqs)
        # frames captured during the outage were published after it (buffered, not lost)
        outage = [x for x in cam if x["publish_ts"] - x["capture_ts"] > 1.0]
        assert outage, "records buffered during the outage were published later"
    finally:
        await r.aclose()
        srv.stop()


async def _all_acked(r, key, ids):
    info = await r.xpending(key, "streamd")
    if info["pending"]:
        return False
    groups = await r.xinfo_groups(key)
    last = groups[0]["last-delivered-id"].decode()
    return last == ids[-1]


async def test_a_full_outage_buffer_drops_results_first_and_says_so(tmp_path, clip):
    """A buffer of 30 records and a camera at 10 results/s through a 4 s outage: results overflow; the state events
    of a stream reconnecting meanwhile are kept (their reserved share), and once Redis is back each stream that
    lost records gets a `records_dropped` event saying how many."""
    srv = ManagedRedis(tmp_path / "redis", durable=True).start()
    r = aioredis.Redis.from_url(srv.url)
    try:
        cfg = make_config(srv.url, [
            {"id": "cam", "url": str(clip), "playback": "realtime", "loop": True, "fps": 10.0},
            {"id": "o", "url": "redis:frames:ov", "reconnect": {"initial_s": 0.5, "max_s": 1.0, "max_attempts": None}},
        ], redis={"url": srv.url, "buffer_max_records": 30, "events_reserved": 0.5})
        async with running(cfg) as d:
            await until(lambda: at_least(r, "cam", 2), 20, what="results before the outage")
            srv.stop(kill=True)
            await until(lambda: not d.sink.healthy, 10, what="the sink to notice")
            t_down = __import__("time").time()
            await until(lambda: d.sink.overflowed > 20, 20, what="the buffer to overflow")
            assert d.sink.catching_up
            srv.start()
            await r.aclose()
            r = aioredis.Redis.from_url(srv.url)
            await until(lambda: d.sink.healthy and len(d.sink) == 0, 20, what="the buffer flushed")
            assert not d.sink.catching_up
            await until(lambda: events(r, "cam", "records_dropped"), 10, what="records_dropped for cam")
            dropped = await events(r, "cam", "records_dropped")
            o_states = [e for e in await events(r, "o", "state") if e["ts"] > t_down]
            lost_o = await events(r, "o", "records_dropped")
    finally:
        await r.aclose()
        srv.stop()
    assert dropped[0]["results"] > 0 and "buffer_max_records=30" in dropped[0]["reason"]
    assert sum(e["results"] for e in dropped) + sum(e["results"] + e["events"] for e in lost_o) == d.sink.overflowed
    # the Redis input went to backoff during the outage: those state events reached Redis after it
    assert any(e["to"] == "backoff" for e in o_states), o_states
    # the input has no results: its state events all fitted in the events' reserved share, none was dropped
    assert lost_o == [], lost_o


async def test_concurrent_api_calls_and_a_redis_restart_meet_no_dead_or_missing_connection(tmp_path):
    """300 concurrent prompt reads (more than a pool of 100) all answer; after Redis is killed and restarted, the
    pooled connections are stale, and 60 concurrent reads still all answer (a command retried once on a new
    connection), and a new Redis input goes live without a backoff."""
    import aiohttp

    srv = ManagedRedis(tmp_path / "redis", durable=True).start()
    r = aioredis.Redis.from_url(srv.url)
    cfg = make_config(srv.url, [], api={"enabled": True, "port": 0, "rate_limit_per_s": 10_000,
                                        "rate_limit_burst": 10_000})
    try:
        async with running(cfg) as d, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async def get(path):
                async with s.get(d.api_url + path) as resp:
                    return resp.status

            first = await asyncio.gather(*(get("/api/v1/prompts") for _ in range(300)))
            assert first == [200] * 300, sorted(set(first))
            srv.stop(kill=True)
            srv.start()
            await until(lambda: _ready(get), 20, what="ready again")
            again = await asyncio.gather(*(get("/api/v1/prompts") for _ in range(60)))
            assert again == [200] * 60, sorted(set(again))
            await r.aclose()
            r = aioredis.Redis.from_url(srv.url)
            await push_frames(r, "frames:after", [np.zeros((16, 16, 3), np.uint8)])
            from streamd.config import StreamConfig
            d.streams.add_stream(StreamConfig(id="after", url="redis:frames:after", pipeline="frame_info"))
            await until(lambda: at_least(r, "after", 1), 10, what="a result from the new input")
            after = [e["to"] for e in await events(r, "after", "state")]
    finally:
        await r.aclose()
        srv.stop()
    assert "backoff" not in after, after


async def _ready(get):
    return await get("/health/ready") == 200

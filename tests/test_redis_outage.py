"""Redis killed and restarted mid-run: the daemon keeps running, buffers, publishes when Redis is back, and
never acknowledges an input entry without its result."""

import asyncio

import numpy as np
import redis.asyncio as aioredis

from streamd.testing import ManagedRedis, push_frames
from conftest import make_config, results, running, until


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
            await until(lambda: _count(r, "cam", 2), 20, what="results before the outage")
            srv.stop(kill=True)  # SIGKILL: no goodbye
            await until(lambda: not d.sink.healthy, 10, what="the sink to notice")
            await asyncio.sleep(2)
            assert d.runners["cam"].state.value == "live"  # the camera kept running
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


async def _count(r, sid, n):
    return len(await results(r, sid)) >= n


async def _all_acked(r, key, ids):
    info = await r.xpending(key, "streamd")
    if info["pending"]:
        return False
    groups = await r.xinfo_groups(key)
    last = groups[0]["last-delivered-id"].decode()
    return last == ids[-1]

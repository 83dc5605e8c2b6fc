"""Fleet edge cases (real redis-server, real daemons in-process): daemons whose config files differ, a DELETE of a
config-file stream, a graceful stop's hand-over, a Redis outage longer than the lease TTL, two daemons with one
member id."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from conftest import make_config, results
from streamd import keys
from streamd.fleet import preferred
from streamd.keys import API_STREAMS_KEY, FLEET_MEMBERS_KEY
from streamd.testing.daemon import running


def fleet(**kw):
    return {"enabled": True, "lease_ttl_s": 3, "renew_s": 0.5, "settle_s": 1, **kw}


async def clean(r: aioredis.Redis, *sids: str) -> None:
    await r.delete(API_STREAMS_KEY, FLEET_MEMBERS_KEY)
    for sid in sids:
        await r.delete(keys.results_key(sid), keys.events_key(sid), keys.lease_key(sid), keys.lease_last_key(sid))


async def test_a_stream_only_one_daemon_wants_stays_on_it(redis_server, clip):
    """x's config file has no stream, y's has one that rendezvous hashing over {x, y} gives to x: y runs it all
    along (it is never handed to x, which would not run it), and its results keep coming."""
    sid = next(f"only-y-{i}" for i in range(100) if preferred(f"only-y-{i}", {"x": 1000.0, "y": 1000.0}) == "x")
    r = aioredis.Redis.from_url(redis_server.url)
    await clean(r, sid)
    stream = {"id": sid, "url": str(clip), "fps": 2, "loop": True, "playback": "realtime"}
    try:
        async with running(make_config(redis_server.url, [], fleet=fleet(member_id="x"))) as dx, \
                running(make_config(redis_server.url, [stream], fleet=fleet(member_id="y"))) as dy:
            t0 = time.monotonic()
            seen = set()
            while time.monotonic() - t0 < 9:  # three lease TTLs
                seen |= {"x"} if sid in dx.streams.runners else set()
                seen |= {"y"} if sid in dy.streams.runners else set()
                await asyncio.sleep(0.1)
            assert sid in dy.streams.runners and sid not in dx.streams.runners, seen
            assert "x" not in seen
            assert dy.streams.fleet.fleet.owns(sid)
        recs = await results(r, sid)
        assert len(recs) >= 8 and {q["daemon"] for q in recs} <= {dy.streams.fleet.member_id}, len(recs)
        changed = [e for e in await _events(r, sid) if e.get("reason_code") == "owner_changed"]
        assert changed == []
    finally:
        await r.aclose()


async def _events(r, sid):
    import json

    return [json.loads(f[b"event"]) for _, f in await r.xrange(keys.events_key(sid))]

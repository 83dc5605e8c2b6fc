"""Guards of the fleet's placement and of the API changes that reach it (real redis-server, real daemons in-process):
placements at once never take more streams than fleet.max_streams; a lease taken while the daemon found it must
stand aside is given back; a POST never takes over a stream another daemon's config file names while nobody runs
it; a daemon standing aside changes no stream; two syncs at once each see this daemon's API changes; a stream
another daemon's API added is known as an API stream before this daemon's sync reads it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import redis.asyncio as aioredis

from conftest import READ, api_call, api_cfg, fleet_clean, until
from streamd import keys
from streamd.config import StreamConfig
from streamd.fleet import preferred
from streamd.keys import API_STREAMS_KEY
from streamd.streams.store import StreamExists
from streamd.testing.daemon import running

CAM = {"url": "rtsp://127.0.0.1:9/cam", "pipeline": "frame_info", "reconnect": {"max_attempts": None}}
SLOW = {"lease_ttl_s": 60, "renew_s": 30}  # no tick, heartbeat or sync of its own during a test


def fleet_cfg(redis_url, name, streams=(), **fleet):
    c = api_cfg(redis_url, streams)
    return c.model_copy(update={"fleet": c.fleet.model_copy(update={
        "enabled": True, "member_id": name, "lease_ttl_s": 3, "renew_s": 0.5, "settle_s": 1, **fleet})})






async def test_placements_at_once_keep_to_max_streams(redis_server):
    """Four placements at once (API requests, or one beside the tick's) on a daemon with fleet.max_streams=1 take
    one lease (old code: each checked the count before its first await, and all four were taken)."""
    sids = [f"cap-{i}" for i in range(4)]
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, *sids, members=("same", "x", "y", "solo"))
    try:
        async with running(fleet_cfg(redis_server.url, "solo", [{"id": sid, **CAM} for sid in sids],
                                     max_streams=1, **SLOW)) as d:
            f = d.streams.fleet.fleet
            assert f.wanted == set(sids) and not f.leases  # wanted, not placed yet (the first tick is 30 s away)
            await asyncio.gather(*(f.place(sid) for sid in sids))
            held = [sid for sid in sids if await r.get(keys.lease_key(sid))]
            assert len(f.leases) == 1 and held == sorted(f.leases), (sorted(f.leases), held)
            assert f._taking == 0
            await f.tick()  # the tick's placement keeps to it too
            assert len(f.leases) == 1
    finally:
        await fleet_clean(r, *sids, members=("same", "x", "y", "solo"))
        await r.aclose()


async def test_a_lease_taken_while_the_daemon_turns_to_stand_aside_is_given_back(redis_server):
    """A placement under way when the daemon finds another running daemon with its fleet.member_id (its heartbeat
    sets `duplicate` and releases the leases it holds) gives the lease it takes back, and starts nothing (old code:
    it kept it, a lease nobody renews or releases)."""
    sid = "aside-take"
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, sid, members=("same", "x", "y", "solo"))
    try:
        async with running(fleet_cfg(redis_server.url, "solo", [{"id": sid, **CAM}], **SLOW)) as d:
            f = d.streams.fleet.fleet
            task = asyncio.create_task(f.place(sid))
            await asyncio.sleep(0)  # past place()'s own checks, waiting for Redis
            f.duplicate = "another-instance"  # what the heartbeat sets when it finds the other daemon
            try:
                await task
                assert not f.leases and sid not in d.streams.runners
                assert await r.get(keys.lease_key(sid)) is None
            finally:
                f.duplicate = None
    finally:
        await fleet_clean(r, sid, members=("same", "x", "y", "solo"))
        await r.aclose()


async def test_a_post_does_not_take_over_a_config_stream_nobody_runs(redis_server):
    """x's config file names two streams and x runs one (max_streams=1): a POST through y of the other's id answers
    409 stream_exists naming x (old code: 201, and the API client's URL replaced x's stream), and so does the
    re-check under the stream's lock."""
    sids = ["cfg-a", "cfg-b"]
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, *sids, members=("same", "x", "y", "solo"))
    try:
        async with running(fleet_cfg(redis_server.url, "x", [{"id": sid, **CAM} for sid in sids], max_streams=1)) \
                as dx, running(fleet_cfg(redis_server.url, "y")) as dy, aiohttp.ClientSession() as s:
            await until(lambda: len(dx.streams.runners) == 1, 15, what="x runs one of its two")
            idle = next(sid for sid in sids if sid not in dx.streams.runners)
            fy = dy.streams.fleet.fleet
            await until(lambda: idle in (fy.members.get("x") or {}).get("wants", []), 10, what="y read x's heartbeat")
            status, body = await api_call(s, dy.api_url, "POST", "/streams",
                                       json={"id": idle, **CAM, "url": "rtsp://127.0.0.1:9/other"})
            assert status == 409 and body["error"]["code"] == "stream_exists", (status, body)
            assert body["error"]["details"]["members"] == ["x"]
            with pytest.raises(StreamExists):
                await dy.streams.api_put_stream(StreamConfig.model_validate({"id": idle, **CAM}))
            assert await r.hget(API_STREAMS_KEY, idle) is None
            assert dx.streams.fleet.cfgs[idle][1] == "config"
    finally:
        await fleet_clean(r, *sids, members=("same", "x", "y", "solo"))
        await r.aclose()


async def test_a_daemon_standing_aside_changes_no_stream(redis_server):
    """Through a daemon standing aside (another running daemon has its fleet.member_id) a DELETE, PATCH or POST
    answers 409 standing_aside; the stream goes on and its end record stays (old code: the DELETE answered 204,
    deleted nothing and wiped the shared end record)."""
    sid = "aside-del"
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, sid, "aside-new", members=("same", "x", "y", "solo"))
    cfg = fleet_cfg(redis_server.url, "same", [{"id": sid, **CAM}])
    try:
        async with running(cfg) as first, aiohttp.ClientSession() as s:
            await until(lambda: sid in first.streams.runners, 15, what="the first daemon runs it")
            async with running(cfg) as second:
                await until(lambda: second.streams.fleet.fleet.duplicate is not None, 10, what="standing aside")
                end = json.dumps({"state": "stopped", "config": "some-other-settings"})
                await r.set(keys.stream_ended_key(sid), end)
                for method, path, kw in (("DELETE", f"/streams/{sid}", {}),
                                         ("PATCH", f"/streams/{sid}", {"json": {"fps": 3}}),
                                         ("POST", "/streams", {"json": {"id": "aside-new", **CAM}})):
                    status, body = await api_call(s, second.api_url, method, path, **kw)
                    assert status == 409 and body["error"]["code"] == "standing_aside", (method, status, body)
                    assert body["error"]["details"]["member_id"] == "same"
                assert (await r.get(keys.stream_ended_key(sid))).decode() == end
                assert await r.hget(API_STREAMS_KEY, "aside-new") is None
                assert sid in first.streams.runners and first.streams.fleet.fleet.owns(sid)
                status, body = await api_call(s, second.api_url, "GET", f"/streams/{sid}", READ)
                assert status == 200 and body["owner"] == "same"
    finally:
        await fleet_clean(r, sid, "aside-new", members=("same", "x", "y", "solo"))
        await r.aclose()


async def test_two_syncs_at_once_each_see_this_daemons_changes(redis_server):
    """A sync under way while another sync ends still learns of a change made through this daemon's API meanwhile
    (old code: the other sync removed this one's set of changed streams, equal to its own, from the list)."""
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, members=("same", "x", "y", "solo"))
    try:
        async with running(fleet_cfg(redis_server.url, "solo", **SLOW)) as d:
            fs = d.streams.fleet
            real, gate, seen = fs._sync, asyncio.Event(), []

            async def held_first(touched):  # the first sync waits (as on a slow Redis) until the gate opens
                seen.append(touched)
                if len(seen) == 1:
                    await gate.wait()
                await real(touched)

            fs._sync = held_first
            first = asyncio.create_task(fs.sync())
            await asyncio.sleep(0)
            await fs.sync()  # the second sync runs through while the first is under way
            async with fs.local_change("changed-meanwhile"):
                pass
            gate.set()
            await first
            assert "changed-meanwhile" in seen[0]
            assert fs._syncs == []
    finally:
        await fleet_clean(r, members=("same", "x", "y", "solo"))
        await r.aclose()


async def test_an_api_stream_not_synced_yet_is_known_as_an_api_stream(redis_server):
    """y has read x's heartbeat, not yet the stored streams, when x runs a stream x's API added: y's GET says
    `source: api` and a DELETE through y deletes it (old code: `source: config`, and 409 stream_in_config "is in the
    config file of x")."""
    capacity = 1000.0  # fleet.max_streams unset
    sid = next(f"unsynced-{i}" for i in range(100)
               if preferred(f"unsynced-{i}", {"x": capacity, "y": capacity}) == "x")
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, sid, members=("same", "x", "y", "solo"))
    try:
        async with running(fleet_cfg(redis_server.url, "x")) as dx, \
                running(fleet_cfg(redis_server.url, "y", **SLOW)) as dy, aiohttp.ClientSession() as s:
            fy = dy.streams.fleet.fleet
            await until(lambda: "y" in dx.streams.fleet.fleet.members, 10, what="x read y's heartbeat")
            status, _ = await api_call(s, dx.api_url, "POST", "/streams", json={"id": sid, **CAM})
            assert status == 201 and sid in dx.streams.runners

            async def heartbeat_names_it() -> bool:
                raw = await r.get(keys.fleet_member_key("x"))
                return raw is not None and sid in json.loads(raw)["load"]["streams"]
            for _ in range(100):
                if await heartbeat_names_it():
                    break
                await asyncio.sleep(0.05)
            await fy.tick()  # y reads x's heartbeat; its sync (every 30 s) has not read the stream
            assert sid not in dy.streams.fleet.cfgs
            status, body = await api_call(s, dy.api_url, "GET", f"/streams/{sid}", READ)
            assert status == 200 and body["source"] == "api" and body["owner"] == "x", body
            status, body = await api_call(s, dy.api_url, "DELETE", f"/streams/{sid}")
            assert status == 204, body
            assert await r.hget(API_STREAMS_KEY, sid) is None
            await until(lambda: sid not in dx.streams.runners, 10, what="x stopped it")
    finally:
        await fleet_clean(r, sid, members=("same", "x", "y", "solo"))
        await r.aclose()

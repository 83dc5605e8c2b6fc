"""The fleet as each daemon's API shows and changes it (real redis-server, real daemons in-process): a daemon standing
aside still shows the fleet; a stream only another daemon's config file names is answered from the fleet, not 404;
an API change does not wait for a tick under way; a sync does not undo a change made through this daemon meanwhile."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from conftest import READ, api_call, api_cfg, fleet_clean, h, until
from streamd import keys
from streamd.testing.daemon import running

CAM = {"url": "rtsp://127.0.0.1:9/cam", "pipeline": "frame_info", "reconnect": {"max_attempts": None}}


def fleet_cfg(redis_url, name, streams=(), **fleet):
    c = api_cfg(redis_url, streams)
    return c.model_copy(update={"fleet": c.fleet.model_copy(update={
        "enabled": True, "member_id": name, "lease_ttl_s": 3, "renew_s": 0.5, "settle_s": 1, **fleet})})






async def test_a_daemon_standing_aside_shows_the_fleet_and_says_why(redis_server):
    """A second daemon with a live daemon's fleet.member_id stands aside (takes no stream); its GET /api/v1/cluster
    still lists the fleet as Redis has it (the member of that id, the first daemon, with its streams) and says it
    stands aside and why; its GET /api/v1/streams/{id} names the owner (old code: no member at all)."""
    sids = ["aside-0", "aside-1"]
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, *sids)
    cfg = fleet_cfg(redis_server.url, "same", [{"id": sid, **CAM} for sid in sids])
    try:
        async with running(cfg) as first, aiohttp.ClientSession() as s:
            await until(lambda: set(first.streams.runners) == set(sids), 15, what="the first daemon runs both")
            async with running(cfg) as second:
                await until(lambda: second.streams.fleet.fleet.duplicate is not None, 10, what="standing aside")

                async def shown():
                    st, body = await api_call(s, second.api_url, "GET", "/cluster", READ)
                    assert st == 200, body
                    return body if [(m["id"], m["streams"]) for m in body["members"]] == [("same", sids)] else None

                body = await until(shown, 5, what="the fleet in the standing-aside daemon's /cluster")
                assert body["self"] == "same" and body["standing_aside"] is True, body
                assert "fleet.member_id" in body["standing_aside_reason"], body
                assert body["instance"] == second.streams.fleet.fleet.instance
                st, mine = await api_call(s, first.api_url, "GET", "/cluster", READ)
                assert mine["standing_aside"] is False and mine["standing_aside_reason"] is None, mine
                st, info = await api_call(s, second.api_url, "GET", f"/streams/{sids[0]}", READ)
                assert st == 200 and info["owner"] == "same", info
                assert second.streams.runners == {}
    finally:
        await fleet_clean(r, *sids)
        await r.aclose()


async def test_a_stream_only_another_daemons_config_names_is_answered_from_the_fleet(redis_server, clip):
    """x's config file has a stream, y's has none: y's API answers GET /streams/{id} from x's heartbeat (owner,
    state, rate; no ETag: y does not know its configuration), lists it, and reads its results and events from Redis
    (old code: 404 for each). A change through y is refused (409 stream_in_config: x's file names it), a POST of
    that id too (409 stream_exists); an id nobody runs is still 404."""
    sid = "only-in-x"
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, sid)
    stream = {"id": sid, "url": str(clip), "fps": 2, "loop": True, "playback": "realtime", "pipeline": "frame_info"}
    try:
        async with running(fleet_cfg(redis_server.url, "x", [stream])) as dx, \
                running(fleet_cfg(redis_server.url, "y")) as dy, aiohttp.ClientSession() as s:
            await until(lambda: dx.streams.runners.get(sid) is not None
                        and dx.streams.runners[sid].state.value == "live", 15, what="x runs it")

            async def answered():
                st, body = await api_call(s, dy.api_url, "GET", f"/streams/{sid}", READ)
                return body if st == 200 and body["state"] == "live" else None

            info = await until(answered, 5, what="y answers from x's heartbeat")
            assert info["owner"] == "x" and info["source"] == "config" and info["pipeline"] == "frame_info", info
            assert info["fps"] == 2 and info["url"], info
            async with s.get(dy.api_url + f"/api/v1/streams/{sid}", headers=h(READ)) as resp:
                assert "ETag" not in resp.headers
            st, listed = await api_call(s, dy.api_url, "GET", "/streams", READ)
            assert [x["id"] for x in listed["streams"]] == [sid], listed

            async def read(kind):
                st, body = await api_call(s, dy.api_url, "GET", f"/streams/{sid}/{kind}", READ)
                assert st == 200, body
                return body["entries"] or None

            recs = await until(lambda: read("results"), 10, what="its results through y")
            assert recs[0]["record"]["daemon"] == "x"
            assert await read("events")
            st, body = await api_call(s, dy.api_url, "PATCH", f"/streams/{sid}", json={"fps": 1})
            assert st == 409 and body["error"]["code"] == "stream_in_config", body
            assert body["error"]["details"]["members"] == ["x"], body
            st, body = await api_call(s, dy.api_url, "DELETE", f"/streams/{sid}")
            assert st == 409 and body["error"]["code"] == "stream_in_config", body
            st, body = await api_call(s, dy.api_url, "POST", "/streams", json={"id": sid, **CAM})
            assert st == 409 and body["error"]["code"] == "stream_exists", body
            st, body = await api_call(s, dy.api_url, "GET", "/streams/nobody-runs-it", READ)
            assert st == 404, body
            assert sid not in dy.streams.runners and dx.streams.runners[sid].cfg.fps == 2
    finally:
        await fleet_clean(r, sid)
        await r.aclose()


async def test_an_api_change_does_not_wait_for_a_tick_under_way(redis_server):
    """The fleet's tick is held while it starts a stream whose lease it took (its last seq read from Redis never
    answers until the test says so). Meanwhile a POST, a PATCH and a DELETE of another stream through the same
    daemon are answered (the POSTed stream placed here at once): they do not wait for that tick (old code: the
    POST waited for the tick lock until the held stream was let go). Then the held stream starts."""
    held_sid, other = "held-cam", "quick-cam"
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, held_sid, other)
    order: list[str] = []
    held, gate = asyncio.Event(), asyncio.Event()
    try:
        async with running(fleet_cfg(redis_server.url, "solo", [{"id": held_sid, **CAM}])) as d, \
                aiohttp.ClientSession() as s:
            fs = d.streams.fleet

            async def hold(stream_id, orig=fs._last_seq):
                if stream_id == held_sid:
                    held.set()
                    await gate.wait()
                return await orig(stream_id)

            fs._last_seq = hold
            try:
                await asyncio.wait_for(held.wait(), 10)  # the tick took the lease and waits
                st, body = await asyncio.wait_for(api_call(s, d.api_url, "POST", "/streams",
                                                        json={"id": other, **CAM}), 10)
                assert st == 201 and body["owner"] == "solo", body
                order.append("post")
                st, body = await asyncio.wait_for(api_call(s, d.api_url, "PATCH", f"/streams/{other}",
                                                        json={"fps": 3}), 10)
                assert st == 200 and d.streams.runners[other].cfg.fps == 3, body
                order.append("patch")
                st, _ = await asyncio.wait_for(api_call(s, d.api_url, "DELETE", f"/streams/{other}"), 10)
                assert st == 204 and other not in d.streams.runners
                order.append("delete")
                assert held_sid not in d.streams.runners  # the tick is still held
            finally:
                order.append("let go")
                gate.set()
            await until(lambda: held_sid in d.streams.runners, 10, what="the held stream started")
            assert order == ["post", "patch", "delete", "let go"], order
            assert await r.get(keys.lease_key(other)) is None
    finally:
        await fleet_clean(r, held_sid, other)
        await r.aclose()


async def test_a_sync_does_not_undo_a_change_made_through_this_daemon_meanwhile(redis_server):
    """The periodic sync read the stored API streams; before it compares, a stream is POSTed, another DELETEd and a
    third PATCHed through this daemon. The sync leaves the three as this daemon's API left them (old code: it
    withdrew the POSTed stream, offered the DELETEd one again and put the PATCHed one back to its old settings,
    each for a renew interval, restarting streams)."""
    added, deleted, patched = "sync-added", "sync-deleted", "sync-patched"
    r = aioredis.Redis.from_url(redis_server.url)
    await fleet_clean(r, added, deleted, patched)
    held, gate, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    try:
        async with running(fleet_cfg(redis_server.url, "solo")) as d, aiohttp.ClientSession() as s:
            fs = d.streams.fleet
            for sid in (deleted, patched):
                st, body = await api_call(s, d.api_url, "POST", "/streams", json={"id": sid, **CAM})
                assert st == 201, body

            async def load(orig=d.streams.store.load):
                got = await orig()
                if not held.is_set():  # the first sync from now on: its read is done, it waits before comparing
                    held.set()
                    await gate.wait()
                return got

            async def sync(orig=fs.sync):
                await orig()
                if gate.is_set():
                    done.set()

            d.streams.store.load, fs.sync = load, sync
            try:
                await asyncio.wait_for(held.wait(), 10)
                st, body = await api_call(s, d.api_url, "POST", "/streams", json={"id": added, **CAM})
                assert st == 201, body
                st, _ = await api_call(s, d.api_url, "DELETE", f"/streams/{deleted}")
                assert st == 204
                st, body = await api_call(s, d.api_url, "PATCH", f"/streams/{patched}", json={"fps": 3})
                assert st == 200, body
                runners = {sid: d.streams.runners.get(sid) for sid in (added, patched)}
                assert all(runners.values()) and deleted not in d.streams.runners, runners
            finally:
                gate.set()
            await asyncio.wait_for(done.wait(), 10)  # the held sync is through
            undone = [what for what, ok in [
                ("the POSTed stream withdrawn", added in fs.cfgs and d.streams.runners.get(added) is runners[added]),
                ("the DELETEd stream offered again", deleted not in fs.cfgs and deleted not in d.streams.runners),
                ("the PATCHed stream put back", patched in fs.cfgs and fs.cfgs[patched][0].fps == 3
                 and d.streams.runners.get(patched) is runners[patched])] if not ok]
            assert undone == [], undone
            await asyncio.sleep(1)  # later syncs (the stored streams now as the API left them) change nothing
            assert d.streams.runners.get(added) is runners[added] and d.streams.runners.get(patched) is runners[patched]
            assert deleted not in d.streams.runners and await r.get(keys.lease_key(deleted)) is None
    finally:
        await fleet_clean(r, added, deleted, patched)
        await r.aclose()

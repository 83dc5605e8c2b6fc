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


async def test_delete_of_a_config_file_stream_is_refused_in_fleet_mode(redis_server, clip):
    """Two daemons, one config file with a stream: DELETE through its owner is refused (409 stream_in_config: the
    other daemon's file names it, it would take the stream over); the stream keeps running on exactly one daemon,
    and its owner keeps publishing."""
    import aiohttp

    from conftest import OPER, api_cfg, h

    sid = "cfgcam"
    r = aioredis.Redis.from_url(redis_server.url)
    await clean(r, sid)
    stream = {"id": sid, "url": str(clip), "fps": 2, "loop": True, "playback": "realtime", "pipeline": "frame_info"}

    def cfg(name):
        c = api_cfg(redis_server.url, [stream])
        return c.model_copy(update={"fleet": c.fleet.model_copy(update=fleet(member_id=name))})

    try:
        async with running(cfg("x")) as dx, running(cfg("y")) as dy, aiohttp.ClientSession() as s:
            ds = {"x": dx, "y": dy}

            def where():
                return [n for n, d in ds.items() if sid in d.streams.runners]

            t0 = time.monotonic()
            while len(where()) != 1 and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.1)
            owner = where()[0]
            async with s.delete(ds[owner].api_url + f"/api/v1/streams/{sid}", headers=h(OPER)) as resp:
                status, body = resp.status, (await resp.json() if resp.status != 204 else None)
            assert status == 409 and body["error"]["code"] == "stream_in_config", (status, body)
            assert body["error"]["details"]["members"] == [n for n in ds if n != owner], body
            t_del = time.time()
            await asyncio.sleep(4)  # past a lease TTL
            assert where() == [owner]
        late = [q for q in await results(r, sid) if q["publish_ts"] > t_del + 1]
        assert late and {q["daemon"] for q in late} == {owner}
    finally:
        await r.aclose()


async def test_a_daemon_stopping_does_not_take_its_streams_back_while_it_drains(redis_server, clip):
    """x owns a looping file and a camera whose open hangs (so x's graceful stop takes seconds); lease TTL 20 s. Once
    x begins to stop, y runs the file within a few renew intervals: x released it and takes nothing back while it
    drains (the old code's fleet loop went on: x took the file back and held it until the lease expired)."""
    import contextlib

    cands = [f"ho-{i}" for i in range(200) if preferred(f"ho-{i}", {"x": 1000.0, "y": 1000.0}) == "x"]
    cam, slow = cands[0], cands[1]
    r = aioredis.Redis.from_url(redis_server.url)
    await clean(r, cam, slow)

    async def hold(reader, writer):
        await asyncio.sleep(60)

    tcp = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    streams = [{"id": cam, "url": str(clip), "fps": 2, "loop": True, "playback": "realtime"},
               {"id": slow, "url": f"rtsp://127.0.0.1:{port}/x", "open_timeout_s": 8}]

    def cfg(name):
        return make_config(redis_server.url, streams, fleet=fleet(member_id=name, lease_ttl_s=20, settle_s=0))

    try:
        async with running(cfg("y")) as dy:
            stack = contextlib.AsyncExitStack()
            dx = await stack.enter_async_context(running(cfg("x")))
            try:
                t0 = time.monotonic()
                while not ({cam, slow} <= set(dx.streams.runners) and cam not in dy.streams.runners):
                    assert time.monotonic() - t0 < 15, (sorted(dx.streams.runners), sorted(dy.streams.runners))
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1)
            except BaseException:
                await stack.aclose()
                raise
            stopping = asyncio.create_task(stack.aclose())  # x stops gracefully
            t_stop = time.monotonic()
            while cam not in dy.streams.runners and time.monotonic() - t_stop < 10:
                await asyncio.sleep(0.05)
            took = time.monotonic() - t_stop
            await stopping
            assert cam in dy.streams.runners, f"y does not run {cam} {took:.1f} s after x began to stop"
    finally:
        tcp.close()
        await r.aclose()


async def test_results_buffered_during_a_redis_outage_past_the_lease_ttl_are_published(tmp_path, clip):
    """One fleet daemon, lease TTL 3 s; its redis-server (durable) is down 5 s. Nobody else took its stream, so it
    takes its lease again and publishes the results sampled during the outage (the old code lost the lease on the
    missing key and its fenced writes refused them all)."""
    from streamd.testing.servers import ManagedRedis

    srv = ManagedRedis(tmp_path / "redis", durable=True).start()
    sid = "outage-cam"
    stream = {"id": sid, "url": str(clip), "fps": 2, "loop": True, "playback": "realtime"}
    try:
        async with running(make_config(srv.url, [stream], fleet=fleet(member_id="x"))) as d:
            t0 = time.monotonic()
            while not (sid in d.streams.runners and d.streams.runners[sid].state.value == "live"):
                assert time.monotonic() - t0 < 15
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)
            srv.stop()
            t_down = time.time()
            await asyncio.sleep(5)
            srv.start()
            t_up = time.time()
            await asyncio.sleep(6)
            fenced, owns = d.sink.fenced, d.streams.fleet.fleet.owns(sid)
        r = aioredis.Redis.from_url(srv.url)
        try:
            recs = await results(r, sid)
        finally:
            await r.aclose()
        during = [q for q in recs if t_down + 0.5 < q["capture_ts"] < t_up - 0.5]
        seqs = [q["seq"] for q in recs]
        assert len(during) >= 4, (len(during), len(recs), fenced)
        assert fenced == 0 and owns
        assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    finally:
        srv.stop()


async def test_a_second_daemon_with_the_same_member_id_stands_aside(redis_server, clip):
    """Two daemons given one fleet.member_id: the one that comes second sees the first's member record (another
    process's instance), logs an error and takes no stream while the first runs; its stop leaves the first's
    member record alone."""
    import json

    sids = [f"same-{i}" for i in range(3)]
    r = aioredis.Redis.from_url(redis_server.url)
    await clean(r, *sids)
    streams = [{"id": s, "url": str(clip), "fps": 2, "loop": True, "playback": "realtime"} for s in sids]
    cfg = make_config(redis_server.url, streams, fleet=fleet(member_id="same"))
    try:
        async with running(cfg) as first:
            t0 = time.monotonic()
            while set(first.streams.runners) != set(sids):
                assert time.monotonic() - t0 < 15, sorted(first.streams.runners)
                await asyncio.sleep(0.1)
            async with running(cfg) as second:
                ran = set()
                t0 = time.monotonic()
                while time.monotonic() - t0 < 5:
                    ran |= set(second.streams.runners)
                    await asyncio.sleep(0.1)
                assert ran == set() and set(first.streams.runners) == set(sids), ran
                assert second.streams.fleet.fleet.duplicate == first.streams.fleet.fleet.instance
            rec = json.loads(await r.get(keys.fleet_member_key("same")))
            assert rec["instance"] == first.streams.fleet.fleet.instance
            assert set(first.streams.runners) == set(sids)
    finally:
        await r.aclose()


async def test_a_released_lease_is_never_taken_again_by_its_old_token(redis_server):
    """The 'lease key missing' allowance (an outage past the TTL) is for the lease term that was running, not for
    the member: after this daemon released a stream (deleted, changed, handed over), a result still buffered with
    the released token is refused and a renewal under way does not take the key again (old code: both did, since
    `:lease:last` named the member: results after a DELETE's 204, a lease held by nobody for a TTL). A refused
    write of an earlier lease's token does not end the lease held now. The outage case still works."""
    from types import SimpleNamespace

    from streamd.fleet import Fleet, Lease
    from streamd.sinks.redis import FENCED_XADD

    r = aioredis.Redis.from_url(redis_server.url)
    sid = "released-1"
    await clean(r, sid)
    released: list[str] = []

    async def on_acquire(s, lease, prev):
        return None

    async def on_release(s, why):
        released.append(s)

    cfg = SimpleNamespace(member_id="mx", max_streams=None, lease_ttl_s=3, renew_s=0.5)
    f = Fleet(r, cfg, None, "test", on_acquire, on_release, lambda: {})
    lk, res = keys.lease_key(sid), keys.results_key(sid)

    async def write(token):
        return await r.eval(FENCED_XADD, 3, lk, res, keys.lease_last_key(sid), token, 100, "n", "1")

    try:
        await f._acquire(sid)
        old = f.token(sid)
        # an outage past the TTL: the key is gone, nobody took the stream: the holder writes and renews it back
        await r.delete(lk)
        assert await write(old) != 0
        await f._renew()
        assert (await r.get(lk)).decode() == old and sid in f.leases
        # released here: the same token can neither write nor take the key back
        await f.release(sid, "deleted")
        assert await r.get(lk) is None
        assert await write(old) == 0
        f.leases[sid] = Lease(sid, old)  # a renewal that was already under way with the released lease
        await f._renew()
        assert await r.get(lk) is None, "a released lease was taken again"
        # taken again here with a new token: a refusal of the old one's write leaves the new lease alone
        f.leases.clear()
        await f._acquire(sid)
        new = f.token(sid)
        assert new != old
        f.fenced(sid, old)
        f.fenced(sid, "-")
        await asyncio.sleep(0.05)
        assert f.token(sid) == new
        f.fenced(sid, new)
        await asyncio.sleep(0.05)
        assert sid not in f.leases
    finally:
        await clean(r, sid)
        await r.aclose()


async def test_only_an_end_of_input_is_recorded_and_the_same_settings_again_keep_it(redis_server, clip):
    """(1) A failure is not recorded as a stream's end (it may be one daemon's alone: here a file only this host
    lacks): the next owner tries again (old code: recorded; the next owner showed it failed for good). (2) An API
    stream played to its end and PATCHed with the same settings keeps its end: not played again (old code: the
    PATCH forgot the end and the file played again, each frame's result twice, or only once it moved, depending on
    which daemon got the request)."""
    import aiohttp

    from conftest import OPER, api_cfg, h, until
    from streamd.testing.servers import HttpDir

    r = aioredis.Redis.from_url(redis_server.url)
    srv = HttpDir(clip.parent).start()
    missing, api = "gone-here", "played-once"
    await clean(r, missing, api)
    await r.delete(keys.stream_ended_key(missing), keys.stream_ended_key(api))
    c = api_cfg(redis_server.url, [{"id": missing, "url": str(clip.parent / "not-on-this-host.mp4")}])
    c = c.model_copy(update={"fleet": c.fleet.model_copy(update=fleet(member_id="x"))})
    body = {"url": srv.url(clip.name), "fps": 2, "pipeline": "frame_info"}

    def state(d, sid):
        rn = d.streams.runners.get(sid)
        return rn and (rn.state.value, rn.reason_code)

    try:
        async with running(c) as d, aiohttp.ClientSession() as s:
            await until(lambda: state(d, missing) and state(d, missing)[0] == "failed", 30, what="failed")
            async with s.post(d.api_url + "/api/v1/streams", json={"id": api, **body}, headers=h(OPER)) as resp:
                assert resp.status in (200, 201), await resp.text()
            await until(lambda: state(d, api) == ("stopped", "ended"), 60, what="the file played to its end")
            await asyncio.sleep(1)
            n = len(await results(r, api))
            assert n == 12, n  # 6 s at 2 fps
            async with s.patch(d.api_url + f"/api/v1/streams/{api}", json={"fps": 2}, headers=h(OPER)) as resp:
                assert resp.status == 200, await resp.text()  # the same settings again
            await asyncio.sleep(4)
            assert state(d, api) == ("stopped", "ended")
            assert len(await results(r, api)) == n, "played again"
            assert await r.get(keys.stream_ended_key(missing)) is None, "a failure was recorded as an end"
    finally:
        srv.stop()
        await clean(r, missing, api)
        await r.delete(keys.stream_ended_key(missing), keys.stream_ended_key(api))
        await r.aclose()


async def test_a_streams_end_is_recorded_only_after_its_last_results_are_written(redis_server, clip):
    """A file played to its end while its last result is still on its way to Redis (held back at the sink): the
    stream's end is not recorded yet (the old code recorded it as soon as the source ended: a crash then lost those
    results, and the next owner showed the stream ended); once the result is written, the end is recorded after
    it, and every result is there."""
    import aiohttp

    from conftest import OPER, api_cfg, h, until
    from streamd.testing.servers import HttpDir

    sid = "end-after-results"
    r = aioredis.Redis.from_url(redis_server.url)
    await clean(r, sid)
    await r.delete(keys.stream_ended_key(sid))
    web = HttpDir(clip.parent).start()
    c = api_cfg(redis_server.url)
    c = c.model_copy(update={"fleet": c.fleet.model_copy(update=fleet(member_id="x"))})
    try:
        async with running(c) as d, aiohttp.ClientSession() as s:
            gate = asyncio.Event()
            publish = d.sink.publish_results

            async def held(works):  # the stream's last result (seq 11: 6 s at 2 fps) waits for the gate
                if any(w.frame.stream_id == sid and w.frame.seq >= 11 for w in works):
                    await gate.wait()
                await publish(works)

            d.sink.publish_results = held
            async with s.post(d.api_url + "/api/v1/streams", headers=h(OPER),
                              json={"id": sid, "url": web.url(clip.name), "fps": 2, "pipeline": "frame_info"}) as resp:
                assert resp.status == 201, await resp.text()
            await until(lambda: (rn := d.streams.runners.get(sid)) is not None and rn.reason_code == "ended", 30,
                        what="the file's end")
            await until(lambda: r.xlen(keys.results_key(sid)), 10, what="the first results")
            await asyncio.sleep(1)
            assert await r.get(keys.stream_ended_key(sid)) is None, "the end was recorded before the last result"
            assert await r.xlen(keys.results_key(sid)) == 11
            gate.set()
            await until(lambda: r.get(keys.stream_ended_key(sid)), 10, what="the end recorded")
            assert [q["seq"] for q in await results(r, sid)] == list(range(12))
    finally:
        web.stop()
        await clean(r, sid)
        await r.delete(keys.stream_ended_key(sid))
        await r.aclose()


async def test_an_ended_stream_only_another_daemons_config_names_stays_visible_once_its_lease_is_released(
        redis_server, clip):
    """y's config file names a file that x's does not: once it played to its end on y, y gives its lease back (an
    ended stream holds no capacity), and x's API still answers for it from y's heartbeat: stopped, ended, no
    owner."""
    import aiohttp

    from conftest import READ, api_cfg, h, until

    sid = "only-y-ends"
    r = aioredis.Redis.from_url(redis_server.url)
    await clean(r, sid)
    await r.delete(keys.stream_ended_key(sid))
    cx = api_cfg(redis_server.url)
    cx = cx.model_copy(update={"fleet": cx.fleet.model_copy(update=fleet(member_id="x"))})
    stream = {"id": sid, "url": str(clip), "fps": 2}
    try:
        async with running(cx) as dx, running(make_config(redis_server.url, [stream], fleet=fleet(member_id="y"))) \
                as dy, aiohttp.ClientSession() as s:
            await until(lambda: sid in dy.streams.fleet.fleet.done, 30, what="the file's end on y, its lease given back")
            assert await r.get(keys.lease_key(sid)) is None

            async def shown():
                async with s.get(dx.api_url + f"/api/v1/streams/{sid}", headers=h(READ)) as resp:
                    body = await resp.json()
                    return resp.status == 200 and body.get("reason_code") == "ended" and body

            body = await until(shown, 10, what="x answering for the ended stream")
            assert (body["state"], body["owner"]) == ("stopped", None), body
            async with s.get(dx.api_url + "/api/v1/streams", headers=h(READ)) as resp:
                assert sid in [q["id"] for q in (await resp.json())["streams"]]
    finally:
        await clean(r, sid)
        await r.delete(keys.stream_ended_key(sid))
        await r.aclose()

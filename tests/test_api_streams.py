"""Streams through the control API, against a real daemon, real Redis, real HTTP: stored streams that cannot start
fail alone, refused requests leave nothing behind, and a stream's GET fields move with its frames."""

import json
import time

import aiohttp
import numpy as np

from streamd.config import StreamConfig
from streamd.keys import API_STREAMS_KEY
from streamd.testing.media import push_frames
from conftest import ADMIN, OPER, READ, api_cfg, at_least, events, h, make_config, running, until

IMGS = [np.random.default_rng(7).integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]


async def _get(s, d, sid):
    async with s.get(f"{d.api_url}/api/v1/streams/{sid}", headers=h(READ)) as resp:
        assert resp.status == 200, (sid, resp.status, await resp.text())
        return await resp.json()


async def test_bad_stored_streams_fail_alone_and_can_be_fixed(r, redis_server, clip):
    good = StreamConfig(id="good", url="redis:frames:good", pipeline="frame_info")
    await r.hset(API_STREAMS_KEY, mapping={
        "good": good.model_dump_json(exclude_unset=True),  # as the daemon keeps it
        # a pipeline that was removed since (or that this daemon does not have)
        "gone": json.dumps({"id": "gone", "url": "redis:frames:gone", "pipeline": "removed-since"}),
        # an entry written by an older version: a field that no longer exists
        "old": json.dumps({"id": "old", "url": "redis:frames:old", "pipeline": "frame_info", "fsp": 3}),
        "garbage": b"{not json",
    })
    cam = {"id": "cam", "url": str(clip), "playback": "realtime", "loop": True, "fps": 4.0}
    async with running(api_cfg(redis_server.url, [cam])) as d, aiohttp.ClientSession() as s:
        await push_frames(r, "frames:good", IMGS[:3])
        await until(lambda: at_least(r, "good", 3), 20, what="results of the good stored stream")
        await until(lambda: at_least(r, "cam", 2), 20, what="results of the config stream")

        gone = await _get(s, d, "gone")
        assert gone["state"] == "failed" and gone["source"] == "api" and gone["pipeline"] == "removed-since"
        assert "unknown pipeline 'removed-since'" in gone["reason"] and gone["last_error"] == gone["reason"]
        old = await _get(s, d, "old")
        assert old["state"] == "failed" and "invalid stored entry: fsp" in old["reason"]
        assert old["url"] == "redis:frames:old"
        garbage = await _get(s, d, "garbage")
        assert garbage["state"] == "failed" and "invalid stored entry" in garbage["reason"]
        async with s.get(d.api_url + "/health/ready") as resp:
            assert resp.status == 200  # failed streams do not make the daemon unready
        async with s.get(d.api_url + "/health", headers=h(READ)) as resp:
            assert (await resp.json())["states"] == {"live": 2, "failed": 3}

        # the operator fixes one and removes another; the good streams are not disturbed
        async with s.patch(d.api_url + "/api/v1/streams/gone", json={"pipeline": "frame_info"},
                           headers=h(OPER)) as resp:
            assert resp.status == 200, await resp.text()
        assert json.loads(await r.hget(API_STREAMS_KEY, "gone"))["pipeline"] == "frame_info"
        await push_frames(r, "frames:gone", IMGS[:2])
        await until(lambda: at_least(r, "gone", 2), 20, what="results of the fixed stream")
        async with s.delete(d.api_url + "/api/v1/streams/garbage", headers=h(OPER)) as resp:
            assert resp.status == 204
        assert not await r.hexists(API_STREAMS_KEY, "garbage")
        await push_frames(r, "frames:good", IMGS[3:])
        await until(lambda: at_least(r, "good", 6), 20, what="the good stream to go on")
        assert d.streams.runners["cam"].state.value == "live"


async def test_refused_stream_requests_leave_nothing_behind(r, redis_server):
    cfg = make_config(redis_server.url, [], api=api_cfg(redis_server.url).api.model_dump(),
                      pipelines={"badopts": {"stages": [{"type": "frame_info", "bogus": 1}]}})
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/streams"
        for body, code in [
            ({"id": "a", "url": "redis:frames:a", "pipeline": "no-such-pipeline"}, "invalid_pipeline"),
            ({"id": "a", "url": "redis:frames:a", "pipeline": "../config/streamd"}, "invalid_pipeline"),
            ({"id": "a", "url": "redis:frames:a", "pipeline": "badopts"}, "invalid_pipeline"),  # bad stage options
            ({"id": "a", "url": "concat:x.mp4|y.mp4", "pipeline": "frame_info"}, "scheme_not_allowed"),
        ]:
            async with s.post(u, json=body, headers=h(OPER)) as resp:
                err = await resp.json()
                assert resp.status == 422 and err["error"]["code"] == code, (body, err)
            assert await r.hgetall(API_STREAMS_KEY) == {} and d.streams.runners == {}
            if body["pipeline"] == "badopts":
                assert "bogus" in err["error"]["message"], err  # names the bad stage option

        # a refused change leaves the running stream and its stored entry as they were
        async with s.post(u, json={"id": "b", "url": "redis:frames:b", "pipeline": "frame_info"},
                          headers=h(OPER)) as resp:
            assert resp.status == 201
        stored = await r.hget(API_STREAMS_KEY, "b")
        runner = d.streams.runners["b"]
        async with s.patch(u + "/b", json={"pipeline": "badopts"}, headers=h(OPER)) as resp:
            err = await resp.json()
            assert resp.status == 422 and "bogus" in err["error"]["message"], err
        assert await r.hget(API_STREAMS_KEY, "b") == stored and d.streams.runners["b"] is runner
        assert runner.state.value not in ("failed", "stopped")
        await push_frames(r, "frames:b", IMGS[:2])
        await until(lambda: at_least(r, "b", 2), 20, what="results of the untouched stream")
        async with s.post(u, json={"id": "b", "url": "redis:frames:b2", "pipeline": "frame_info"},
                          headers=h(OPER)) as resp:
            assert resp.status == 409
        assert json.loads(await r.hget(API_STREAMS_KEY, "b"))["url"] == "redis:frames:b"


async def test_private_addresses_need_the_operators_allow_list_whatever_the_token(r, redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/0#frames:lan"  # a camera on the LAN, say
    body = {"id": "lan", "url": url, "pipeline": "frame_info"}
    async with running(api_cfg(redis_server.url, deny_private_addresses=True, egress={})) as d, \
            aiohttp.ClientSession() as s:
        for token in (OPER, ADMIN):
            async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(token)) as resp:
                err = await resp.json()
                assert resp.status == 422 and err["error"]["code"] == "egress_refused"
                assert "loopback" in err["error"]["message"] and "egress.allow" in err["error"]["message"]
        assert not await r.hexists(API_STREAMS_KEY, "lan")
    async with running(api_cfg(redis_server.url, deny_private_addresses=True,
                               egress={"allow": ["127.0.0.1/32"]})) as d, aiohttp.ClientSession() as s:
        async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
            assert resp.status == 201, await resp.text()
        await push_frames(r, "frames:lan", IMGS[:2])
        await until(lambda: at_least(r, "lan", 2), 20, what="results of the admin-added stream")
        # schemes and FFmpeg options stay closed to admin too
        for bad in ({"id": "f", "url": "file:///etc/passwd"},
                    {"id": "f", "url": "rtsp://cam.example/x", "ffmpeg_options": {"protocol_whitelist": "file"}}):
            async with s.post(d.api_url + "/api/v1/streams", json=bad, headers=h(ADMIN)) as resp:
                assert resp.status == 422


async def test_stream_get_fields_move_with_frames(r, redis_server, clip):
    live = {"id": "live", "url": str(clip), "playback": "realtime", "loop": True, "fps": 4.0}
    # nothing listens on port 1: refused at once, then failed after one retry
    bad = {"id": "bad", "url": "rtsp://127.0.0.1:1/nothing", "open_timeout_s": 2,
           "reconnect": {"initial_s": 0.1, "max_attempts": 1}}
    # every frame of the clip as fast as it decodes into a queue of one that drops its oldest
    burst = {"id": "burst", "url": str(clip), "fps": None, "queue_size": 1, "drop_policy": "drop_oldest"}
    async with running(api_cfg(redis_server.url, [live, bad, burst])) as d, aiohttp.ClientSession() as s:
        async def flowing():
            info = await _get(s, d, "live")
            return info if info["fps_in"] > 0 and info["fps_out"] > 0 and info["results"] >= 2 else None

        info = await until(flowing, 20, what="fps in and out above 0")
        assert info["state"] == "live" and info["reason"] is None and info["last_error"] is None
        assert 0 < info["fps_out"] <= info["fps_in"] and info["fps_in"] > 10  # decodes ~30 fps, samples 4
        # 4 frames a second through frame_info: the pipeline keeps up, nothing is dropped, at most one frame waits
        assert info["dropped"] == 0 and info["queue_depth"] <= 1, info
        assert abs(info["last_frame_ts"] - time.time()) < 5
        assert info["frames_decoded"] > info["frames_sampled"] > 0

        async def failed():
            x = await _get(s, d, "bad")
            return x if x["state"] == "failed" else None

        x = await until(failed, 30, what="the unreachable stream to fail")
        assert x["reason"] and "gave up after 1 attempts" in x["reason"]
        assert x["last_error"] and x["fps_in"] == 0 and x["fps_out"] == 0 and x["last_frame_ts"] is None
        async with s.get(d.api_url + "/api/v1/streams", headers=h(READ)) as resp:
            listed = {y["id"]: y for y in (await resp.json())["streams"]}
        assert listed["bad"]["state"] == "failed" and listed["live"]["state"] == "live"

        async def burst_done():
            x = await _get(s, d, "burst")
            return x if x["state"] == "stopped" and x["results"] + x["dropped"] == x["frames_sampled"] else None

        # once the clip has ended, every frame the queue took was either published or dropped, none still waits
        b = await until(burst_done, 30, what="every frame of the burst stream published or dropped")
        assert b["frames_decoded"] == b["frames_sampled"] == CLIP_FRAMES and b["queue_depth"] == 0, b
        assert b["dropped"] > 0, b  # decoding outruns the pipeline: a queue of one drops (72-114 of 180 here)
        await until(lambda: _dropped_events(r, "burst", b["dropped"]), 5, what="frames_dropped events for all drops")
        async with s.get(d.api_url + "/metrics", headers=h(READ)) as resp:
            metrics = await resp.text()
    assert f'streamd_frames_dropped_total{{stream="burst"}} {float(b["dropped"])}' in metrics
    assert 'streamd_frames_dropped_total{stream="live"} 0.0' in metrics


CLIP_FRAMES = 180  # the `clip` fixture: 6 s at 30 fps


async def _dropped_events(r, sid, n):
    return sum(e["count"] for e in await events(r, sid, "frames_dropped")) == n


async def test_a_stored_stream_means_the_same_after_a_restart(r, redis_server):
    """Only the fields the client set are kept: a Redis input without `fps` still gives every entry a result."""
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        body = {"id": "every", "url": "redis:frames:every", "pipeline": "frame_info"}
        async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
            assert resp.status == 201
        async with s.patch(d.api_url + "/api/v1/streams/every", json={"queue_size": 4}, headers=h(OPER)) as resp:
            assert resp.status == 200
    assert json.loads(await r.hget(API_STREAMS_KEY, "every")) == {**body, "queue_size": 4}
    async with running(api_cfg(redis_server.url)) as d:
        await push_frames(r, "frames:every", IMGS)  # pushed at once: an fps would sample one or two of them
        await until(lambda: at_least(r, "every", len(IMGS)), 20, what="a result for every entry")
        assert d.streams.runners["every"].cfg.queue_size == 4


async def test_a_stream_created_again_after_its_delete_counts_its_results_from_zero(r, redis_server):
    """The old code kept a deleted stream's result count: a new stream of that id reported the old one's."""
    from conftest import results

    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        body = {"id": "again", "url": "redis:frames:again", "pipeline": "frame_info"}
        async with s.post(f"{d.api_url}/api/v1/streams", headers=h(OPER), json=body) as resp:
            assert resp.status == 201
        await push_frames(r, "frames:again", IMGS[:3])
        await until(lambda: at_least(r, "again", 3), 20, what="the first stream's results")
        await until(lambda: d.sink.results_by_stream.get("again") == 3, 10, what="counted")
        async with s.delete(f"{d.api_url}/api/v1/streams/again", headers=h(OPER)) as resp:
            assert resp.status == 204
        async with s.post(f"{d.api_url}/api/v1/streams", headers=h(OPER),
                          json={**body, "url": "redis:frames:again2"}) as resp:
            assert resp.status == 201
            assert (await resp.json())["results"] == 0
        assert (await _get(s, d, "again"))["results"] == 0
        assert len(await results(r, "again")) == 3  # what the first stream published stays in Redis


async def test_a_patch_that_moves_a_redis_input_drops_the_group_it_left(r, redis_server):
    """PATCH a Redis input's key, then its group, then DELETE it: each group streamd made and the stream left goes
    (the old code left `streamd` on both keys), unless another stream still reads with it."""
    async def groups(key):
        return sorted(g["name"].decode() for g in await r.xinfo_groups(key)) if await r.exists(key) else []

    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async def call(method, path, **kw):
            async with s.request(method, f"{d.api_url}/api/v1{path}", headers=h(OPER), **kw) as resp:
                return resp.status

        for sid, key in (("mv", "frames:mv-a"), ("stay", "frames:mv-shared"), ("mv2", "frames:mv-shared")):
            assert await call("POST", "/streams", json={"id": sid, "url": f"redis:{key}",
                                                         "pipeline": "frame_info"}) == 201
        await until(lambda: groups("frames:mv-a"), 10, what="the group on frames:mv-a")
        await until(lambda: groups("frames:mv-shared"), 10, what="the group on frames:mv-shared")
        assert await call("PATCH", "/streams/mv", json={"url": "redis:frames:mv-b"}) == 200
        await until(lambda: groups("frames:mv-b"), 10, what="the group on frames:mv-b")
        assert await groups("frames:mv-a") == []
        assert await call("PATCH", "/streams/mv", json={"redis_input": {"group": "g2"}}) == 200
        await until(lambda: groups("frames:mv-b"), 10, what="a group on frames:mv-b")
        assert await groups("frames:mv-b") == ["g2"]
        assert await call("DELETE", "/streams/mv") == 204
        assert await groups("frames:mv-b") == []
        # a stream that leaves a key another stream reads with the same group: the group stays
        assert await call("PATCH", "/streams/mv2", json={"url": "redis:frames:mv-c"}) == 200
        await until(lambda: groups("frames:mv-c"), 10, what="the group on frames:mv-c")
        assert await groups("frames:mv-shared") == ["streamd"]
        await push_frames(r, "frames:mv-shared", IMGS[:2])
        await until(lambda: at_least(r, "stay", 2), 10, what="the stream left on the shared key reads on")

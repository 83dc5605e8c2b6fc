"""File replay through a real daemon and a real Redis."""

from conftest import events, make_config, results, running, states, until


async def test_file_fast_replay_loses_no_sampled_frame(r, redis_server, clip):
    cfg = make_config(redis_server.url, [{"id": "f", "url": str(clip), "fps": 2.0, "queue_size": 1}])
    async with running(cfg) as d:
        await until(lambda: d.runners["f"].state.value == "stopped", 30, what="end of file")
        await until(lambda: len(d.sink) == 0 and d.sink.published > 0, 10)
        recs = await until(lambda: _n(r, "f", 12), 10, what="12 results")
    assert [x["seq"] for x in recs] == list(range(12))  # 6 s at 2 fps, in order, none lost
    pts = [x["pts_s"] for x in recs]
    assert all(abs(b - a - 0.5) < 0.04 for a, b in zip(pts, pts[1:]))
    rec = recs[0]
    assert rec["schema_version"] == 1 and rec["stream_id"] == "f"
    assert rec["width"] == 640 and rec["height"] == 360
    assert rec["outputs"]["frame_info"]["width"] == 640
    assert 0 < rec["outputs"]["frame_info"]["mean_brightness"] < 255
    assert rec["capture_ts"] <= rec["publish_ts"]
    assert "frame_info" in rec["timings_ms"]
    evs = await events(r, "f")
    assert states(evs) == ["connecting", "live", "stopped"]


async def _n(r, sid, n):
    recs = await results(r, sid)
    return recs if len(recs) >= n else None


async def test_file_every_frame_and_multiple_streams_in_one_pipeline(r, redis_server, clip):
    cfg = make_config(redis_server.url, [
        {"id": "a", "url": str(clip), "fps": None},
        {"id": "b", "url": f"file://{clip}", "fps": 5.0},
    ])
    async with running(cfg) as d:
        await until(lambda: all(x.state.value == "stopped" for x in d.runners.values()), 60)
        ra = await until(lambda: _n(r, "a", 180), 10, what="180 results")
        rb = await until(lambda: _n(r, "b", 30), 10, what="30 results")
    assert len(ra) == 180 and [x["seq"] for x in ra] == list(range(180))
    assert len(rb) == 30
    assert len(d.pipelines) == 1  # one pipeline served both streams


async def test_realtime_looping_file_plays_like_a_camera(r, redis_server, clip):
    cfg = make_config(redis_server.url, [{"id": "cam", "url": str(clip), "fps": 4.0, "playback": "realtime",
                                         "loop": True}])
    async with running(cfg):
        recs = await until(lambda: _n(r, "cam", 8), 15, what="8 results")
    pts = [x["pts_s"] for x in recs]
    assert pts == sorted(pts)
    wall = recs[-1]["capture_ts"] - recs[0]["capture_ts"]
    assert abs(wall - (pts[-1] - pts[0])) < 0.5  # paced in real time

"""File replay through a real daemon and a real Redis."""

import av
import numpy as np

from streamd.samples import make_pan_clip
from conftest import at_least, events, make_config, running, states, until


async def test_file_fast_replay_loses_no_sampled_frame(r, redis_server, clip):
    cfg = make_config(redis_server.url, [{"id": "f", "url": str(clip), "fps": 2.0, "queue_size": 1}])
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["f"].state.value == "stopped", 30, what="end of file")
        await until(lambda: len(d.sink) == 0 and d.sink.published > 0, 10)
        recs = await until(lambda: at_least(r, "f", 12), 10, what="12 results")
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


async def test_file_every_frame_and_multiple_streams_in_one_pipeline(r, redis_server, clip):
    cfg = make_config(redis_server.url, [
        {"id": "a", "url": str(clip), "fps": None},
        {"id": "b", "url": f"file://{clip}", "fps": 5.0},
    ])
    async with running(cfg) as d:
        await until(lambda: all(x.state.value == "stopped" for x in d.streams.runners.values()), 60)
        ra = await until(lambda: at_least(r, "a", 180), 10, what="180 results")
        rb = await until(lambda: at_least(r, "b", 30), 10, what="30 results")
    assert len(ra) == 180 and [x["seq"] for x in ra] == list(range(180))
    assert len(rb) == 30
    assert len(d.pipelines) == 1  # one pipeline served both streams


async def test_realtime_looping_file_plays_like_a_camera(r, redis_server, clip):
    cfg = make_config(redis_server.url, [{"id": "cam", "url": str(clip), "fps": 4.0, "playback": "realtime",
                                         "loop": True}])
    async with running(cfg):
        recs = await until(lambda: at_least(r, "cam", 8), 15, what="8 results")
    pts = [x["pts_s"] for x in recs]
    assert pts == sorted(pts)
    wall = recs[-1]["capture_ts"] - recs[0]["capture_ts"]
    assert abs(wall - (pts[-1] - pts[0])) < 0.5  # paced in real time


async def test_stages_get_pyavs_own_rgb_also_after_the_input_changes_size(r, redis_server, tmp_path):
    """The decoder thread converts with one swscale converter per connection (PyAV's to_ndarray makes one per
    frame): the stages get exactly the RGB that `frame.to_ndarray(format="rgb24")` gives, every frame, also
    after the input changes size mid-stream (two MPEG-TS clips back to back)."""
    a = make_pan_clip(tmp_path / "a.ts", seconds=1, fps=10, size=(320, 180), container="mpegts")
    b = make_pan_clip(tmp_path / "b.ts", "bus.jpg", seconds=1, fps=10, size=(256, 320), container="mpegts")
    both = tmp_path / "both.ts"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    with av.open(str(both)) as c:
        want = []
        for f in c.decode(video=0):
            rgb = f.to_ndarray(format="rgb24")
            want.append((f.width, f.height, round(int(rgb.sum(dtype=np.uint64)) / rgb.size, 3)))  # frame_info's
    assert {(w, h) for w, h, _ in want} == {(320, 180), (256, 320)} and len(want) == 20
    cfg = make_config(redis_server.url, [{"id": "z", "url": str(both), "fps": None, "pipeline": "exact"}],
                      pipelines={"exact": {"stages": [{"type": "frame_info", "stride": 1}]}})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["z"].state.value == "stopped", 30, what="end of file")
        recs = await until(lambda: at_least(r, "z", 20), 10, what="20 results")
    got = [(x["width"], x["height"], x["outputs"]["frame_info"]["mean_brightness"]) for x in recs]
    assert got == want

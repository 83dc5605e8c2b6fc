"""Sampler-aware decoding (issue 18, streamd/sources/plan.py): what PyAV sources decode for the sampler, through
a real daemon and a real Redis, on clips with a known GOP (a keyframe every `gop` frames exactly)."""

from pathlib import Path

import av
import pytest

from streamd.errors import ConfigError
from streamd.sampling import FpsSampler
from streamd.samples import make_pan_clip
from conftest import PERSON, at_least, events, make_config, results, running, states, until

SIZE = (320, 180)


@pytest.fixture(scope="module")
def gop1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 s at 30 fps, a keyframe every second (at 0, 1, 2 ... 9 s)."""
    return make_pan_clip(tmp_path_factory.mktemp("gop") / "gop1.mp4", seconds=10, fps=30, size=SIZE, gop=30)


def keyframe_times(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [round(float(p.pts * s.time_base), 3) for p in c.demux(s) if p.is_keyframe and p.pts is not None]


def shifted_ts(src: Path, dst: Path, offset_s: float) -> Path:
    """`src` (MPEG-TS) remuxed with every timestamp moved by `offset_s` (a jump where it is appended to another)."""
    shift = int(offset_s * 90_000)
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mpegts") as o:
        ins = i.streams.video[0]
        outs = o.add_stream_from_template(ins)
        for p in i.demux(ins):
            if p.dts is None:
                continue
            p.pts, p.dts, p.stream = p.pts + shift, p.dts + shift, outs
            o.mux(p)
    return dst


async def run_to_end(cfg, *ids):
    async with running(cfg) as d:
        await until(lambda: all(d.streams.runners[i].state.value == "stopped" for i in ids), 60, what="end of files")
        await until(lambda: len(d.sink) == 0, 10)
        return {i: d.streams.runners[i].decoded for i in ids}


def test_sampler_reach_takes_a_frame_before_its_due_time_and_keeps_the_grid():
    s = FpsSampler(1 / 3)  # due at 0, 3, 6 ...
    assert s.offer(0.0).keep
    assert not s.offer(2.0, reach_s=0.5).keep  # 1 s early: the next keyframe (3.0) is nearer
    assert s.offer(2.6, reach_s=0.5).keep  # 0.4 s early: nearest
    assert s.next_due_s == 6.0  # the grid keeps its phase
    s.watch_forward = False  # the decode plan watches forward jumps on the packets
    assert not s.offer(5.0).discontinuity and s.offer(60.0).keep
    assert s.offer(1.0).discontinuity  # backward: still the sampler's to see


def test_decode_mode_is_checked_at_start():
    with pytest.raises(ConfigError) as e:
        make_config("redis://127.0.0.1:1/0", [{"id": "x", "url": "a.mp4", "decode": "some"}])
    assert e.value.key == "streams.0.decode"


async def test_keyframes_mode_publishes_the_keyframe_nearest_each_due_time(r, redis_server, gop1):
    assert keyframe_times(gop1) == [float(k) for k in range(10)]
    cfg = make_config(redis_server.url, [
        {"id": "k", "url": str(gop1), "fps": 0.3, "decode": "keyframes"},
        {"id": "a", "url": str(gop1), "fps": 0.3, "decode": "all"}])
    decoded = await run_to_end(cfg, "k", "a")
    k = [x["pts_s"] for x in await results(r, "k")]
    a = [x["pts_s"] for x in await results(r, "a")]
    # due at 0, 3.33, 6.67 (10.0 is past the end): the nearest keyframes are 0, 3 and 7 s
    assert a == pytest.approx([0.0, 10 / 3, 20 / 3], abs=0.02)
    assert k == [0.0, 3.0, 7.0]
    assert all(abs(x - due) <= 0.5 for x, due in zip(k, a))  # within half the (regular) GOP
    assert decoded == {"k": 3, "a": 300}  # only the keyframes used were decoded


async def test_auto_takes_keyframes_at_the_keyframe_rate_and_decodes_gops_above_it(r, redis_server, gop1):
    cfg = make_config(redis_server.url, [
        {"id": "slow", "url": str(gop1), "fps": 1.0},  # decode: auto is the default
        {"id": "fast", "url": str(gop1), "fps": 4.0},
        {"id": "full", "url": str(gop1), "fps": 4.0, "decode": "all"}])
    decoded = await run_to_end(cfg, "slow", "fast", "full")
    slow = [x["pts_s"] for x in await results(r, "slow")]
    fast = [x["pts_s"] for x in await results(r, "fast")]
    full = [x["pts_s"] for x in await results(r, "full")]
    assert slow == [float(k) for k in range(10)]  # one frame a second: the keyframes
    assert fast == full and len(fast) == 40  # four a second: the very frames full decoding picks
    assert [e["mode"] for e in await events(r, "slow", "decode_mode")] == ["keyframes"]
    assert [(e["mode"], e["gop_s"]) for e in await events(r, "fast", "decode_mode")] == [("gop", 1.0)]
    assert await events(r, "full", "decode_mode") == []
    # slow: the first three GOPs in full (until three intervals agree: the GOP is stable), then a keyframe a second
    assert decoded["slow"] == 90 + 7
    # fast: due at .0 .25 .5 .75 in each GOP: decoded up to .75 (and the frames FFmpeg's frame threads had
    # started on), the rest skipped
    assert decoded["full"] == 300 and 90 + 7 * 23 <= decoded["fast"] <= 90 + 7 * 26


async def test_auto_follows_a_gop_that_changes_mid_way(r, redis_server, tmp_path):
    """An encoder restart with another GOP: 0.5 s, then 2 s (two MPEG-TS clips back to back)."""
    a = make_pan_clip(tmp_path / "a.ts", seconds=4, fps=30, size=SIZE, gop=15, container="mpegts")
    b = make_pan_clip(tmp_path / "b.ts", "bus.jpg", seconds=8, fps=30, size=SIZE, gop=60, container="mpegts")
    both = tmp_path / "both.ts"
    both.write_bytes(a.read_bytes() + shifted_ts(b, tmp_path / "b2.ts", 4.0).read_bytes())
    cfg = make_config(redis_server.url, [{"id": "g", "url": str(both), "fps": 1.0}])
    await run_to_end(cfg, "g")
    modes = [(e["mode"], e["gop_s"]) for e in await events(r, "g", "decode_mode")]
    # keyframes once three 0.5 s intervals agree; everything while the intervals disagree (0.5, 0.5, 2 s), the GOP
    # mode once three 2 s intervals agree
    assert modes == [("keyframes", 0.5), ("all", 2.0), ("gop", 2.0)]
    pts = [x["pts_s"] for x in await results(r, "g")]
    rel = [round(p - pts[0], 2) for p in pts]
    # keyframes (every 0.5 s) while the GOP is 0.5 s; the due time 5 s falls in the first 2 s GOP, still decoded
    # as keyframes: it gets the next keyframe, 6 s (one GOP late at most); from there each due time gets its own
    # frame (7, 9, 11 s are no keyframes: keyframes are at 4, 6, 8, 10 s)
    assert rel == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


async def test_detections_on_keyframes_equal_those_of_full_decoding(r, redis_server, tmp_path):
    clip = make_pan_clip(tmp_path / "people.mp4", seconds=6, fps=30, size=(640, 360), gop=60)
    pipelines = {"people": {"stages": [*PERSON, {"type": "frame_info", "stride": 1}]}}
    cfg = make_config(redis_server.url, [
        {"id": "k", "url": str(clip), "fps": 0.5, "decode": "keyframes", "pipeline": "people"},
        {"id": "a", "url": str(clip), "fps": 0.5, "decode": "all", "pipeline": "people"}], pipelines=pipelines)
    decoded = await run_to_end(cfg, "k", "a")
    k, a = await results(r, "k"), await results(r, "a")
    assert [x["pts_s"] for x in k] == [x["pts_s"] for x in a] == [0.0, 2.0, 4.0]
    assert decoded == {"k": 3, "a": 180}
    for x, y in zip(k, a):
        assert x["outputs"]["frame_info"] == y["outputs"]["frame_info"]  # the same pixels
        assert x["outputs"]["detect"]["detections"] == y["outputs"]["detect"]["detections"]
    assert any(x["outputs"]["detect"]["detections"] for x in k)  # people were found


@pytest.mark.parametrize("offset_s", [20.0, -30.0])
async def test_keyframes_mode_sees_timestamp_jumps(r, redis_server, tmp_path, offset_s):
    a = make_pan_clip(tmp_path / "a.ts", seconds=4, fps=30, size=SIZE, gop=30, container="mpegts")
    b = shifted_ts(make_pan_clip(tmp_path / "b.ts", seconds=4, fps=30, size=SIZE, gop=30, container="mpegts"),
                   tmp_path / "b2.ts", 40.0 + offset_s)
    both = tmp_path / "both.ts"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    cfg = make_config(redis_server.url, [{"id": "j", "url": str(both), "fps": 0.5, "decode": "keyframes"}])
    await run_to_end(cfg, "j")
    recs = await results(r, "j")
    flagged = [x["pts_s"] for x in recs if x["discontinuity"]]
    assert len(flagged) == 1 and flagged[0] == pytest.approx(recs[2]["pts_s"])  # the first frame after the jump
    assert len(await events(r, "j", "discontinuity")) == 1
    assert len(recs) == 4  # two before the jump (0, 2 s), two after


async def test_keyframes_mode_no_false_stall_between_keyframes(r, redis_server, tmp_path):
    """A frame every 4 s (keyframes every 2 s, one in two used) and stall_timeout_s 1.5: the packets keep the
    stream live (a watchdog that looked only at decoded frames would call it stalled)."""
    clip = make_pan_clip(tmp_path / "g2.mp4", seconds=4, fps=30, size=SIZE, gop=60)
    cfg = make_config(redis_server.url, [{"id": "s", "url": str(clip), "fps": 0.25, "decode": "keyframes",
                                         "playback": "realtime", "loop": True, "stall_timeout_s": 1.5}])
    async with running(cfg) as d:
        await until(lambda: at_least(r, "s", 3), 20, what="3 results")
        assert d.streams.runners["s"].state.value == "live"
    assert "stalled" not in states(await events(r, "s"))
    pts = [x["pts_s"] for x in await results(r, "s")]
    assert [round(b - a, 3) for a, b in zip(pts, pts[1:])][:2] == [4.0, 4.0]


def _nvidia_gpu() -> bool:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    return exe is not None and subprocess.run([exe, "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(_nvidia_gpu(), reason="this machine has a GPU: the device is usable")
async def test_hwaccel_without_a_usable_device_fails_the_stream_naming_it(r, redis_server, gop1):
    cfg = make_config(redis_server.url, [{"id": "hw", "url": str(gop1), "fps": 1.0, "hwaccel": "cuda"},
                                         {"id": "sw", "url": str(gop1), "fps": 1.0}])
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["hw"].state.value == "failed", 20, what="hw failed")
        await until(lambda: d.streams.runners["sw"].state.value == "stopped", 20, what="sw played")
        assert d.streams.runners["hw"].reason.startswith("hwaccel cuda: the device cannot be used")
    assert await results(r, "hw") == [] and len(await results(r, "sw")) == 10


@pytest.mark.skipif(not _nvidia_gpu(), reason="no NVIDIA GPU on this machine: NVDEC decoding needs one")
async def test_hwaccel_cuda_decodes_the_frames_software_decoding_gives(r, redis_server, gop1):
    cfg = make_config(redis_server.url, [
        {"id": "hw", "url": str(gop1), "fps": 1.0, "hwaccel": "cuda", "decode": "keyframes"},
        {"id": "sw", "url": str(gop1), "fps": 1.0, "decode": "keyframes"}])
    await run_to_end(cfg, "hw", "sw")
    hw, sw = await results(r, "hw"), await results(r, "sw")
    assert [x["pts_s"] for x in hw] == [x["pts_s"] for x in sw] and len(hw) == 10
    for x, y in zip(hw, sw):  # NVDEC output, converted on the host: the same picture within rounding
        assert abs(x["outputs"]["frame_info"]["mean_brightness"] - y["outputs"]["frame_info"]["mean_brightness"]) < 2


async def test_hls_segments_decode_only_the_keyframes_used(r, redis_server, gop1, tmp_path):
    """HLS hands its segments to PyAV too: the same plan, across the segments of a run."""
    import shutil
    import subprocess

    from streamd.testing.egress import Canary

    out = tmp_path / "hls"
    out.mkdir()
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(gop1),
                    "-c", "copy", "-f", "hls", "-hls_time", "2", "-hls_list_size", "0", "-hls_playlist_type", "vod",
                    "-hls_segment_filename", str(out / "s%d.ts"), str(out / "index.m3u8")], check=True)
    with Canary("127.0.0.2", files=out) as origin:
        cfg = make_config(redis_server.url, [{"id": "h", "url": origin.url("/index.m3u8"), "fps": 0.3,
                                             "decode": "keyframes"}], egress={"allow": ["127.0.0.2/32"]})
        decoded = await run_to_end(cfg, "h")
    pts = [x["pts_s"] for x in await results(r, "h")]
    assert [round(p - pts[0], 2) for p in pts] == [0.0, 3.0, 7.0]  # keyframes nearest 0, 3.33, 6.67 s
    assert decoded == {"h": 3}


async def test_rtsp_camera_in_keyframes_mode(r, redis_server):
    """A real RTSP camera stand-in (GStreamer, a keyframe at most every 30 frames, SPS/PPS in band): auto at
    fps 1 decodes keyframes only, and the records come at about one a second."""
    from streamd.testing.servers import RtspServer

    if not RtspServer.available():
        pytest.skip("Debian's GStreamer RTSP server (python3-gi) is not installed on this machine")
    srv = RtspServer(size=(320, 180)).start()
    try:
        cfg = make_config(redis_server.url, [{"id": "cam", "url": srv.url, "fps": 1.0}])
        async with running(cfg) as d:
            # decoded in full until three keyframe intervals agree (the fourth keyframe), keyframes from there
            await until(lambda: events(r, "cam", "decode_mode"), 40, what="keyframes mode")
            before = d.streams.runners["cam"].decoded
            n = len(await results(r, "cam"))
            recs = await until(lambda: at_least(r, "cam", n + 5), 20, what="5 more RTSP results")
            decoded = d.streams.runners["cam"].decoded - before
            assert d.streams.runners["cam"].state.value == "live"
    finally:
        srv.stop()
    assert [e["mode"] for e in await events(r, "cam", "decode_mode")][0] == "keyframes"
    pts = [x["pts_s"] for x in recs]
    rate = (len(pts) - 1) / (pts[-1] - pts[0])
    assert 0.7 <= rate <= 1.3, rate
    assert decoded <= 5 + 2  # a keyframe per record (decoding everything: 150 frames)


def encode_clip(path: Path, seconds: int, options: dict[str, str], cut_at_s: float | None = None, fps: int = 30):
    """An H.264 pan (`options`: libx264's); from `cut_at_s` the picture is inverted (a scene cut)."""
    from streamd.samples import load_photo, pan_frames

    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height = SIZE
        st.pix_fmt = "yuv420p"
        st.options = {"preset": "veryfast", **options}
        for i, arr in enumerate(pan_frames(load_photo(), seconds * fps, fps, SIZE)):
            if cut_at_s is not None and i >= cut_at_s * fps:
                arr = 255 - arr
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def three_ways(url: str, fps: float, **extra) -> list[dict]:
    return [{"id": m, "url": url, "fps": fps, "decode": m, **extra} for m in ("all", "auto", "keyframes")]


async def test_intra_refresh_keys_make_every_mode_decode_everything(r, redis_server, tmp_path):
    """Intra refresh (x264 intra-refresh=1): the packets flagged as keys after the first are recovery points, whose
    frame does not decode alone. auto sees it on the decoded frames before it skips anything; keyframes mode
    when such a key gives no frame; both then decode everything and say why."""
    clip = encode_clip(tmp_path / "ir.mp4", 8, {"g": "30", "x264-params": "intra-refresh=1", "bf": "0"})
    assert len(keyframe_times(clip)) == 8
    await run_to_end(make_config(redis_server.url, three_ways(str(clip), 1.0)), "all", "auto", "keyframes")
    full = [x["pts_s"] for x in await results(r, "all")]
    auto = [x["pts_s"] for x in await results(r, "auto")]
    keys = [x["pts_s"] for x in await results(r, "keyframes")]
    assert full == [float(k) for k in range(8)]
    assert auto == full  # nothing ever skipped
    for sid in ("auto", "keyframes"):
        modes = await events(r, sid, "decode_mode")
        assert [e["mode"] for e in modes][-1] == "all" and "intra refresh" in modes[-1]["reason"]
    # keyframes: the key at 1 s gave no frame; its due time stayed due and got the first frame the decoder gave
    # after it recovered (the refresh takes a GOP or two), then one a second again
    assert keys[0] == 0.0 and 1.0 < keys[1] < 3.0 and len(keys) >= 6
    assert all(0.99 <= b - a <= 1.01 for a, b in zip(keys[1:], keys[2:]))


async def test_auto_on_a_varying_gop_loses_no_due_time(r, redis_server, tmp_path):
    """x264 defaults-like GOP (keyint 150, scene cuts): keyframes at irregular intervals. auto decodes everything
    while the last three intervals disagree, so it publishes the frames `all` does."""
    clip = encode_clip(tmp_path / "var.mp4", 20, {"g": "150", "keyint_min": "25", "sc_threshold": "40", "bf": "0"},
                       cut_at_s=11.0)
    gaps = [round(b - a, 2) for a, b in zip(keyframe_times(clip), keyframe_times(clip)[1:])]
    assert len(gaps) >= 2 and max(gaps) - min(gaps) > 0.1, gaps  # the clip's GOP does vary
    await run_to_end(make_config(redis_server.url, three_ways(str(clip), 1.0)), "all", "auto")
    full = [x["pts_s"] for x in await results(r, "all")]
    assert len(full) == 20
    assert [x["pts_s"] for x in await results(r, "auto")] == full


async def test_auto_with_b_frames_uses_the_frames_full_decoding_uses(r, redis_server, tmp_path):
    """B-frames (bf=3, 1 s GOP) at 2 fps: auto's GOP mode decodes every frame up to the last due one, so due
    times on B-frames get those B-frames, as in `all`. Explicit keyframes at 2 fps: a keyframe serves one due
    time, so one record a second (the README says so)."""
    clip = encode_clip(tmp_path / "b3.mp4", 8, {"g": "30", "keyint_min": "30", "sc_threshold": "0", "bf": "3"})
    decoded = await run_to_end(make_config(redis_server.url, three_ways(str(clip), 2.0)), "all", "auto", "keyframes")
    full = [x["pts_s"] for x in await results(r, "all")]
    assert full == pytest.approx([k / 2 for k in range(16)], abs=0.002)
    assert [x["pts_s"] for x in await results(r, "auto")] == full
    assert [e["mode"] for e in await events(r, "auto", "decode_mode")] == ["gop"]
    assert decoded["auto"] < decoded["all"]  # the tail of each GOP was skipped
    assert [x["pts_s"] for x in await results(r, "keyframes")] == [float(k) for k in range(8)]


async def test_watchdog_decodes_everything_when_skipping_publishes_nothing(r, redis_server, tmp_path):
    """A GOP that grows past what the plan measured (0.5 s, then 5 s): in keyframes mode at 1 fps nothing would be
    published for 5 s at a time. Once packets run past the period plus two GOPs with nothing published, the plan
    decodes everything (for good, saying why): from the next keyframe on, one record a second again."""
    a = make_pan_clip(tmp_path / "a.ts", seconds=4, fps=30, size=SIZE, gop=15, container="mpegts")
    b = make_pan_clip(tmp_path / "b.ts", "bus.jpg", seconds=10, fps=30, size=SIZE, gop=150, container="mpegts")
    both = tmp_path / "both.ts"
    both.write_bytes(a.read_bytes() + shifted_ts(b, tmp_path / "b2.ts", 4.0).read_bytes())
    cfg = make_config(redis_server.url, [{"id": "w", "url": str(both), "fps": 1.0, "decode": "keyframes"}])
    await run_to_end(cfg, "w")
    modes = await events(r, "w", "decode_mode")
    assert modes[-1]["mode"] == "all" and modes[-1]["reason"].startswith("no frame published for")
    pts = [x["pts_s"] for x in await results(r, "w")]
    rel = [round(p - pts[0], 2) for p in pts]
    # keyframes every 0.5 s up to 4 s; the due time 5 s waits for the next frame the decoder can give (the
    # keyframe at 9 s: the frames before it were skipped), then every due time has its frame
    assert rel == [0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 10.0, 11.0, 12.0, 13.0]

"""Live sources over real servers: HLS over HTTP (ffmpeg writing in real time), RTSP (GStreamer)."""

import asyncio

import pytest

from streamd.testing.servers import HttpDir, LiveHls, RtspServer
from conftest import at_least, events, make_config, results, running, states, until


@pytest.fixture
def live_hls(clip, tmp_path):
    hls = LiveHls(clip, tmp_path / "hls").start()
    http = HttpDir(tmp_path / "hls").start()
    yield hls, http
    http.stop()
    hls.stop()


async def test_hls_live_results_at_the_configured_fps(r, redis_server, live_hls):
    _, http = live_hls
    cfg = make_config(redis_server.url, [{"id": "hls", "url": http.url("index.m3u8"), "fps": 2.0}])
    async with running(cfg) as d:
        first = await until(lambda: at_least(r, "hls", 1), 30, what="a first result")
        await asyncio.sleep(6)
        recs = await results(r, "hls")
        assert d.streams.runners["hls"].state.value == "live"
    recs = [x for x in recs if x["seq"] >= first[0]["seq"]]
    pts = [x["pts_s"] for x in recs]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)  # increasing
    rate = (len(pts) - 1) / (pts[-1] - pts[0])
    assert 1.8 <= rate <= 2.2, rate  # 2 fps +/- 10 %
    wall = (len(recs) - 1) / (recs[-1]["capture_ts"] - recs[0]["capture_ts"])
    assert 1.5 <= wall <= 2.6, wall  # and in real time


async def test_hls_server_killed_and_restarted_reconnects(r, redis_server, live_hls):
    _, http = live_hls
    cfg = make_config(redis_server.url, [{"id": "h", "url": http.url("index.m3u8"), "fps": 2.0,
                                         "stall_timeout_s": 3, "open_timeout_s": 2,
                                         "reconnect": {"initial_s": 0.2, "max_s": 1, "max_attempts": None}}])
    async with running(cfg) as d:
        await until(lambda: at_least(r, "h", 2), 30, what="results before the outage")
        http.stop()
        await until(lambda: d.streams.runners["h"].state.value in ("backoff", "stalled", "connecting"), 20,
                    what="the outage noticed")
        before = len(await results(r, "h"))
        await asyncio.sleep(2)
        http.start()
        await until(lambda: at_least(r, "h", before + 3), 40, what="results after the restart")
        assert d.streams.runners["h"].state.value == "live"
    evs = await events(r, "h")
    st = states(evs)
    assert st[:2] == ["connecting", "live"]
    assert "backoff" in st and st[st.index("backoff"):].count("live") >= 1
    backoff = next(e for e in evs if e["type"] == "state" and e["to"] == "backoff")
    assert backoff.get("reason")
    gap = [e for e in evs if e["type"] == "discontinuity"]
    assert gap, "the reconnect is published as a discontinuity"
    recs = await results(r, "h")
    assert any(x["discontinuity"] for x in recs)


@pytest.mark.skipif(not RtspServer.available(),
                    reason="Debian's GStreamer RTSP server (python3-gi) is not installed on this machine")
async def test_rtsp_stream_results(r, redis_server):
    srv = RtspServer(size=(640, 360)).start()
    try:
        cfg = make_config(redis_server.url, [{"id": "rtsp", "url": srv.url, "fps": 5.0}])
        async with running(cfg) as d:
            recs = await until(lambda: at_least(r, "rtsp", 10), 40, what="10 RTSP results")
            assert d.streams.runners["rtsp"].state.value == "live"
            relay = d.streams.runners["rtsp"]._source._relay  # FFmpeg went through streamd's RTSP relay
            assert relay is not None and relay.url.startswith("rtsp://127.0.0.1:") and relay.bytes_down > 10_000
    finally:
        srv.stop()
    assert recs[0]["width"] == 640 and recs[0]["height"] == 360
    pts = [x["pts_s"] for x in recs]
    assert pts == sorted(pts)
    rate = (len(pts) - 1) / (pts[-1] - pts[0])
    assert 4.0 <= rate <= 6.0, rate

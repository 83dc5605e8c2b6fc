"""A job's source must end (issue 17): a live feed given as a job's URL is refused up front (RTSP/RTMP/SRT: 422
live_source) or, once open (a live HLS playlist, media of unknown length), fails the job with reason_code
live_source at its first frame; with `max_duration_s` the job reads that much media time from its first frame and
ends `done` saying where it stopped (reason_code max_duration). A real live HLS playlist written by ffmpeg and served
over HTTP on loopback, a real redis-server."""

import aiohttp
import pytest

from conftest import OPER, h, running
from streamd.testing.servers import HttpDir, LiveHls
from test_jobs import P, all_records, api_cfg, post_job, sampled_pts, wait_job


async def test_a_live_source_without_a_bound_is_refused_or_fails_live_source(redis_server, clip, tmp_path):
    hls = LiveHls(clip, tmp_path / "hls").start()
    http = HttpDir(tmp_path / "hls").start()
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            for url in ("rtsp://127.0.0.1:8554/live", "rtmp://127.0.0.1/app/key", "srt://127.0.0.1:9000"):
                status, body, _ = await post_job(s, d, {"source": {"url": url}, "pipeline": "frame_info"})
                assert status == 422 and body["error"]["code"] == "live_source", (url, body)
                assert body["error"]["details"]["path"] == "max_duration_s"
            status, body, _ = await post_job(s, d, {"source": {"url": "srt://127.0.0.1:9000?mode=listener"},
                                                    "pipeline": "frame_info", "max_duration_s": 5})
            assert status == 422 and body["error"]["code"] == "server_mode_not_allowed", body
            status, doc, _ = await post_job(s, d, {"source": {"url": http.url("index.m3u8")},
                                                   "pipeline": "frame_info"})
            assert status == 202, doc
            doc = await wait_job(s, d, doc["id"], timeout_s=60)
            recs, _ = await all_records(s, d, doc["id"], limit=100)
    finally:
        http.stop()
        hls.stop()
    assert doc["state"] == "failed" and doc["reason_code"] == "live_source", doc
    assert "max_duration_s" in doc["reason"] and recs == []


async def test_max_duration_s_bounds_a_live_playlist_and_slices_a_recording(redis_server, clip, tmp_path):
    hls = LiveHls(clip, tmp_path / "hls").start()
    http = HttpDir(tmp_path / "hls").start()
    files = HttpDir(clip.parent).start()
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            status, doc, _ = await post_job(s, d, {"source": {"url": http.url("index.m3u8")}, "pipeline": "frame_info",
                                                   "sampling": {"mode": "fps", "fps": 4}, "max_duration_s": 2})
            assert status == 202, doc
            live = await wait_job(s, d, doc["id"], timeout_s=60)
            live_recs, _ = await all_records(s, d, doc["id"], limit=100)
            _, doc, _ = await post_job(s, d, {"source": {"url": files.url(clip.name)}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}, "max_duration_s": 1.5})
            sliced = await wait_job(s, d, doc["id"], timeout_s=60)
            sliced_recs, _ = await all_records(s, d, doc["id"], limit=100)
            async with s.get(f"{d.api_url}{P}/{doc['id']}", headers=h(OPER)) as resp:
                assert (await resp.json())["max_duration_s"] == 1.5
    finally:
        files.stop()
        http.stop()
        hls.stop()
    assert live["state"] == "done" and live["reason_code"] == "max_duration" and live["live"], live
    assert "max_duration_s (2 s" in live["reason"]
    pts = [x["pts_s"] for x in live_recs if x["type"] == "frame"]
    assert 7 <= len(pts) <= 8 and all(0 <= p - pts[0] < 2.0 for p in pts), pts
    assert live["progress"]["media_s_total"] == 2.0 and live["progress"]["fraction"] == 1.0
    assert sliced["state"] == "done" and sliced["reason_code"] == "max_duration" and not sliced["live"], sliced
    assert [x["pts_s"] for x in sliced_recs if x["type"] == "frame"] == [p for p in sampled_pts(clip, 2) if p < 1.5]
    assert sliced["progress"]["media_s_total"] == 1.5


async def test_http_media_of_unknown_length_is_live_unless_bounded(redis_server, clip, tmp_path):
    """An MPEG-TS sent chunked (no Content-Length, like a live HTTP feed): no bound, the job fails live_source at its
    first frame; with max_duration_s 1 it analyses the first second and ends done, max_duration."""
    import asyncio
    import shutil
    import subprocess

    from aiohttp import web

    from streamd.redis_server import free_port

    ts = tmp_path / "feed.ts"
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    "-c", "copy", "-f", "mpegts", str(ts)], check=True)
    data = ts.read_bytes()

    async def feed(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 32_768):
            await resp.write(data[i:i + 32_768])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/feed.ts", feed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/feed.ts"
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": url}, "pipeline": "frame_info"})
            refused = await wait_job(s, d, doc["id"], timeout_s=60)
            _, doc, _ = await post_job(s, d, {"source": {"url": url}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}, "max_duration_s": 1})
            bounded = await wait_job(s, d, doc["id"], timeout_s=60)
            recs, _ = await all_records(s, d, doc["id"], limit=100)
    finally:
        await runner.cleanup()
    assert refused["state"] == "failed" and refused["reason_code"] == "live_source", refused
    assert bounded["state"] == "done" and bounded["reason_code"] == "max_duration" and bounded["live"], bounded
    pts = [x["pts_s"] for x in recs if x["type"] == "frame"]
    assert len(pts) == 2 and pts[1] - pts[0] == pytest.approx(0.5, abs=0.02), pts


async def test_max_duration_s_counts_from_a_recordings_first_frame(redis_server, clip, tmp_path):
    """An MPEG-TS recording whose timestamps start at 100 s (ffmpeg -output_ts_offset), served with a
    Content-Length (a recording, not live): max_duration_s 1.5 analyses exactly the sampled frames of its first 1.5 s
    (counted from the first frame's PTS, not from PTS 0, which gave no records and still ended done)."""
    import shutil
    import subprocess

    ts = tmp_path / "media" / "offset.ts"
    ts.parent.mkdir()
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    "-c", "copy", "-output_ts_offset", "100", "-f", "mpegts", str(ts)], check=True)
    want = sampled_pts(ts, 2)
    assert want[0] >= 100
    want = [p for p in want if p - want[0] < 1.5]
    files = HttpDir(ts.parent).start()
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": files.url(ts.name)}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}, "max_duration_s": 1.5})
            doc = await wait_job(s, d, doc["id"], timeout_s=60)
            recs, _ = await all_records(s, d, doc["id"], limit=100)
    finally:
        files.stop()
    assert doc["state"] == "done" and doc["reason_code"] == "max_duration" and not doc["live"], doc
    assert [x["pts_s"] for x in recs if x["type"] == "frame"] == want and len(want) == 3, (recs, want)
    assert doc["progress"]["media_s_total"] == 1.5


def test_media_time_survives_a_pts_reset_and_a_wrap():
    """A live source's PTS resets (an HLS discontinuity, an encoder restart) or wraps (33 bits): media time still
    grows by about a frame there, so a max_duration_s bound trips (PTS differences went negative and never did)."""
    from streamd.jobs.sources import MediaClock

    c = MediaClock(fps=None)
    times = [c.advance(p) for p in (50.0, 50.5, 51.0, 0.2, 0.7, 1.2, 95443.0, 95443.5, 0.1, 0.6)]
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5])
    c = MediaClock(fps=0.05)  # one frame each 20 s: that is a step, not a jump
    assert [c.advance(p) for p in (7.0, 27.0, 47.0, 3.0)] == pytest.approx([0.0, 20.0, 40.0, 60.0])

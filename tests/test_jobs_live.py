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


def make_ts(clip, path, offset_s=None):
    """The clip as an MPEG-TS (its timestamps start near 1.4 s, or at `offset_s`), the stream copied by ffmpeg."""
    import shutil
    import subprocess

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    "-c", "copy", *(["-output_ts_offset", str(offset_s)] if offset_s is not None else []),
                    "-f", "mpegts", str(path)], check=True)
    return path


async def _serve(app):
    """Run an aiohttp app on a free loopback port: (its runner, its base URL)."""
    from aiohttp import web

    from streamd.redis_server import free_port

    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


class ChunkedServer:
    """aiohttp on loopback sending bytes chunked (no Content-Length): /once.ts the file once, then the end of the
    body; /endless.ts the file again and again (its PTS reset at each round) until the client goes away."""

    def __init__(self, data):
        self.data = data
        self.sent = 0  # bytes of /endless.ts written
        self.endless_done = False  # its handler saw the client go and returned
        self.flaky_requests = 0  # /flaky.ts: the first body is cut off half-way (no last chunk), the next is whole

    async def start(self):
        import asyncio

        from aiohttp import web


        async def once(request):
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(self.data), 32_768):
                await resp.write(self.data[i:i + 32_768])
                await asyncio.sleep(0.005)
            await resp.write_eof()
            return resp

        async def endless(request):
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            try:
                while True:
                    for i in range(0, len(self.data), 32_768):
                        await resp.write(self.data[i:i + 32_768])
                        self.sent += len(self.data[i:i + 32_768])
                        await asyncio.sleep(0.002)
            except (ConnectionError, RuntimeError):
                pass  # the client closed it
            finally:
                self.endless_done = True
            return resp

        async def flaky(request):
            self.flaky_requests += 1
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            cut = len(self.data) // 2 if self.flaky_requests == 1 else len(self.data)
            for i in range(0, cut, 32_768):
                await resp.write(self.data[i:min(i + 32_768, cut)])
                await asyncio.sleep(0.005)
            if cut < len(self.data):
                request.transport.abort()  # the connection dropped mid-body
                return resp
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/once.ts", once)
        app.router.add_get("/flaky.ts", flaky)
        app.router.add_get("/endless.ts", endless)
        self.runner, self.url = await _serve(app)
        return self

    async def stop(self):
        await self.runner.cleanup()


async def test_http_media_of_unknown_length_is_read_to_its_end_or_the_cap(redis_server, clip, tmp_path):
    """An MPEG-TS sent chunked (no Content-Length) is a file that ends: a job reads it to its end and ends done
    with exactly its sampled frames (it failed live_source); max_duration_s 1 still bounds it. The same bytes sent
    again and again (an endless chunked body, its PTS reset at each round) stop at jobs.unknown_length_cap_s of
    media: done, reason_code unknown_length_cap, the connection closed (the server's writes end)."""
    from conftest import until

    ts = make_ts(clip, tmp_path / "media" / "feed.ts")
    want = sampled_pts(ts, 2)
    srv = await ChunkedServer(ts.read_bytes()).start()
    try:
        async with running(api_cfg(redis_server.url, unknown_length_cap_s=8)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/once.ts"}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}})
            whole = await wait_job(s, d, doc["id"], timeout_s=60)
            whole_recs, _ = await all_records(s, d, doc["id"], limit=100)
            _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/once.ts"}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}, "max_duration_s": 1})
            bounded = await wait_job(s, d, doc["id"], timeout_s=60)
            recs, _ = await all_records(s, d, doc["id"], limit=100)
            _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/endless.ts"}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}})
            capped = await wait_job(s, d, doc["id"], timeout_s=90)
            capped_recs, _ = await all_records(s, d, doc["id"], limit=100)
            await until(lambda: srv.endless_done, 20, what="the endless body's writer sees the client go")
    finally:
        await srv.stop()
    assert whole["state"] == "done" and whole["reason_code"] is None, whole
    assert not whole["live"] and whole["unknown_length"], whole
    assert [x["pts_s"] for x in whole_recs if x["type"] == "frame"] == want and len(want) == 12
    assert whole["progress"]["fraction"] == 1.0
    assert whole["progress"]["media_s_done"] == pytest.approx(want[-1] - want[0], abs=1e-3)
    assert bounded["state"] == "done" and bounded["reason_code"] == "max_duration", bounded
    assert not bounded["live"] and bounded["unknown_length"] and bounded["progress"]["media_s_total"] == 1.0
    pts = [x["pts_s"] for x in recs if x["type"] == "frame"]
    assert len(pts) == 2 and pts[1] - pts[0] == pytest.approx(0.5, abs=0.02), pts
    assert capped["state"] == "done" and capped["reason_code"] == "unknown_length_cap", capped
    assert "jobs.unknown_length_cap_s (8 s" in capped["reason"] and capped["unknown_length"]
    frames = [x for x in capped_recs if x["type"] == "frame"]
    # 12 frames of the first round (0-5.5 s), then the second round's from 6 s of media on, up to 8 s
    assert 15 <= len(frames) <= 17 and frames[12]["pts_s"] < frames[11]["pts_s"], [x["pts_s"] for x in frames]
    assert 7 <= capped["progress"]["media_s_done"] < 8, capped["progress"]
    assert srv.sent < 2 * len(srv.data) + (16 << 20)  # read as the job went, never far ahead of it


async def test_a_chunked_body_cut_off_is_read_again_not_taken_for_its_end(redis_server, clip, tmp_path):
    """Media of unknown length whose connection drops half-way (the chunked body has no last chunk): that is no
    end of the media; the job reads it again from the start, skips the frames it already decoded, and ends done
    with the whole file's frames, none twice."""
    ts = make_ts(clip, tmp_path / "media" / "feed.ts")
    want = sampled_pts(ts, 2)
    srv = await ChunkedServer(ts.read_bytes()).start()
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/flaky.ts"}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}})
            doc = await wait_job(s, d, doc["id"], timeout_s=60)
            recs, _ = await all_records(s, d, doc["id"], limit=100)
    finally:
        await srv.stop()
    assert doc["state"] == "done" and doc["reason_code"] is None and doc["unknown_length"], doc
    assert srv.flaky_requests == 2
    pts = [x["pts_s"] for x in recs if x["type"] == "frame"]
    # the sampling grid starts again after the reconnect: the frames around it may shift by less than a period
    assert pts[0] == want[0] and abs(pts[-1] - want[-1]) < 0.5 and 12 <= len(pts) <= 13, (pts, want)
    assert all(0 < b - a <= 0.5 + 1e-3 for a, b in zip(pts, pts[1:])), pts


async def test_an_endless_body_whose_media_time_hardly_moves_still_ends(redis_server, clip, tmp_path):
    """A hostile endless chunked body whose timestamps barely advance (the clip with its PTS divided by 1000: 30
    frames a second of wall-clock decoding, 1/1000 of that in media time): media time would take ages to reach the
    cap, so the decoded frames are bounded too (240 per second of jobs.unknown_length_cap_s): the job fails
    too_large after at most 481 frames ((1 s + 1 s of slack) x 240 + 1), and the connection is closed."""
    import shutil
    import subprocess

    from conftest import until

    ts = tmp_path / "media" / "slow.ts"
    ts.parent.mkdir(parents=True)
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    "-c", "copy", "-bsf:v", "setts=pts=PTS/1000:dts=DTS/1000", "-f", "mpegts", str(ts)], check=True)
    srv = await ChunkedServer(ts.read_bytes()).start()
    try:
        async with running(api_cfg(redis_server.url, unknown_length_cap_s=1)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/endless.ts"}, "pipeline": "frame_info",
                                              "sampling": {"mode": "every_frame"}})
            doc = await wait_job(s, d, doc["id"], timeout_s=90)
            recs, _ = await all_records(s, d, doc["id"], limit=500)
            await until(lambda: srv.endless_done, 20, what="the endless body's writer sees the client go")
    finally:
        await srv.stop()
    assert doc["state"] == "failed" and doc["reason_code"] == "too_large", doc
    assert "481 frames" in doc["reason"] and doc["unknown_length"], doc
    frames = [x for x in recs if x["type"] == "frame"]
    assert 100 < len(frames) <= 481 and doc["progress"]["media_s_done"] < 1, (len(frames), doc["progress"])


async def test_unknown_length_cap_is_validated_naming_the_key(tmp_path):
    """jobs.unknown_length_cap_s must be a finite number of seconds above 0: else a config error naming the key."""
    from streamd.config import parse_config
    from streamd.errors import ConfigError

    assert parse_config({"jobs": {"unknown_length_cap_s": 30}}, environ={}).jobs.unknown_length_cap_s == 30
    for bad in (0, -5, float("inf"), float("nan"), "soon", 30 * 86_400):
        with pytest.raises(ConfigError) as e:
            parse_config({"jobs": {"unknown_length_cap_s": bad}}, environ={})
        assert "jobs.unknown_length_cap_s" in str(e.value), (bad, str(e.value))


def _frames_done(s, d, jid, get_job):
    async def cond():
        p = (await get_job(s, d, jid))["progress"]
        return p if p["frames_done"] > 0 else None
    return cond


async def test_progress_follows_media_time_across_a_pts_reset(redis_server, clip, tmp_path):
    """A live HLS playlist (no #EXT-X-ENDLIST) of two 6 s MPEG-TS segments, the second after a discontinuity with
    its PTS starting again at 1.4 s; max_duration_s 9 at fps 2. The bound counts media time across the reset (the
    MediaClock) and so does progress: media_s_done reaches 8.5 s (the last frame's media time; it stayed at 5.5 s,
    the first segment's, as PTS minus the first PTS), frames_done 18, fraction monotonic up to 1, an ETA while it
    runs."""
    from conftest import until
    from test_jobs import get_job

    hls = tmp_path / "hls"
    make_ts(clip, hls / "a.ts")
    (hls / "b.ts").write_bytes((hls / "a.ts").read_bytes())
    head = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:6.0,\na.ts\n"
    (hls / "index.m3u8").write_text(head)  # a job starts at a live playlist's newest segment: a.ts, then b.ts
    http = HttpDir(hls).start()
    seen = []
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": http.url("index.m3u8")}, "pipeline": "frame_info",
                                              "sampling": {"mode": "fps", "fps": 2}, "max_duration_s": 9})
            first = await until(_frames_done(s, d, doc["id"], get_job), 30, what="the job's first frames")
            seen.append(first)
            (hls / "index.m3u8").write_text(head + "#EXT-X-DISCONTINUITY\n#EXTINF:6.0,\nb.ts\n")
            doc = await wait_job(s, d, doc["id"], seen=seen, timeout_s=60)
            recs, _ = await all_records(s, d, doc["id"], limit=100)
    finally:
        http.stop()
    assert doc["state"] == "done" and doc["reason_code"] == "max_duration" and doc["live"], doc
    pts = [x["pts_s"] for x in recs if x["type"] == "frame"]
    assert len(pts) == 18 and pts[12] < pts[11], pts  # the reset is in the job's frames
    p = doc["progress"]
    assert p["frames_done"] == 18 and p["fraction"] == 1.0 and p["media_s_total"] == 9.0, p
    assert p["media_s_done"] == pytest.approx(8.5, abs=0.05), p
    seen.append(p)
    for key in ("fraction", "media_s_done", "frames_done"):
        assert all(a[key] <= b[key] for a, b in zip(seen, seen[1:])), (key, seen)
    assert all(x["eta_s"] is not None for x in seen[:-1] if 0 < x["fraction"] < 1), seen


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


def ts_variant(clip, path, *args):
    """The clip as an MPEG-TS through ffmpeg with `args` (a re-encode, a bitstream filter ...)."""
    import shutil
    import subprocess

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    *args, "-f", "mpegts", str(path)], check=True)
    return path


def all_pts(path):
    with __import__("av").open(str(path)) as c:
        st = c.streams.video[0]
        return [round(float(f.pts * st.time_base), 6) for f in c.decode(st)]


class ScriptedServer:
    """aiohttp on loopback: GET /<name> answers its script's step for that request (the last step again after
    the script's end). A step is (bytes, cut, sized[, headers]): `cut` a fraction of the bytes after which the
    connection is dropped mid-body (None: the whole body, ended properly; ("end", f): the body ends properly after
    that fraction); `sized` sends a Content-Length, else the body is chunked; `headers` (ETag ...) go with it."""

    def __init__(self, scripts):
        self.scripts = scripts
        self.requests = {name: 0 for name in scripts}

    async def start(self):
        import asyncio

        from aiohttp import web


        async def handler(request):
            name = request.match_info["name"]
            steps = self.scripts[name]
            data, cut, sized, *extra = steps[min(self.requests[name], len(steps) - 1)]
            self.requests[name] += 1
            resp = web.StreamResponse(headers=extra[0] if extra else None)
            if sized:
                resp.content_length = len(data)
            else:
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            end = len(data)
            if isinstance(cut, tuple):
                end = int(len(data) * cut[1])
            elif cut is not None:
                end = int(len(data) * cut)
            for i in range(0, end, 32_768):
                await resp.write(data[i:min(i + 32_768, end)])
                await asyncio.sleep(0.003)
            if cut is not None and not isinstance(cut, tuple):
                await asyncio.sleep(0.1)  # what was written reaches the client before the connection drops
                request.transport.abort()  # the connection dropped mid-body
                return resp
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/{name}", handler)
        self.runner, self.url = await _serve(app)
        return self

    async def stop(self):
        await self.runner.cleanup()


async def _run_jobs(redis_server, srv, jobs, frames=None, **cfg):
    """Each (name, sampling) job on the server's /<name>, in turn: {name: (document, its frames' PTS)}; the frame
    records themselves in `frames` when given."""
    out = {}
    frames = {} if frames is None else frames
    async with running(api_cfg(redis_server.url, **cfg)) as d, aiohttp.ClientSession() as s:
        for name, sampling in jobs:
            _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/{name}"}, "pipeline": "frame_info",
                                              "sampling": sampling})
            doc = await wait_job(s, d, doc["id"], timeout_s=90)
            recs, _ = await all_records(s, d, doc["id"], limit=1000)
            out[name] = doc, [x["pts_s"] for x in recs if x["type"] == "frame"]
            frames[name] = [x for x in recs if x["type"] == "frame"]
    return out


async def test_a_body_read_again_after_a_cut_must_be_the_same_media(redis_server, clip, tmp_path):
    """Media of unknown length cut off mid-way is read again and its frames already decoded are skipped, counted:
    that is only right if the new body is the same media. One that ends before the frames already decoded (a
    shorter body), or whose frame at that count is not the one decoded last (another video), fails the job
    source_changed (it ended done, the rest never read, or mixing the two videos' frames)."""
    data = make_ts(clip, tmp_path / "media" / "feed.ts").read_bytes()
    other = make_ts(clip, tmp_path / "media" / "other.ts", offset_s=100).read_bytes()
    srv = await ScriptedServer({"shorter.ts": [(data, 0.75, False), (data, ("end", 0.3), False)],
                                "other.ts": [(data, 0.5, False), (other, None, False)],
                                "same.ts": [(data, 0.5, False), (data, None, False)]}).start()
    try:
        out = await _run_jobs(redis_server, srv, [(n, {"mode": "fps", "fps": 2})
                                                  for n in ("shorter.ts", "other.ts", "same.ts")])
    finally:
        await srv.stop()
    doc, pts = out["shorter.ts"]
    assert doc["state"] == "failed" and doc["reason_code"] == "source_changed", doc
    assert "before the" in doc["reason"] and srv.requests["shorter.ts"] == 2
    doc, pts = out["other.ts"]
    assert doc["state"] == "failed" and doc["reason_code"] == "source_changed", doc
    assert all(p < 50 for p in pts), pts  # none of the other video's frames
    doc, pts = out["same.ts"]  # the same body again: done, every frame once, on the sampling grid
    assert doc["state"] == "done" and doc["reason_code"] is None, doc
    assert pts == sampled_pts(tmp_path / "media" / "feed.ts", 2), pts


async def test_a_reconnect_that_changes_sized_and_chunked_fails_source_changed(redis_server, clip, tmp_path):
    """A job's HTTP media cut off mid-way whose reconnect is sized differently (a Content-Length first, chunked
    on the retry, or the other way round) cannot be resumed (by position, by frames counted): it fails
    source_changed (it published every frame again, and the cap did not apply). The sized one is an MP4 with its
    index first (an MPEG-TS of a known size is read at its end as it opens: cut, it would not open)."""
    import shutil
    import subprocess

    data = make_ts(clip, tmp_path / "media" / "feed.ts").read_bytes()
    mp4 = tmp_path / "media" / "fast.mp4"
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    "-c", "copy", "-movflags", "+faststart", str(mp4)], check=True)
    srv = await ScriptedServer({"sized_first.mp4": [(mp4.read_bytes(), 0.5, True), (mp4.read_bytes(), None, False)],
                                "chunked_first.ts": [(data, 0.5, False), (data, None, True)]}).start()
    try:
        out = await _run_jobs(redis_server, srv, [(n, {"mode": "fps", "fps": 2})
                                                  for n in ("sized_first.mp4", "chunked_first.ts")])
    finally:
        await srv.stop()
    for name, (doc, pts) in out.items():
        assert doc["state"] == "failed" and doc["reason_code"] == "source_changed", (name, doc)
        assert srv.requests[name] == 2, name
        assert len(pts) == len(set(pts)), (name, pts)  # no frame twice


async def test_a_recording_replaced_on_the_origin_between_connections_is_not_resumed_into(redis_server, clip,
                                                                                          tmp_path):
    """HTTP media of a known size cut off mid-way is resumed by position on the reconnect: right only if the body
    is the one read before. Replaced on the origin in between (another video: another ETag, or another
    Last-Modified where there is no ETag), the job fails source_changed and publishes none of the other video's
    frames (it went on with them and ended done); the same ETag again resumes (done, every frame once)."""
    import shutil
    import subprocess

    from streamd.samples import make_pan_clip

    def faststart(src, dst):
        subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(src),
                        "-c", "copy", "-movflags", "+faststart", str(dst)], check=True)
        return dst.read_bytes()

    (tmp_path / "media").mkdir(parents=True, exist_ok=True)
    a = faststart(clip, tmp_path / "media" / "a.mp4")
    b = faststart(make_pan_clip(tmp_path / "bus.mp4", photo="bus.jpg", seconds=6, fps=30, size=(640, 360)),
                  tmp_path / "media" / "b.mp4")
    lm1, lm2 = "Sat, 05 Dec 2026 10:00:00 GMT", "Sun, 06 Dec 2026 10:00:00 GMT"
    srv = await ScriptedServer({
        "etag.mp4": [(a, 0.5, True, {"ETag": '"a1"'}), (b, None, True, {"ETag": '"b2"'})],
        "modified.mp4": [(a, 0.5, True, {"Last-Modified": lm1}), (b, None, True, {"Last-Modified": lm2})],
        "same.mp4": [(a, 0.5, True, {"ETag": '"a1"'}), (a, None, True, {"ETag": '"a1"'})]}).start()
    recs = {}
    try:
        out = await _run_jobs(redis_server, srv, [(n, {"mode": "every_frame"}) for n in srv.scripts], frames=recs)
    finally:
        await srv.stop()
    want = all_pts(tmp_path / "media" / "a.mp4")
    for name in ("etag.mp4", "modified.mp4"):
        doc, pts = out[name]
        assert doc["state"] == "failed" and doc["reason_code"] == "source_changed", (name, doc)
        assert "changed between requests" in doc["reason"] and srv.requests[name] == 2, (name, doc)
        assert len(pts) < len(want) and pts == want[:len(pts)], (name, len(pts))  # only A's frames before the cut
    doc, pts = out["same.mp4"]
    assert doc["state"] == "done" and pts == want, (doc, len(pts))


async def test_a_cut_body_with_b_frames_gives_every_frame_once(redis_server, clip, tmp_path):
    """H.264 with B-frames sent chunked and cut off mid-way: the failed read looks like an end to FFmpeg, which
    drains its decoder; those frames (and a cut last packet) are not counted or published, so the read again
    gives every frame exactly once, in order (a frame was missed and another given twice, or the job failed)."""
    ts = ts_variant(clip, tmp_path / "media" / "bframes.ts", "-c:v", "libx264", "-preset", "veryfast", "-bf", "3",
                    "-g", "60", "-pix_fmt", "yuv420p")
    want = all_pts(ts)
    data = ts.read_bytes()
    scripts = {f"cut{i}.ts": [(data, f, False), (data, None, False)] for i, f in enumerate((0.37, 0.52, 0.81))}
    srv = await ScriptedServer({"whole.ts": [(data, None, False)], **scripts}).start()
    recs = {}
    try:
        out = await _run_jobs(redis_server, srv, [(n, {"mode": "every_frame"}) for n in ("whole.ts", *scripts)],
                              frames=recs)
    finally:
        await srv.stop()
    bright = {x["pts_s"]: x["outputs"]["frame_info"]["mean_brightness"] for x in recs["whole.ts"]}
    assert sorted(bright) == want
    for name in scripts:
        doc, pts = out[name]
        assert doc["state"] == "done" and doc["reason_code"] is None, (name, doc)
        assert srv.requests[name] == 2, name
        assert pts == want, (name, [p for p in pts if pts.count(p) > 1], sorted(set(want) - set(pts)))
        # each frame as decoded from the whole body (none decoded from a packet cut short)
        bad = [(x["pts_s"], x["outputs"]["frame_info"]["mean_brightness"], bright[x["pts_s"]]) for x in recs[name]
               if x["outputs"]["frame_info"]["mean_brightness"] != bright[x["pts_s"]]]
        assert not bad, (name, bad)


async def test_a_fast_feed_of_unknown_length_ends_at_the_cap_not_too_large(redis_server, clip, tmp_path):
    """An endless chunked feed of 480 frames a second (the clip looped, its timestamps / 16) with jobs.unknown_length_cap_s 1
    ends done at the cap (reason_code unknown_length_cap): the frame bound ((cap + a sampling period + 1 s) x 240)
    has room for the 481 frames to the one at the cap (every frame: just), and the source failing too_large after
    the job stopped at its bound (the decoder runs ahead of the cap's check) fails nothing. It failed too_large
    (241 frames)."""
    import shutil
    import subprocess

    from conftest import until

    # the clip 4 times (24 s, its timestamps going on), at 16x: 1.5 s of media, then the same again (PTS reset)
    looped = tmp_path / "media" / "looped.ts"
    looped.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-stream_loop", "3",
                    "-i", str(clip), "-c", "copy", "-f", "mpegts", str(looped)], check=True)
    ts = ts_variant(looped, tmp_path / "media" / "fast.ts", "-c", "copy", "-bsf:v", "setts=pts=PTS/16:dts=DTS/16")
    assert len(all_pts(ts)) == 720
    srv = await ChunkedServer(ts.read_bytes()).start()
    try:
        async with running(api_cfg(redis_server.url, unknown_length_cap_s=1)) as d, aiohttp.ClientSession() as s:
            docs = []
            for sampling in ({"mode": "fps", "fps": 2}, {"mode": "every_frame"}):
                _, doc, _ = await post_job(s, d, {"source": {"url": f"{srv.url}/endless.ts"},
                                                  "pipeline": "frame_info", "sampling": sampling})
                docs.append(await wait_job(s, d, doc["id"], timeout_s=90))
                await until(lambda: srv.endless_done, 20, what="the endless body's writer sees the client go")
                srv.endless_done = False
    finally:
        await srv.stop()
    for doc in docs:
        assert doc["state"] == "done" and doc["reason_code"] == "unknown_length_cap", doc


async def test_cutting_each_body_further_on_cannot_make_a_job_decode_without_bound(redis_server, clip, tmp_path):
    """An origin that cuts each chunked body a little further on makes the job decode the start again at each
    reconnect: those frames count too (at most twice the frame bound of the cap in all), so it fails too_large
    (it decoded 3x the media and ended done). The PTS / 1000: media time stays under the cap."""
    ts = ts_variant(clip, tmp_path / "media" / "slow.ts", "-c", "copy", "-bsf:v", "setts=pts=PTS/1000:dts=DTS/1000")
    data = ts.read_bytes()
    srv = await ScriptedServer({"growing.ts": [(data, 0.5, False), (data, 0.9, False), (data, 0.95, False),
                                               (data, None, False)]}).start()
    try:
        # every frame: at most int((0.05 + 1) * 240) + 1 = 253 new frames, 506 decoded in all; 180 frames a body
        out = await _run_jobs(redis_server, srv, [("growing.ts", {"mode": "every_frame"})], unknown_length_cap_s=0.05,
                              attempts=6)
    finally:
        await srv.stop()
    doc, pts = out["growing.ts"]
    assert doc["state"] == "failed" and doc["reason_code"] == "too_large", doc
    assert "506 frames" in doc["reason"] and "decoded again" in doc["reason"], doc
    assert srv.requests["growing.ts"] == 4 and len(pts) == len(set(pts)) <= 180, pts

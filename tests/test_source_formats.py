"""Bytes from an origin or an upload never make FFmpeg open another file: an ffconcat list (`file secret.mp4`)
served as plain HTTP media, as an HLS segment, or uploaded as a job's file was probed as concat and FFmpeg decoded
the daemon's local file. Every open of such bytes now allows media containers only (sources/formats.py)."""

from __future__ import annotations

import shutil

import aiohttp

from conftest import make_config, results, running, until
from streamd.testing.egress import Canary
from test_hls import ALLOWED, m3u, playlist, stream
from test_jobs import all_records, api_cfg, post_upload, wait_job

CONCAT = b"ffconcat version 1.0\nfile secret.mp4\n"


async def test_http_media_that_is_a_concat_list_opens_no_local_file(r, redis_server, clip, tmp_path, monkeypatch):
    shutil.copy(clip, tmp_path / "secret.mp4")
    monkeypatch.chdir(tmp_path)  # the daemon's working directory: a relative `file` entry names this file
    origin = Canary(ALLOWED, {"/clip.mp4": (200, {"Content-Type": "video/mp4"}, CONCAT)}).start()
    try:
        cfg = make_config(redis_server.url, [], egress={"allow": [f"{ALLOWED}/32"]})
        async with running(cfg) as d:
            d.streams.add_stream(stream("http", origin.url("/clip.mp4")), "api")
            runner = d.streams.runners["http"]
            await until(lambda: runner.reason_code == "not_media", 20, what="not_media")
            assert "not a media stream" in (runner.reason or "")
            assert await results(r, "http") == []
    finally:
        origin.stop()


async def test_an_hls_segment_that_is_a_concat_list_opens_no_local_file(r, redis_server, clip, tmp_path,
                                                                          monkeypatch):
    shutil.copy(clip, tmp_path / "secret.mp4")
    monkeypatch.chdir(tmp_path)
    origin = Canary(ALLOWED, {"/live.m3u8": m3u(playlist(["/seg0.mp4"], endlist=True)),
                              "/seg0.mp4": (200, {"Content-Type": "video/mp4"}, CONCAT)}).start()
    try:
        cfg = make_config(redis_server.url, [], egress={"allow": [f"{ALLOWED}/32"]})
        async with running(cfg) as d:
            d.streams.add_stream(stream("hls", origin.url("/live.m3u8")), "api")
            runner = d.streams.runners["hls"]
            await until(lambda: runner.reason_code == "corrupt_input", 20, what="corrupt_input")
            assert runner.frames == 0
            assert await results(r, "hls") == []
    finally:
        origin.stop()


async def test_an_uploaded_concat_list_opens_no_other_file(redis_server, clip, tmp_path):
    """ffconcat resolves `file` entries against the list's own path: the upload directory (other uploads)."""
    updir = tmp_path / "up"
    updir.mkdir()
    shutil.copy(clip, updir / "secret.mp4")
    cfg = api_cfg(redis_server.url, upload_dir=str(updir))
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        status, body = await post_upload(s, d, CONCAT, filename="pan.mp4")
        assert status == 202, body
        doc = await wait_job(s, d, body["id"], timeout_s=30)
        recs, _ = await all_records(s, d, body["id"], limit=1000)
    assert doc["state"] == "failed", doc
    assert doc["reason_code"] == "not_media", doc
    assert recs == []


async def test_every_supported_container_still_opens(r, redis_server, clip, tmp_path):
    """Plain HTTP media in the containers streamd reads (through a file object, with the whitelists) plays."""
    import av

    from streamd.sources.formats import open_options

    for fmt, ext in (("mp4", "mp4"), ("mpegts", "ts"), ("matroska", "mkv"), ("webm", "webm"), ("flv", "flv"),
                     ("avi", "avi"), ("h264", "h264"), ("mjpeg", "mjpeg")):
        out = tmp_path / f"c.{ext}"
        codec = {"webm": "libvpx", "mjpeg": "mjpeg", "avi": "mpeg4", "flv": "flv"}.get(fmt, "libx264")
        with av.open(str(clip)) as src, av.open(str(out), "w", format=fmt) as dst:
            st = dst.add_stream(codec, rate=30)
            st.width, st.height, st.pix_fmt = 320, 180, "yuvj420p" if codec == "mjpeg" else "yuv420p"
            for i, f in enumerate(src.decode(video=0)):
                if i == 10:
                    break
                for p in st.encode(f.reformat(320, 180, st.pix_fmt)):
                    dst.mux(p)
            for p in st.encode():
                dst.mux(p)
        with open(out, "rb") as fh, av.open(fh, options=open_options(True)) as c:
            assert sum(1 for _ in c.decode(video=0)) == 10, fmt

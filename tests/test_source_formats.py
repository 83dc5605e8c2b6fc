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
            await until(lambda: runner.state.value == "failed", 20, what="failed for good")  # no retry forever
            assert runner.reason_code == "not_media", runner.reason
            assert "format whitelist" in runner.reason and "ffmpeg_options.format_whitelist" in runner.reason
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
    assert "ffmpeg_options.format_whitelist" in str(doc), doc  # says why, not "Invalid argument"
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


def _write_media(path, fmt, codec, pix="yuv420p", n=3):
    """A small clip (PyAV) in `fmt`; single-image formats get one frame. MXF wants 25 fps, DV NTSC's size."""
    from fractions import Fraction

    import av
    import numpy as np

    w, h, rate = (720, 480, Fraction(30000, 1001)) if fmt == "dv" else (64, 48, 25)
    with av.open(str(path), "w", format=fmt) as c:
        st = c.add_stream(codec, rate=rate)
        st.width, st.height, st.pix_fmt = w, h, pix
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 40, np.uint8), format="rgb24")
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


COMMON = (("a.mxf", "mxf", "mpeg2video", "yuv420p", 3), ("a.dv", "dv", "dvvideo", "yuv411p", 3),
          ("a.nut", "nut", "mpeg4", "yuv420p", 3), ("a.tiff", "image2", "tiff", "rgb24", 1),
          ("a.pgm", "image2", "pgm", "gray", 1))


async def test_local_files_in_common_containers_play(r, redis_server, tmp_path):
    """MXF, DV, NUT and single images (tiff_pipe, pgm_pipe) were refused by the whitelist as "Invalid argument"."""
    specs = []
    for name, fmt, codec, pix, n in COMMON:
        _write_media(tmp_path / name, fmt, codec, pix, n)
        specs.append({"id": name.replace(".", "_"), "url": str(tmp_path / name), "pipeline": "frame_info",
                      "fps": None})
    cfg = make_config(redis_server.url, specs)
    async with running(cfg) as d:
        for spec in specs:
            runner = d.streams.runners[spec["id"]]
            await until(lambda: runner.frames > 0 or runner.state.value == "failed", 20, what=spec["id"])
            assert runner.frames > 0, (spec["id"], runner.reason_code, runner.reason)


async def test_uploads_in_common_containers_run(redis_server, tmp_path):
    updir = tmp_path / "up"
    updir.mkdir()
    cfg = api_cfg(redis_server.url, upload_dir=str(updir))
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        for name, fmt, codec, pix, n in COMMON[:4]:
            _write_media(tmp_path / name, fmt, codec, pix, n)
            status, body = await post_upload(s, d, (tmp_path / name).read_bytes(), filename=name)
            assert status == 202, body
            doc = await wait_job(s, d, body["id"], timeout_s=30)
            assert doc["state"] == "done", (name, doc)


def test_a_local_concat_list_is_refused_with_the_option_named(tmp_path):
    """A local file outside the whitelist says which option widens it and fails for good."""
    import av

    from streamd.sources.av import _open_error
    from streamd.sources.formats import open_options

    (tmp_path / "list.txt").write_bytes(CONCAT)
    try:
        av.open(str(tmp_path / "list.txt"), options=open_options(False)).close()
    except av.error.FFmpegError as e:
        err = _open_error(e, "file", 5.0)
    else:
        raise AssertionError("a concat list opened")
    assert err.permanent and err.code == "not_media", err
    assert "ffmpeg_options.format_whitelist" in str(err) and "Invalid argument" not in str(err).split(";")[0]

"""streamd's own HLS follower (streamd/sources/hls.py) against real HTTP servers on loopback: segments made by
ffmpeg from a real clip, playlists written by the tests so that each case is exact. Egress cases serve the
playlist from 127.0.0.2 (allowed by the policy) and count requests on a canary on 127.0.0.3 (refused)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time

import av
import pytest

from streamd.config import StreamConfig
from streamd.testing.egress import Canary, connect_guard, redirect
from conftest import events, make_config, results, running, states, until

ALLOWED = "127.0.0.2"
CANARY = "127.0.0.3"


@pytest.fixture(scope="module")
def segs(clip, tmp_path_factory) -> dict:
    """The clip as 1 s MPEG-TS segments (keyframe every 15 frames), their frame counts and durations."""
    out = tmp_path_factory.mktemp("hlsvod")
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip), "-an",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-f", "hls", "-hls_time", "1",
                    "-hls_list_size", "0", "-hls_playlist_type", "vod", "-hls_segment_filename",
                    str(out / "s%d.ts"), str(out / "ffmpeg.m3u8")], check=True)
    names = sorted((p.name for p in out.glob("s*.ts")), key=lambda n: int(n[1:-3]))
    frames = {}
    for n in names:
        with av.open(str(out / n)) as c:
            frames[n] = sum(1 for _ in c.decode(video=0))
    return {"dir": out, "names": names, "frames": frames, "bytes": {n: (out / n).read_bytes() for n in names}}


def playlist(entries: list[str], *, endlist: bool = False, seq: int = 0, extra: str = "") -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:2", f"#EXT-X-MEDIA-SEQUENCE:{seq}"]
    if extra:
        lines.append(extra)
    for e in entries:
        lines += ([e] if e.startswith("#") else ["#EXTINF:1.0,", e])
    if endlist:
        lines.append("#EXT-X-ENDLIST")
    return ("\n".join(lines) + "\n").encode()


def m3u(body: bytes) -> tuple[int, dict, bytes]:
    return (200, {"Content-Type": "application/vnd.apple.mpegurl"}, body)


def ts(data: bytes) -> tuple[int, dict, bytes]:
    return (200, {"Content-Type": "video/mp2t"}, data)


def seg_routes(segs: dict) -> dict:
    return {f"/{n}": ts(segs["bytes"][n]) for n in segs["names"]}


def stream(sid: str, url: str, **kw) -> StreamConfig:
    return StreamConfig.model_validate({"id": sid, "url": url, "pipeline": "frame_info", "fps": None,
                                        "reconnect": {"initial_s": 0.2, "max_s": 0.5, "max_attempts": None}, **kw})


def egress_cfg(redis_url: str):
    return make_config(redis_url, [], egress={"allow": [f"{ALLOWED}/32"]})


async def _reason_code(r, sid: str, code: str) -> bool:
    return any(e.get("reason_code") == code for e in await events(r, sid, "state"))


async def test_vod_playlist_plays_every_frame_once_then_stops(r, redis_server, segs):
    total = sum(segs["frames"].values())
    with Canary(ALLOWED, {"/vod.m3u8": m3u(playlist(segs["names"], endlist=True)), **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "vod", "url": origin.url("/vod.m3u8"), "fps": None}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["vod"].state.value == "stopped", 30, what="the recording's end")
            await asyncio.sleep(1.5)  # a replay would publish more
            assert origin.hits("/vod.m3u8") == 1
    recs = await results(r, "vod")
    pts = [x["pts_s"] for x in recs]
    assert len(pts) == total and len(set(pts)) == total
    last = (await events(r, "vod", "state"))[-1]
    assert last["to"] == "stopped" and last["reason_code"] == "ended"
    assert all(x["capture_ts_source"] == "receive" for x in recs)


async def test_frozen_live_playlist_goes_stalled_and_republishes_nothing(r, redis_server, segs):
    names = segs["names"][:3]
    with Canary(ALLOWED, {"/live.m3u8": m3u(playlist(names)), **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "frozen", "url": origin.url("/live.m3u8"), "fps": None,
                                              "stall_timeout_s": 2, "hls": {"start": "first"}, "drop_policy": "wait",
                                              "reconnect": {"initial_s": 0.2, "max_s": 0.5, "max_attempts": None}}])
        async with running(cfg) as d:
            runner = d.streams.runners["frozen"]
            await until(lambda: runner.frames >= sum(segs["frames"][n] for n in names), 20, what="3 segments")
            t_last = time.time()

            async def stalled_at():
                return next((e["ts"] for e in await events(r, "frozen", "state") if e["to"] == "stalled"), None)

            t_stalled = await until(stalled_at, 10, what="stalled")
            assert t_stalled - t_last <= 2 + 1.5
            await asyncio.sleep(4)  # reconnects follow; none may republish a segment
    recs = await results(r, "frozen")
    pts = [x["pts_s"] for x in recs]
    assert len(pts) == len(set(pts)) == sum(segs["frames"][n] for n in names)
    assert states(await events(r, "frozen")).count("stalled") >= 1


def _silent_server(host: str) -> tuple[socket.socket, int]:
    """A TCP server that reads each request and never answers (a hung segment origin)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)  # kept open, never answered

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


async def test_a_hung_segment_fetch_goes_stalled_on_time(r, redis_server, segs):
    """A live playlist whose second segment's origin accepts and never answers: the stream is `stalled` within
    stall_timeout_s (+1.5 s) of its last frame, although segment_timeout_s is much larger (the watchdog is not
    suppressed while a segment fetch hangs)."""
    srv, port = _silent_server(ALLOWED)
    n = segs["names"]
    try:
        with Canary(ALLOWED, seg_routes(segs)) as origin:
            entries = [origin.url("/" + n[0]), f"http://{ALLOWED}:{port}/hung.ts"] + [origin.url("/" + x) for x in n[1:4]]
            origin.routes["/live.m3u8"] = m3u(playlist(entries))
            cfg = make_config(redis_server.url, [{"id": "hung", "url": origin.url("/live.m3u8"), "fps": None,
                                                  "stall_timeout_s": 2, "drop_policy": "wait",
                                                  "hls": {"start": "first", "segment_timeout_s": 30},
                                                  "reconnect": {"initial_s": 0.2, "max_s": 0.5, "max_attempts": None}}],
                              egress={"allow": [f"{ALLOWED}/32"]})
            async with running(cfg) as d:
                runner = d.streams.runners["hung"]
                await until(lambda: runner.frames >= segs["frames"][n[0]], 20, what="the first segment")
                t_last = time.time()

                async def stalled_at():
                    return next((e["ts"] for e in await events(r, "hung", "state") if e["to"] == "stalled"), None)

                t_stalled = await until(stalled_at, 15, what="stalled")
                assert t_stalled - t_last <= 2 + 1.5
    finally:
        srv.close()


async def test_growing_playlist_with_a_server_restart_decodes_no_segment_twice(r, redis_server, segs):
    listed = segs["names"][:2]
    routes = {"/live.m3u8": lambda: m3u(playlist(listed)), **seg_routes(segs)}
    origin = Canary(ALLOWED, routes).start()
    try:
        cfg = make_config(redis_server.url, [{"id": "grow", "url": origin.url("/live.m3u8"), "fps": None,
                                              "stall_timeout_s": 3, "open_timeout_s": 2,
                                              "hls": {"start": "first"}, "drop_policy": "wait",
                                              "reconnect": {"initial_s": 0.2, "max_s": 0.5, "max_attempts": None}}])
        async with running(cfg) as d:
            runner = d.streams.runners["grow"]
            await until(lambda: runner.frames >= sum(segs["frames"][n] for n in listed), 20, what="2 segments")
            origin.stop()
            await until(lambda: runner.state.value in ("backoff", "connecting", "stalled"), 15, what="the outage")
            listed.extend(segs["names"][2:4])
            origin.start()
            want = sum(segs["frames"][n] for n in segs["names"][:4])
            await until(lambda: runner.frames >= want, 30, what="the new segments after the restart")
            await asyncio.sleep(2.5)
    finally:
        origin.stop()
    pts = [x["pts_s"] for x in await results(r, "grow")]
    assert len(pts) == len(set(pts)) == sum(segs["frames"][n] for n in segs["names"][:4])
    assert sorted(pts) == pts


async def test_discontinuity_and_program_date_time(r, redis_server, segs):
    n = segs["names"]
    entries = ["#EXT-X-PROGRAM-DATE-TIME:2026-01-01T00:00:00.000Z", n[0], n[1], "#EXT-X-DISCONTINUITY",
               "#EXT-X-PROGRAM-DATE-TIME:2026-01-01T01:00:00.000Z", n[2]]
    with Canary(ALLOWED, {"/pdt.m3u8": m3u(playlist(entries, endlist=True)), **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "pdt", "url": origin.url("/pdt.m3u8"), "fps": None}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["pdt"].state.value == "stopped", 30, what="the end")
    recs = await results(r, "pdt")
    assert all(x["capture_ts_source"] == "source" for x in recs)
    t0 = 1767225600.0  # 2026-01-01T00:00:00Z
    first = recs[0]
    assert abs(first["capture_ts"] - t0) < 0.01
    second = recs[segs["frames"][n[0]]]  # first frame of segment 1: 1 s of media later
    assert abs(second["capture_ts"] - (t0 + (second["pts_s"] - first["pts_s"]))) < 0.01
    k = segs["frames"][n[0]] + segs["frames"][n[1]]
    assert [i for i, x in enumerate(recs) if x["discontinuity"]] == [k]
    assert abs(recs[k]["capture_ts"] - (t0 + 3600)) < 0.01


async def _refused(r, d, sid: str, url: str) -> None:
    d.streams.add_stream(stream(sid, url), "api")
    await until(lambda: _reason_code(r, sid, "egress_refused"), 15, what=f"{sid}: egress_refused")
    await d.streams.remove_stream(sid)


@pytest.mark.parametrize("case", ["segment", "key", "map", "variant", "redirect", "segment_redirect", "metadata",
                                  "cgnat"])
async def test_playlist_lines_and_redirects_cannot_bypass_the_policy(r, redis_server, segs, case):
    n0 = segs["names"][0]
    with Canary(CANARY, {"/secret.ts": ts(segs["bytes"][n0]), "/key": (200, {}, b"k" * 16),
                         "/init.mp4": (200, {}, b"x"), "/v.m3u8": m3u(playlist([n0]))}) as canary:
        bodies = {
            "segment": playlist([canary.url("/secret.ts")], endlist=True),
            "key": playlist([f'#EXT-X-KEY:METHOD=AES-128,URI="{canary.url("/key")}"', n0], endlist=True),
            "map": playlist([f'#EXT-X-MAP:URI="{canary.url("/init.mp4")}"', n0], endlist=True),
            "variant": f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\n{canary.url('/v.m3u8')}\n".encode(),
            "metadata": playlist(["http://169.254.169.254/latest/meta-data/s.ts"], endlist=True),
            "cgnat": playlist(["http://100.100.100.200/latest/meta-data/s.ts"], endlist=True),
            # a segment on the allowed host that redirects (the decoder thread fetches segments: each hop checked)
            "segment_redirect": playlist(["hop.ts"], endlist=True),
        }
        routes = {"/p.m3u8": (redirect(canary.url("/v.m3u8")) if case == "redirect" else m3u(bodies[case])),
                  "/hop.ts": redirect(canary.url("/secret.ts")), **seg_routes(segs)}
        with Canary(ALLOWED, routes) as origin, connect_guard() as guard:
            async with running(egress_cfg(redis_server.url)) as d:
                await _refused(r, d, f"bypass-{case}", origin.url("/p.m3u8"))
            assert origin.hits("/p.m3u8") >= 1
        assert canary.connections == 0 and canary.hits() == 0
        assert guard.outside == []  # refused before any connection outside loopback was attempted


async def test_config_stream_keeps_its_own_host_but_not_others(r, redis_server, segs):
    n0 = segs["names"][0]
    with Canary(CANARY, {"/secret.ts": ts(segs["bytes"][n0])}) as canary, \
            Canary(ALLOWED, {"/own.m3u8": m3u(playlist([n0], endlist=True)),
                             "/other.m3u8": m3u(playlist([canary.url("/secret.ts")], endlist=True)),
                             **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "own", "url": origin.url("/own.m3u8"), "fps": None},
                                             {"id": "other", "url": origin.url("/other.m3u8"), "fps": None,
                                              "reconnect": {"initial_s": 0.2, "max_attempts": 1}}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["own"].state.value == "stopped", 20, what="own host played")
            await until(lambda: _reason_code(r, "other", "egress_refused"), 15, what="other host refused")
        assert canary.connections == 0
    assert len(await results(r, "own")) == segs["frames"][n0]


async def test_self_referencing_master_playlist_fails_fast(r, redis_server):
    origin = Canary(ALLOWED)
    origin.routes["/loop.m3u8"] = m3u(f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n{origin.url('/loop.m3u8')}\n"
                                      .encode())
    origin.routes["/a.m3u8"] = m3u(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nb.m3u8\n")
    origin.routes["/b.m3u8"] = m3u(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\na.m3u8\n")
    with origin:
        async with running(egress_cfg(redis_server.url)) as d:
            t0 = time.monotonic()
            for sid, path in (("loop", "/loop.m3u8"), ("pingpong", "/a.m3u8")):
                d.streams.add_stream(stream(sid, origin.url(path)), "api")
                await until(lambda: d.streams.runners[sid].state.value == "failed", 5, what=f"{sid} failed")
                assert d.streams.runners[sid].reason_code == "playlist_loop"
            assert time.monotonic() - t0 < 6
    assert origin.hits() < 10


async def test_oversize_playlist_is_refused(r, redis_server):
    big = playlist([f"s{i}.ts" for i in range(20)], endlist=True) + b"#" * 4096
    with Canary(ALLOWED, {"/big.m3u8": m3u(big)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "big", "url": origin.url("/big.m3u8"),
                                              "hls": {"max_playlist_bytes": 1024},
                                              "reconnect": {"initial_s": 0.1, "max_attempts": 1}}])
        async with running(cfg):
            await until(lambda: _reason_code(r, "big", "too_large"), 10, what="too_large")


async def test_aes128_segments_are_decrypted(r, redis_server, segs):
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key, n = os.urandom(16), segs["names"][:2]
    routes = {"/key.bin": (200, {}, key)}
    for i, name in enumerate(n):  # no IV in the tag: the media sequence number is the IV
        p = padding.PKCS7(128).padder()
        enc = Cipher(algorithms.AES(key), modes.CBC((i + 7).to_bytes(16, "big"))).encryptor()
        routes[f"/e{i}.ts"] = ts(enc.update(p.update(segs["bytes"][name]) + p.finalize()) + enc.finalize())
    with Canary(ALLOWED, routes) as origin:
        origin.routes["/enc.m3u8"] = m3u(playlist(['#EXT-X-KEY:METHOD=AES-128,URI="key.bin"', "e0.ts", "e1.ts"],
                                                  endlist=True, seq=7))
        cfg = make_config(redis_server.url, [{"id": "aes", "url": origin.url("/enc.m3u8"), "fps": None}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["aes"].state.value == "stopped", 20, what="the end")
        assert origin.hits("/key.bin") == 1
    assert len(await results(r, "aes")) == sum(segs["frames"][x] for x in n)


@pytest.mark.parametrize("variant", ["lowest", "highest"])
async def test_master_playlist_picks_a_variant(r, redis_server, segs, variant):
    n0 = segs["names"][0]
    master = b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000\nhi.m3u8\n#EXT-X-STREAM-INF:BANDWIDTH=200000\nlo.m3u8\n"
    with Canary(ALLOWED, {"/master.m3u8": m3u(master), "/hi.m3u8": m3u(playlist([n0], endlist=True)),
                          "/lo.m3u8": m3u(playlist([n0], endlist=True)), **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "m", "url": origin.url("/master.m3u8"), "fps": None,
                                              "hls": {"variant": variant}}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["m"].state.value == "stopped", 20, what="the end")
        picked, other = ("/lo.m3u8", "/hi.m3u8") if variant == "lowest" else ("/hi.m3u8", "/lo.m3u8")
        assert origin.hits(picked) == 1 and origin.hits(other) == 0


async def test_fmp4_segments_with_an_init_section_play_every_frame_once(r, redis_server, clip, tmp_path):
    """fMP4 (CMAF) segments: each is decoded with its EXT-X-MAP init section (not as part of an MPEG-TS run)."""
    out = tmp_path / "fmp4"
    out.mkdir()
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip), "-an",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-f", "hls", "-hls_time", "1",
                    "-hls_list_size", "0", "-hls_playlist_type", "vod", "-hls_segment_type", "fmp4",
                    "-hls_fmp4_init_filename", "init.mp4", str(out / "index.m3u8")], check=True)
    text = (out / "index.m3u8").read_text()
    assert "#EXT-X-MAP" in text
    with av.open(str(clip)) as c:
        total = sum(1 for _ in c.decode(video=0))
    routes = {f"/{p.name}": (200, {}, p.read_bytes()) for p in out.iterdir()}
    with Canary(ALLOWED, routes) as origin:
        cfg = make_config(redis_server.url, [{"id": "cmaf", "url": origin.url("/index.m3u8"), "fps": None}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["cmaf"].state.value == "stopped", 30, what="the recording's end")
            assert origin.hits("/init.mp4") == 1  # the init section is fetched once, not per segment
    pts = [x["pts_s"] for x in await results(r, "cmaf")]
    assert len(pts) == total and len(set(pts)) == total


async def test_frames_have_the_pixels_of_ffmpegs_default_conversion(segs):
    """The follower converts on its decoder thread alone (swscale threads 1): every frame's RGB pixels are those of
    PyAV's default conversion (swscale's threads) of the same segments, bit for bit."""
    import itertools

    import numpy as np
    from av.video.reformatter import VideoReformatter

    from streamd.batching import FrameQueue
    from streamd.config import DropPolicy
    from streamd.egress import EgressRules, StreamEgress
    from streamd.sampling import FpsSampler
    from streamd.sources import parse_reference
    from streamd.sources.hls import HlsSource

    names = segs["names"][:2]
    rgb, want = VideoReformatter(), []
    for n in names:
        with av.open(str(segs["dir"] / n)) as c:
            want += [rgb.reformat(vf, format="rgb24").to_ndarray() for vf in c.decode(video=0)]
    loop = asyncio.get_running_loop()
    with Canary(ALLOWED, {"/p.m3u8": m3u(playlist(names, endlist=True)), **seg_routes(segs)}) as origin:
        url = origin.url("/p.m3u8")
        cfg = stream("px", url, drop_policy="wait")
        q: FrameQueue = FrameQueue(4, DropPolicy.WAIT, loop)
        eg = StreamEgress(EgressRules(deny_non_global=False), cfg.id)
        src = HlsSource(cfg, parse_reference(url), FpsSampler(None), itertools.count(), q, loop, eg, {},
                        lambda *a: None)
        got = []
        try:
            while not (src.ended.done() and len(q) == 0):
                f = q.get_nowait()
                if f is None:
                    await asyncio.sleep(0.005)
                    continue
                got.append(f.image)
            src.ended.result()
        finally:
            await src.aclose()
            await eg.aclose()
    assert len(got) == len(want) == sum(segs["frames"][n] for n in names)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


async def test_big_playlists_are_parsed_off_the_event_loop(r, redis_server, segs):
    """Playlist parsing never runs on the event loop: (1) a live playlist within every limit (9,999 entries with a
    date and a key each: ~0.3 s of m3u8 parsing) that does not change is parsed once, in a worker thread, not at
    every reload (every 0.5 s); (2) a playlist over hls.max_playlist_entries (100,000 one-letter entries: ~1.3 s to
    parse) is refused by a count of its #EXTINF lines, unparsed. The old code parsed both on the loop at every load:
    the daemon's measured loop lag summed to seconds over the window."""
    n0 = segs["names"][0]
    rich = ("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n" +
            f"#EXT-X-PROGRAM-DATE-TIME:2026-01-01T00:00:00.000Z\n#EXT-X-KEY:METHOD=NONE\n#EXTINF:1.0,t\n/{n0}\n"
            * 9999).encode()
    many = ("#EXTM3U\n#EXT-X-TARGETDURATION:1\n" + "#EXTINF:1,\na\n" * 100_000).encode()
    with Canary(ALLOWED, {"/rich.m3u8": m3u(rich), "/many.m3u8": m3u(many), **seg_routes(segs)}) as origin:
        async with running(egress_cfg(redis_server.url)) as d:
            d.streams.add_stream(stream("rich", origin.url("/rich.m3u8")), "api")
            d.streams.add_stream(stream("many", origin.url("/many.m3u8"), reconnect={"initial_s": 0.2,
                                                                                     "max_attempts": 2}), "api")
            d.loop_lag_s.clear()
            await until(lambda: d.streams.runners["rich"].frames > 0, 20, what="the rich playlist's live edge")
            await until(lambda: _reason_code(r, "many", "too_large"), 20, what="many: too_large")
            await until(lambda: origin.hits("/rich.m3u8") >= 6, 20, what="5 reloads of the rich playlist")
            lag = sum(d.loop_lag_s)
    assert origin.hits("/many.m3u8") >= 2  # every attempt refused it
    assert lag < 1.0, f"the event loop was blocked {lag:.2f} s"


async def test_a_media_sequence_that_starts_again_is_followed(r, redis_server, segs):
    """An encoder restart: the live playlist's media sequence drops from 1000 to 0. The follower takes the new
    numbering (the old code kept the last media sequence number and never fetched a segment again), its first frame
    flagged a discontinuity; no segment is decoded twice."""
    n = segs["names"]
    st = {"body": playlist(n[:2], seq=1000)}
    with Canary(ALLOWED, {"/live.m3u8": lambda: m3u(st["body"]), **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "reset", "url": origin.url("/live.m3u8"), "fps": None,
                                              "stall_timeout_s": 3, "drop_policy": "wait", "hls": {"start": "first"},
                                              "reconnect": {"initial_s": 0.2, "max_s": 0.5, "max_attempts": None}}])
        async with running(cfg) as d:
            runner = d.streams.runners["reset"]
            first = sum(segs["frames"][x] for x in n[:2])
            await until(lambda: runner.frames >= first, 20, what="the first 2 segments")
            st["body"] = playlist(n[2:4], seq=0)  # the encoder restarted (no tag says so)
            want = first + sum(segs["frames"][x] for x in n[2:4])
            await until(lambda: runner.frames >= want, 15, what="the segments after the restart")
            await asyncio.sleep(1.5)  # reloads of the same playlist: nothing more
    recs = await results(r, "reset")
    assert len(recs) == want
    assert [i for i, x in enumerate(recs) if x["discontinuity"]] == [first]


async def test_one_stale_playlist_from_a_lagging_edge_is_not_a_restart(r, redis_server, segs):
    """A CDN edge that lags: the playlist loads fresh (10-12), then once from an edge far behind (7-8: newest more
    than 3 back), then fresh again (10-13). The stale copy is ignored: every segment is decoded once, in order. The
    old code took the one stale playlist for an encoder restart and decoded segments again (and out of order)."""
    n = segs["names"]
    loads = iter(range(1_000_000))

    def live():
        k = next(loads)
        if k == 0:
            return m3u(playlist(n[:3], seq=10))
        if k == 1:
            return m3u(playlist(n[:2], seq=7))  # the lagging edge
        return m3u(playlist(n[:4], seq=10))

    with Canary(ALLOWED, {"/live.m3u8": live, **seg_routes(segs)}) as origin:
        cfg = make_config(redis_server.url, [{"id": "edge", "url": origin.url("/live.m3u8"), "fps": None,
                                              "stall_timeout_s": 10, "drop_policy": "wait", "hls": {"start": "first"}}])
        async with running(cfg) as d:
            runner = d.streams.runners["edge"]
            want = sum(segs["frames"][x] for x in n[:4])
            await until(lambda: origin.hits(f"/{n[3]}") >= 1 and runner.frames >= want, 20, what="segment 13")
            await asyncio.sleep(1.5)  # reloads of the same playlist: nothing more
        assert [origin.hits(f"/{x}") for x in n[:4]] == [1, 1, 1, 1]
    recs = await results(r, "edge")
    assert len(recs) == want
    pts = [x["pts_s"] for x in recs]
    assert pts == sorted(pts)
    assert not any(x["discontinuity"] for x in recs[1:])


async def test_an_expired_variant_url_goes_back_to_the_master(r, redis_server, segs):
    """A master playlist whose variant URL carries a token: once the variant answers 403, the master (now listing a
    fresh token) is read again. The old code reloaded the stored variant URL for ever."""
    n = segs["names"]
    st = {"token": "t1", "served": 2}
    origin = Canary(ALLOWED, seg_routes(segs))
    origin.routes["/master.m3u8"] = lambda: m3u(f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\n/{st['token']}/v.m3u8\n"
                                                .encode())

    def variant(tok):
        return lambda: m3u(playlist(["/" + x for x in n[:st["served"]]])) if st["token"] == tok else \
            (403, {}, b"expired")

    origin.routes["/t1/v.m3u8"], origin.routes["/t2/v.m3u8"] = variant("t1"), variant("t2")
    with origin:
        cfg = make_config(redis_server.url, [{"id": "tok", "url": origin.url("/master.m3u8"), "fps": None,
                                              "stall_timeout_s": 3, "drop_policy": "wait", "hls": {"start": "first"},
                                              "reconnect": {"initial_s": 0.2, "max_s": 0.5, "max_attempts": None}}])
        async with running(cfg) as d:
            runner = d.streams.runners["tok"]
            first = sum(segs["frames"][x] for x in n[:2])
            await until(lambda: runner.frames >= first, 20, what="the first 2 segments")
            st["token"], st["served"] = "t2", 4  # t1 expired; the master lists t2
            want = first + sum(segs["frames"][x] for x in n[2:4])
            await until(lambda: runner.frames >= want, 15, what="frames through the fresh variant URL")
        assert origin.hits("/master.m3u8") >= 2 and origin.hits("/t2/v.m3u8") >= 1


def _encrypted(segs: dict, key_of: list[int]) -> tuple[dict, list[str]]:
    """Routes for segments s0.. each encrypted with key number key_of[i] (served at /k<n>), and playlist entries."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    keys = {k: bytes([k + 1]) * 16 for k in set(key_of)}
    routes, entries = {f"/k{k}": (200, {}, v) for k, v in keys.items()}, []
    for i, k in enumerate(key_of):
        p = padding.PKCS7(128).padder()
        enc = Cipher(algorithms.AES(keys[k]), modes.CBC(i.to_bytes(16, "big"))).encryptor()
        routes[f"/e{i}.ts"] = ts(enc.update(p.update(segs["bytes"][segs["names"][i]]) + p.finalize()) + enc.finalize())
        entries += [f'#EXT-X-KEY:METHOD=AES-128,URI="k{k}"', f"e{i}.ts"]
    return routes, entries


async def test_aes_keys_are_kept_least_recently_used(r, redis_server, segs):
    """Five keys, then the first again: the follower keeps the last 4 keys used (the old code kept every key URI for
    the connection's life), so the first is fetched again."""
    assert len(segs["names"]) >= 6
    routes, entries = _encrypted(segs, [0, 1, 2, 3, 4, 0])
    with Canary(ALLOWED, routes) as origin:
        origin.routes["/enc.m3u8"] = m3u(playlist(entries, endlist=True))
        cfg = make_config(redis_server.url, [{"id": "keys", "url": origin.url("/enc.m3u8"), "fps": None}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["keys"].state.value == "stopped", 30, what="the end")
        assert [origin.hits(f"/k{k}") for k in range(5)] == [2, 1, 1, 1, 1]
    assert len(await results(r, "keys")) == sum(segs["frames"][n] for n in segs["names"][:6])


def _recording_server(host: str, routes: dict, seen: list):
    """A plain HTTP server on `host` serving `routes`, recording (path, headers) of every request in `seen`."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            seen.append((self.path, dict(self.headers)))
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer((host, 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


async def test_configured_headers_go_with_every_hls_fetch(r, redis_server, segs):
    """ffmpeg_options user_agent / referer / headers are sent with the playlists (master and variant), the
    segments and the keys (the old code sent none of them)."""
    routes, entries = _encrypted(segs, [0, 0])
    routes["/v.m3u8"] = m3u(playlist(entries, endlist=True))
    routes["/master.m3u8"] = m3u(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nv.m3u8\n")
    seen: list[tuple[str, dict]] = []
    srv = _recording_server(ALLOWED, routes, seen)
    try:
        url = f"http://{ALLOWED}:{srv.server_address[1]}/master.m3u8"
        cfg = make_config(redis_server.url, [{"id": "hdr", "url": url, "fps": None, "ffmpeg_options": {
            "user_agent": "streamd-test/1", "referer": "http://example.test/", "headers": "X-Token: abc\r\n"}}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["hdr"].state.value == "stopped", 30, what="the end")
    finally:
        srv.shutdown()
        srv.server_close()
    assert {p for p, _ in seen} == {"/master.m3u8", "/v.m3u8", "/k0", "/e0.ts", "/e1.ts"}
    for path, h in seen:
        assert (h.get("User-Agent"), h.get("Referer"), h.get("X-Token")) == \
            ("streamd-test/1", "http://example.test/", "abc"), path


async def test_configured_credentials_never_go_to_another_host_a_playlist_names(r, redis_server, segs):
    """A playlist on 127.0.0.2 names a segment and an AES key on 127.0.0.5 (allowed by the policy): the configured
    headers (Authorization, Cookie, X-Token) go to 127.0.0.2 only; 127.0.0.5 gets User-Agent / Referer. The old
    code took each fetched URL as its own origin and sent the credentials to any host a playlist named."""
    other_host = "127.0.0.5"
    other_routes, _ = _encrypted(segs, [0, 0])
    other_seen: list[tuple[str, dict]] = []
    other = _recording_server(other_host, other_routes, other_seen)
    base = f"http://{other_host}:{other.server_address[1]}"
    # e0 and the key k0 from the other host by absolute URIs, e1 from the playlist's own host
    key = f'#EXT-X-KEY:METHOD=AES-128,URI="{base}/k0"'
    lines = [key, f"{base}/e0.ts", key, "e1.ts"]
    routes = {"/p.m3u8": m3u(playlist(lines, endlist=True)), "/e1.ts": other_routes["/e1.ts"]}
    seen: list[tuple[str, dict]] = []
    srv = _recording_server(ALLOWED, routes, seen)
    try:
        url = f"http://{ALLOWED}:{srv.server_address[1]}/p.m3u8"
        cfg = make_config(redis_server.url, [{"id": "cred", "url": url, "fps": None, "ffmpeg_options": {
            "user_agent": "streamd-test/1", "referer": "http://example.test/",
            "headers": "Authorization: Bearer SECRET\r\nCookie: s=SECRET\r\nX-Token: SECRET\r\n"}}],
            egress={"allow": [f"{ALLOWED}/32", f"{other_host}/32"]})
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["cred"].state.value == "stopped", 30, what="the end")
    finally:
        srv.shutdown()
        srv.server_close()
        other.shutdown()
        other.server_close()
    assert {p for p, _ in seen} == {"/p.m3u8", "/e1.ts"}
    assert {p for p, _ in other_seen} == {"/k0", "/e0.ts"}
    for path, h in seen:
        assert (h.get("Authorization"), h.get("Cookie"), h.get("X-Token"), h.get("User-Agent")) == \
            ("Bearer SECRET", "s=SECRET", "SECRET", "streamd-test/1"), path
    for path, h in other_seen:
        assert (h.get("Authorization"), h.get("Cookie"), h.get("X-Token")) == (None, None, None), path
        assert (h.get("User-Agent"), h.get("Referer")) == ("streamd-test/1", "http://example.test/"), path
    assert len(await results(r, "cred")) == sum(segs["frames"][n] for n in segs["names"][:2])

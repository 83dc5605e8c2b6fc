"""Bad inputs fail one stream with a reason; the others keep running."""

import asyncio

from streamd.redis_server import free_port
from streamd.testing.servers import HttpDir
from conftest import events, make_config, results, running, until

FAST_GIVE_UP = {"initial_s": 0.1, "max_s": 0.2, "max_attempts": 1}


async def test_bad_streams_fail_with_reasons_others_unaffected(r, redis_server, clip, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"seg{i}.ts").write_bytes(bytes(range(256)) * 400)
    (corrupt / "index.m3u8").write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n"
        + "".join(f"#EXTINF:1.0,\nseg{i}.ts\n" for i in range(3)) + "#EXT-X-ENDLIST\n")
    http = HttpDir(tmp_path).start()
    closed_port = free_port()
    try:
        cfg = make_config(redis_server.url, [
            {"id": "good", "url": str(clip), "playback": "realtime", "loop": True, "fps": 4.0},
            {"id": "unreachable", "url": f"http://127.0.0.1:{closed_port}/live/index.m3u8", "open_timeout_s": 2,
             "reconnect": FAST_GIVE_UP},
            {"id": "notfound", "url": http.url("missing/index.m3u8"), "reconnect": FAST_GIVE_UP},
            {"id": "corrupt", "url": http.url("corrupt/index.m3u8"), "reconnect": FAST_GIVE_UP},
            {"id": "scheme", "url": "gopher://example.com/cam"},
            {"id": "nofile", "url": str(tmp_path / "nope.mp4")},
        ])
        async with running(cfg) as d:
            bad = ["unreachable", "notfound", "corrupt", "scheme", "nofile"]
            await until(lambda: all(d.streams.runners[s].state.value == "failed" for s in bad), 40,
                        what="every bad stream failed")
            n_before = len(await results(r, "good"))
            await asyncio.sleep(1.5)
            n_after = len(await results(r, "good"))
            assert d.streams.runners["good"].state.value == "live"
            reasons = {s: d.streams.runners[s].reason for s in bad}
            codes = {s: d.streams.runners[s].reason_code for s in bad}
    finally:
        http.stop()
    assert n_after > n_before >= 1  # the good stream kept publishing
    unreachable = f"http://127.0.0.1:{closed_port}/live/index.m3u8"
    assert reasons["unreachable"].startswith(f"gave up after 1 attempts: cannot connect to {unreachable}"), reasons
    assert reasons["notfound"] == f"gave up after 1 attempts: HTTP 404 from {http.url('missing/index.m3u8')}"
    assert reasons["corrupt"].startswith("corrupt input: 3 HLS segments in a row are not decodable video"), reasons
    assert reasons["scheme"] == "unsupported scheme 'gopher'", reasons
    assert reasons["nofile"] == f"no such file: {tmp_path / 'nope.mp4'}", reasons
    assert codes == {"unreachable": "unreachable", "notfound": "http_status", "corrupt": "corrupt_input",
                     "scheme": "invalid_reference", "nofile": "not_found"}
    for s in bad:
        evs = await events(r, s, "state")
        assert evs[-1]["to"] == "failed" and evs[-1]["reason"]
    assert await results(r, "scheme") == []


async def test_credentials_never_reach_events_or_status(r, redis_server):
    port = free_port()
    url = f"rtsp://admin:s3cret@127.0.0.1:{port}/cam?token=abc123"
    cfg = make_config(redis_server.url, [{"id": "cred", "url": url, "open_timeout_s": 1,
                                         "reconnect": FAST_GIVE_UP}])
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["cred"].state.value == "failed", 20)
        status = d.streams.status()
    text = str(await r.xrange("streamd:{cred}:events")) + str(status)
    assert "s3cret" not in text and "abc123" not in text
    assert "***@127.0.0.1" in status["streams"]["cred"]["url"]

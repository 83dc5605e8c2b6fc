"""The control API against a real daemon, real Redis, real HTTP."""

import asyncio
import re

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamd.api.app import ROUTES
from streamd.testing.egress import connect_guard
from streamd.testing.servers import HttpDir, LiveHls
from conftest import ADMIN, OPER, READ, TOKENS, api_cfg, at_least, h, results, running, until

def read_status(path):
    """What the read token gets from a read route of a daemon without streams or prompts: 404 where the path names
    a stream or a prompt (`nosuch`, the global vlm prompt: neither exists), 200 elsewhere."""
    return 404 if "{id}" in path or "{scope}" in path or "{job}" in path else 200


def concrete(path):
    return (path.replace("{id}", "nosuch").replace("{kind}", "vlm").replace("{scope}", "global")
            .replace("{pipeline}", "detect").replace("{object_id}", "1").replace("{name}", "nosuch")
            .replace("{job}", "0123456789abcdef"))


async def test_every_route_needs_a_token_and_the_right_scope(r, redis_server):
    # two refused tokens per route: more than the default throttle of refused tokens per address allows
    async with running(api_cfg(redis_server.url, auth_failure_limit=10_000)) as d, aiohttp.ClientSession() as s:
        for route in ROUTES:
            url = d.api_url + concrete(route.path)
            async with s.request(route.method, url, json={}) as resp:
                if route.scope is None:
                    # /health/live and /health/ready: Redis is up and the only pipeline needs no model
                    assert resp.status == 200, (route.path, resp.status, await resp.text())
                    continue
                assert resp.status == 401, (route.method, route.path, resp.status)
                body = await resp.json()
                assert body["error"]["code"] == "unauthorized" and "WWW-Authenticate" in resp.headers
            async with s.request(route.method, url, json={}, headers=h("wrong-token-0123456789")) as resp:
                assert resp.status == 401
            async with s.request(route.method, url, json={}, headers=h(READ)) as resp:
                if route.scope == "read":
                    assert resp.status == read_status(route.path), (route.path, resp.status, await resp.text())
                else:
                    assert resp.status == 403, (route.method, route.path, resp.status)
                    assert (await resp.json())["error"]["details"]["needed"] == route.scope


async def test_add_and_remove_a_live_hls_stream(r, redis_server, clip, tmp_path):
    hls = LiveHls(clip, tmp_path / "hls").start()
    http = HttpDir(tmp_path / "hls").start()
    other = {"id": "other", "url": str(clip), "playback": "realtime", "loop": True, "fps": 2.0,
             "pipeline": "frame_info"}
    # a sink that lingers (up to 1 s for a fuller batch while busy): the DELETE must still leave nothing behind
    cfg = api_cfg(redis_server.url, [other], redis={"url": redis_server.url, "publish_max_wait_ms": 1000})
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            body = {"id": "cam", "url": http.url("index.m3u8"), "fps": 2.0, "pipeline": "frame_info"}
            async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
                assert resp.status == 201, await resp.text()
                info = await resp.json()
                assert info["id"] == "cam" and info["source"] == "api"
            await until(lambda: at_least(r, "cam", 3), 30, what="results of the API-added stream")

            async def api_results():
                async with s.get(d.api_url + "/api/v1/streams/cam", headers=h(READ)) as resp:
                    info = await resp.json()
                return info if info["results"] >= 3 else None

            info = await until(api_results, 10, what="the API to count the results")
            assert info["state"] == "live" and info["frames_decoded"] > info["frames_sampled"] >= 3
            async with s.get(d.api_url + "/api/v1/streams", headers=h(READ)) as resp:
                assert {x["id"] for x in (await resp.json())["streams"]} == {"cam", "other"}
            async with s.delete(d.api_url + "/api/v1/streams/cam", headers=h(OPER)) as resp:
                assert resp.status == 204
            n_cam = len(await results(r, "cam"))
            n_other = len(await results(r, "other"))
            await asyncio.sleep(2)
            assert len(await results(r, "cam")) == n_cam  # its results stopped
            assert len(await results(r, "other")) > n_other  # the other stream went on
            async with s.get(d.api_url + "/api/v1/streams/cam", headers=h(READ)) as resp:
                assert resp.status == 404
    finally:
        http.stop()
        hls.stop()


async def test_adding_and_removing_a_stream_leaves_the_others_trackers_alone(r, redis_server, tmp_path):
    """Detect + track: a second camera (live HLS) added and removed through the API runs on the same loaded
    detector, and the first camera's tracker is never reset: no frame lost, no id restarted, no reset."""
    from conftest import events
    from streamd.testing.media import make_pan_clip

    clip = make_pan_clip(tmp_path / "z.mp4", "zidane.jpg", seconds=6, fps=10, size=(640, 360))
    pipe = {"stages": [{"type": "detect", "model": "person", "labels": {"Normal": "person"}, "conf": 0.35,
                        "imgsz": 320, "max_batch": 4, "max_wait_ms": 20},
                       {"type": "track", "tracker": "bytetrack", "track_buffer_s": 5}]}
    a = {"id": "a", "url": str(clip), "playback": "realtime", "loop": True, "fps": 2.0, "pipeline": "dt"}
    cfg = api_cfg(redis_server.url, [a], pipelines={"dt": pipe})
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        await until(lambda: at_least(r, "a", 4), 60, what="tracked results of stream a")
        det = d.pipelines["dt"].stages[0].detector
        hls = LiveHls(clip, tmp_path / "hls").start()  # b: a live HLS camera
        http = HttpDir(tmp_path / "hls").start()
        try:
            body = {"id": "b", "url": http.url("index.m3u8"), "fps": 2.0, "pipeline": "dt"}
            async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
                assert resp.status == 201, await resp.text()
            await until(lambda: at_least(r, "b", 4), 60, what="results of the added stream b")
            async with s.delete(d.api_url + "/api/v1/streams/b", headers=h(OPER)) as resp:
                assert resp.status == 204
        finally:
            http.stop()
            hls.stop()
        n_a = len(await results(r, "a"))
        await until(lambda: at_least(r, "a", n_a + 4), 60, what="stream a going on after b was removed")
        assert d.pipelines["dt"].stages[0].detector is det  # the same loaded model throughout
    recs = await results(r, "a")
    assert [x["seq"] for x in recs] == list(range(len(recs)))  # no frame of a lost
    assert not any(x["discontinuity"] for x in recs[1:])
    ids = [sorted(t["track_id"] for t in x["outputs"]["track"]["tracks"]) for x in recs]
    assert all(x for x in ids), ids  # people tracked in every frame
    evs_a = await events(r, "a")
    lost_before_stop = [e for e in evs_a if e["type"] == "track_lost" and e["reason"] != "stream removed"]
    assert not [e for e in lost_before_stop if e["reason"] == "reset"], lost_before_stop  # never reset
    started = [e["track_id"] for e in evs_a if e["type"] == "track_started"]
    assert len(started) == len(set(started))  # no id started twice (a tracker recreated would restart at 1)
    b_lost = [e for e in await events(r, "b") if e["type"] == "track_lost"]
    assert b_lost and all(e["reason"] == "stream removed" for e in b_lost)  # b's tracks ended with b


async def test_bad_requests_get_documented_4xx(r, redis_server):
    async with running(api_cfg(redis_server.url, deny_private_addresses=True, max_body_bytes=4096,
                               rate_limit_per_s=10_000, egress={})) as d, aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/streams"

        async def post(json=None, data=None, status=None, code=None, token=ADMIN):
            async with s.post(u, json=json, data=data, headers={**h(token), "Content-Type": "application/json"}) \
                    as resp:
                body = await resp.json()
                assert resp.status == status, (resp.status, body)
                assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
                if code:
                    assert body["error"]["code"] == code, body
                return body

        await post(data=b"{not json", status=400, code="invalid_json")
        await post(data=b"x" * 10_000, status=413, code="body_too_large")
        for number in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):  # Python's json would read these as floats
            b = await post(data=b'{"id": "a", "url": "rtsp://cam.example/x", "fps": ' + number + b"}", status=400,
                           code="invalid_json")
            assert "number" in b["error"]["message"], b
        b = await post(json={"id": "a", "url": "rtsp://cam.example/x", "fsp": 2}, status=422, code="invalid_body")
        assert b["error"]["details"]["errors"][0]["path"] == "fsp"
        b = await post(json={"id": "a", "url": "rtsp://cam.example/x", "reconnect": {"max_ss": 1}}, status=422)
        assert b["error"]["details"]["errors"][0]["path"] == "reconnect.max_ss"
        for bad in ("file:///etc/passwd", "/etc/passwd", "concat:a.mp4|b.mp4", "subfile:,,start,0,end,0,,:x.mp4",
                    "gopher://x/y"):
            await post(json={"id": "a", "url": bad}, status=422, code="scheme_not_allowed")
        with connect_guard() as guard:
            for private in ("http://127.0.0.1:8080/x.m3u8", "rtsp://10.1.2.3/x", "redis://localhost:6379/0#frames:x",
                            "http://100.100.100.200/latest/meta-data/", "rtsp://192.0.0.8/x", "http://[2002:7f00:1::]/",
                            "http://[::ffff:127.0.0.1]/x", "http://169.254.169.254/", "http://[64:ff9b::a9fe:a9fe]/"):
                for token in (OPER, ADMIN):  # the operator's egress.allow opens an address, no token does
                    b = await post(json={"id": "a", "url": private}, status=422, code="egress_refused", token=token)
                    assert b["error"]["details"] == {"path": "url"}
        assert guard.outside == []  # refused before any connection was tried
        await post(json={"id": "a", "url": "rtsp://cam.example/x", "ffmpeg_options": {"protocol_whitelist": "file"}},
                   status=422, code="option_not_allowed")
        await post(json={"id": "a b", "url": "rtsp://cam.example/x"}, status=422)
        async with s.get(d.api_url + "/api/v1/nope", headers=h(READ)) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        async with s.put(d.api_url + "/api/v1/prompts/vlm/planet:mars", json={"text": "x"}, headers=h(OPER)) as resp:
            assert resp.status == 422


async def test_options_and_redis_keys_from_the_api_are_checked_values(r, redis_server):
    """FFmpeg options are values against a per-option schema (no CR/LF: no header injection; no listen modes);
    `redis:` inputs only read keys under api.redis_key_prefix, never streamd's own; a DELETE removes the consumer
    group the stream created, unless another stream reads the same key."""
    schemes = ["rtsp", "rtmp", "srt", "tcp", "redis"]  # tcp too: its `?listen` is checked, not only its scheme
    async with running(api_cfg(redis_server.url, allowed_schemes=schemes)) as d, aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/streams"

        async def post(body, status, code=None):
            async with s.post(u, json=body, headers=h(OPER)) as resp:
                got = await resp.json()
                assert resp.status == status, (body, resp.status, got)
                if code:
                    assert got["error"]["code"] == code, (body, got)

        cam = "rtsp://127.0.0.1:9/x"
        for opts, code in (({"user_agent": "x\r\nX-Injected: 1"}, "invalid_body"),  # the config's own check
                           ({"user_agent": "x\u0007"}, "invalid_body"),
                           ({"rtsp_flags": "listen"}, "option_not_allowed"),
                           ({"listen": "1"}, "option_not_allowed"),
                           ({"headers": "X-A: 1"}, "option_not_allowed"),
                           ({"rtsp_transport": "tcp;listen"}, "invalid_option_value"),
                           ({"buffer_size": "99999999999"}, "invalid_option_value"),
                           ({"probesize": "-1"}, "invalid_option_value"),
                           ({"fflags": "+nobuffer+ignidx+autobsf"}, "invalid_option_value")):
            await post({"id": "o", "url": cam, "ffmpeg_options": opts}, 422, code)
        for url in ("tcp://127.0.0.1:9?listen=1", "tcp://127.0.0.1:9?listen", "srt://127.0.0.1:9?mode=listener",
                    "rtmp://127.0.0.1/app?listen=1&x=2"):
            await post({"id": "o", "url": url}, 422, "server_mode_not_allowed")
        for url in ("redis:streamd:{cam}:results", "redis:other", "redis:streamd:frames:x",
                    f"{redis_server.url}#streamd:api:streams"):
            await post({"id": "o", "url": url, "pipeline": "frame_info"}, 422, "redis_key_not_allowed")
        await post({"id": "ok", "url": cam, "ffmpeg_options": {"user_agent": "streamd test/1.0",
                                                              "fflags": "+nobuffer-genpts", "buffer_size": "65536",
                                                              "rtsp_transport": "tcp"}}, 201)
        for sid in ("g1", "g2", "g3"):
            key = "frames:shared" if sid != "g3" else "frames:own"
            await post({"id": sid, "url": f"redis:{key}", "pipeline": "frame_info"}, 201)

        async def groups(key):
            try:
                return [g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                        for g in await r.xinfo_groups(key)]
            except Exception:  # noqa: BLE001 - no such key
                return []

        await until(lambda: _all(groups("frames:shared"), groups("frames:own")), 15, what="groups created")
        for sid in ("g3", "g1"):
            async with s.delete(f"{u}/{sid}", headers=h(OPER)) as resp:
                assert resp.status == 204, await resp.text()
        assert await groups("frames:own") == []  # g3's group went with it
        assert await groups("frames:shared") == ["streamd"]  # g2 still reads it
        async with s.delete(f"{u}/g2", headers=h(OPER)) as resp:
            assert resp.status == 204
        assert await groups("frames:shared") == []


async def _all(*aws):
    got = [await a for a in aws]
    return all(got)


async def test_rate_limit_answers_429_with_retry_after(r, redis_server):
    async with running(api_cfg(redis_server.url, rate_limit_per_s=1, rate_limit_burst=3)) as d, \
            aiohttp.ClientSession() as s:
        codes = []
        for _ in range(6):
            async with s.get(d.api_url + "/api/v1/streams", headers=h(READ)) as resp:
                codes.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["error"]["code"] == "rate_limited"
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        async with s.get(d.api_url + "/api/v1/streams", headers=h(ADMIN)) as resp:
            assert resp.status == 200  # the limit is per token


async def test_concurrent_prompt_updates_get_versions_without_gap_or_repeat(r, redis_server):
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64)) as s:
        url = d.api_url + "/api/v1/prompts/vlm/stream:cam1"

        async def put(i):
            async with s.put(url, json={"text": f"prompt {i}"}, headers=h(OPER)) as resp:
                assert resp.status == 201
                return (await resp.json())["version"]

        versions = await asyncio.gather(*(put(i) for i in range(1000)))
        assert sorted(versions) == list(range(1, 1001))
        async with s.get(url + "/history?offset=0&limit=5", headers=h(READ)) as resp:
            page = await resp.json()
        assert page["total"] == 1000 and [v["version"] for v in page["versions"]] == [1000, 999, 998, 997, 996]
        assert page["versions"][0]["author"] == "ops"


async def test_prompt_history_rollback_and_restart_keep_state(r, redis_server, clip):
    cfg = api_cfg(redis_server.url)
    body = {"id": "kept", "url": f"{redis_server.url}#frames:kept", "pipeline": "frame_info"}
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        base = d.api_url + "/api/v1/prompts/vlm/global"
        for text in ("describe the scene", "count the people", "is anyone running?"):
            async with s.put(base, json={"text": text, "note": text[:5]}, headers=h(OPER)) as resp:
                assert resp.status == 201
        async with s.post(base + "/rollback", json={"version": 1}, headers=h(OPER)) as resp:
            rb = await resp.json()
            assert resp.status == 201 and rb["version"] == 4 and rb["text"] == "describe the scene"
            assert rb["rolled_back_from"] == 1
        async with s.post(base + "/rollback", json={"version": 99}, headers=h(OPER)) as resp:
            assert resp.status == 404
        async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(ADMIN)) as resp:
            assert resp.status == 201
    # a new daemon (a restart, or a second daemon) sees the same streams and prompts
    async with running(api_cfg(redis_server.url)) as d2, aiohttp.ClientSession() as s:
        async with s.get(d2.api_url + "/api/v1/streams/kept", headers=h(READ)) as resp:
            assert resp.status == 200 and (await resp.json())["source"] == "api"
        async with s.get(d2.api_url + "/api/v1/prompts/vlm/global/history", headers=h(READ)) as resp:
            hist = await resp.json()
        assert [v["text"] for v in hist["versions"]] == ["describe the scene", "is anyone running?",
                                                         "count the people", "describe the scene"]
        assert d2.prompt_cache.resolve("vlm", "kept", "frame_info")["version"] == 4


async def test_metrics_parse_and_move_when_frames_flow(r, redis_server, clip):
    cfg = api_cfg(redis_server.url, [{"id": "m", "url": str(clip), "playback": "realtime", "loop": True,
                                      "fps": 4.0, "pipeline": "frame_info"}])
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        async def sample():
            async with s.get(d.api_url + "/metrics", headers=h(READ)) as resp:
                assert resp.status == 200
                text = await resp.text()
            return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
                    for fam in text_string_to_metric_families(text) for smp in fam.samples}

        await until(lambda: at_least(r, "m", 2), 20)
        a = await sample()
        await asyncio.sleep(2.5)
        b = await sample()
        key = ("streamd_frames_processed_total", (("stream", "m"),))
        assert b[key] > a[key] > 0
        assert b[("streamd_frames_decoded_total", (("stream", "m"),))] > 0
        assert b[("streamd_stream_state", (("state", "live"), ("stream", "m")))] == 1
        assert any(k[0] == "streamd_stage_latency_seconds_count" for k in b)
        assert any(k[0] == "streamd_event_loop_lag_seconds_count" for k in b)
        async with s.get(d.api_url + "/health/ready") as resp:
            assert resp.status == 200
        async with s.get(d.api_url + "/health", headers=h(READ)) as resp:
            health = await resp.json()
            assert health["streams"]["m"]["state"] == "live" and health["redis"]["reachable"]


async def test_openapi_document_validates_and_docs_page(r, redis_server):
    from openapi_spec_validator import validate

    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async with s.get(d.api_url + "/openapi.json", headers=h(READ)) as resp:
            doc = await resp.json()
        async with s.get(d.api_url + "/docs", headers=h(READ)) as resp:
            page = await resp.text()
    validate(doc)
    assert {re.sub(r"{\w+}", "{}", p) for p in doc["paths"]} == {re.sub(r"{\w+}", "{}", r.path) for r in ROUTES}
    assert "/api/v1/streams" in page


async def test_cors_is_off_unless_allow_listed(r, redis_server):
    pre = {"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"}
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async with s.options(d.api_url + "/api/v1/streams", headers=pre) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    async with running(api_cfg(redis_server.url, cors_origins=["https://ui.example"])) as d, \
            aiohttp.ClientSession() as s:
        async with s.options(d.api_url + "/api/v1/streams", headers=pre) as resp:
            assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"


def test_binding_beyond_loopback_needs_tokens():
    from streamd.config import parse_config
    from streamd.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config({"api": {"enabled": True, "bind": "0.0.0.0"}}, environ={})
    assert e.value.key == "api.tokens"
    parse_config({"api": {"enabled": True, "bind": "0.0.0.0", "tokens": TOKENS}}, environ={})


async def test_credentials_are_redacted_in_api_responses(r, redis_server):
    port = redis_server.port
    url = f"redis://streamd:hunter2-secret@127.0.0.1:{port}/0#frames:cred"
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async with s.post(d.api_url + "/api/v1/streams", json={"id": "cred", "url": url, "pipeline": "frame_info",
                                                               "reconnect": {"max_attempts": 1, "initial_s": 0.1}},
                          headers=h(ADMIN)) as resp:
            created = await resp.text()
        await until(lambda: d.streams.runners["cred"].state.value == "failed", 20, what="auth failure")  # wrong password
        texts = [created]
        for path in ("/api/v1/streams", "/api/v1/streams/cred", "/health", "/metrics"):
            async with s.get(d.api_url + path, headers=h(READ)) as resp:
                texts.append(await resp.text())
        info = d.streams.stream_info("cred")
    assert all("hunter2" not in t for t in texts)
    assert "***@127.0.0.1" in texts[0]
    assert info["state"] == "failed" and info["last_error"] and "hunter2" not in info["last_error"]
    events = str(await r.xrange("streamd:{cred}:events"))
    assert "hunter2" not in events

"""Control API hardening (issue 12): parser errors are 400s in the JSON error shape, non-finite numbers are refused,
config-file streams can be changed, token configuration fails cleanly, stream ids follow one pattern, errors aiohttp
answers itself are JSON too, and every error code is documented. Real daemon, real Redis, real HTTP."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from conftest import make_config, running, until
from streamd.config import StreamConfig, parse_config
from streamd.errors import ConfigError

ADMIN, OPER, READ = "admin-token-0123456789", "operate-token-0123456789", "read-token-0123456789abc"
TOKENS = [{"name": "alice", "token": ADMIN, "scopes": ["admin"]},
          {"name": "ops", "token": OPER, "scopes": ["operate"]},
          {"name": "viewer", "token": READ, "scopes": ["read"]}]
ROOT = Path(__file__).resolve().parents[1]
STREAMD = [sys.executable, "-m", "streamd"]


def api_cfg(redis_url, streams=(), **api):
    return make_config(redis_url, list(streams), api={"enabled": True, "port": 0, "tokens": TOKENS,
                                                      "rate_limit_per_s": 10_000, "rate_limit_burst": 10_000,
                                                      **api}, egress={"allow": ["127.0.0.1/32", "localhost"]})


def h(token):
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


async def _send(s, method, url, status, code=None, token=OPER, **kw):
    async with s.request(method, url, headers=h(token), **kw) as resp:
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        body = await resp.json()
        assert resp.status == status, (resp.status, body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
        assert isinstance(body["error"]["details"], dict), body
        if code is not None:
            assert body["error"]["code"] == code, body
        return body["error"]


def _paths(details):
    """The paths a validation error names."""
    return [x["path"] for x in details["errors"]]


async def _raw(api_url, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request written by hand (what aiohttp's client would refuse to send); the answer parsed roughly."""
    u = URL(api_url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(data)
        await writer.drain()
        out = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


# -- 1. parser errors and host names -----------------------------------------------------------------------------
async def test_parser_errors_are_400_in_the_json_shape(r, redis_server):
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        streams = d.api_url + "/api/v1/streams"
        for raw in (b"[" * 6000 + b"]" * 6000,  # RecursionError in the JSON parser
                    b'{"a": ' * 3000 + b"1" + b"}" * 3000,
                    b'{"id": "a", "url": "rtsp://cam.example/x", "fps": ' + b"1" * 5000 + b"}",  # too many digits
                    b'{"id": "a\xff", "url": "rtsp://cam.example/x"}',  # not UTF-8
                    b"{not json"):
            e = await _send(s, "POST", streams, 400, "invalid_json", data=raw)
            assert "Traceback" not in e["message"]
        # nested far below the parser's limit but deeper than any request needs: refused before it goes further
        schema: dict = {"type": "string"}
        for _ in range(15):
            schema = {"type": "object", "properties": {"x": schema}}
        deep = b'{"text": "q?", "schema": ' + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}"
        await _send(s, "PUT", d.api_url + "/api/v1/prompts/vlm/global", 400, "invalid_json", data=deep)
        async with s.put(d.api_url + "/api/v1/prompts/vlm/global", json={"text": "q?", "schema": schema},
                         headers=h(OPER)) as resp:
            assert resp.status == 201, await resp.text()  # a reasonably nested schema is fine
        await _send(s, "PATCH", streams + "/nosuch", 404, "stream_not_found", data=b"[" * 6000)


@pytest.mark.parametrize("deny", [True, False])
async def test_a_host_name_label_over_63_characters_is_a_422(r, redis_server, deny):
    long_label = "a" * 64 + ".example"
    cam = {"id": "cam", "url": "redis:frames:cam"}
    async with running(api_cfg(redis_server.url, [cam], deny_private_addresses=deny)) as d, \
            aiohttp.ClientSession() as s:
        streams = d.api_url + "/api/v1/streams"
        for url in (f"rtsp://{long_label}/x", f"http://{long_label}/x.m3u8", f"rtsp://user:pw@{long_label}:554/x",
                    f"redis://{long_label}/0#frames:x", "rtsp://a..b/x", f"rtsp://{'é' * 64}.example/x",
                    f"rtsp://{'a' * 300}/x", "rtsp://cam.example:99999/x", "rtsp://cam.example:abc/x"):
            e = await _send(s, "POST", streams, 422, json={"id": "x", "url": url}, token=ADMIN)
            assert e["code"] == "invalid_url", e
            assert e["details"]["path"] == "url"
            await _send(s, "PATCH", streams + "/cam", 422, json={"url": url}, token=ADMIN)
        async with s.get(streams, headers=h(READ)) as resp:
            assert [x["id"] for x in (await resp.json())["streams"]] == ["cam"]


# -- 2. non-finite numbers ---------------------------------------------------------------------------------------
async def test_non_finite_numbers_are_refused_by_post_and_patch(r, redis_server):
    cam = {"id": "cam", "url": "redis:frames:cam", "fps": 2.0}
    async with running(api_cfg(redis_server.url, [cam])) as d, aiohttp.ClientSession() as s:
        streams = d.api_url + "/api/v1/streams"
        for field in ("fps", "stall_timeout_s", "open_timeout_s"):
            for number in (b"Infinity", b"-Infinity", b"NaN", b"1e999", b"-1e999"):  # not JSON numbers a float holds
                post = b'{"id": "x", "url": "redis:frames:x", "%s": %s}' % (field.encode(), number)
                await _send(s, "POST", streams, 400, "invalid_json", data=post)
                await _send(s, "PATCH", streams + "/cam", 400, "invalid_json",
                            data=b'{"%s": %s}' % (field.encode(), number))
            huge = b"1" + b"0" * 400  # a JSON integer: parsed, then out of range for a float
            await _send(s, "POST", streams, 422, "invalid_body",
                        data=b'{"id": "x", "url": "redis:frames:x", "%s": %s}' % (field.encode(), huge))
            await _send(s, "PATCH", streams + "/cam", 422, "invalid_body", data=b'{"%s": %s}' % (field.encode(), huge))
        async with s.get(streams + "/cam", headers=h(READ)) as resp:
            assert (await resp.json())["fps"] == 2.0
        assert not await r.hexists("streamd:api:streams", "x")
    for value in (float("inf"), float("nan")):
        with pytest.raises(ConfigError) as e:
            parse_config({"streams": [{"id": "a", "url": "x.mp4", "fps": value}]}, environ={})
        assert e.value.key == "streams.0.fps"


# -- 3. PATCH of a config-file stream with a file URL ----------------------------------------------------------
async def test_a_config_file_stream_with_a_file_url_can_be_patched(r, redis_server, clip):
    cam = {"id": "file", "url": str(clip), "playback": "realtime", "loop": True, "fps": 2.0}
    async with running(api_cfg(redis_server.url, [cam])) as d, aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/streams/file"
        for token, fps in ((OPER, 1.0), (ADMIN, 3.0)):
            async with s.patch(u, json={"fps": fps}, headers=h(token)) as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert body["fps"] == fps and body["url"] == str(clip)
        async with s.patch(u, json={"url": str(clip), "queue_size": 4}, headers=h(OPER)) as resp:
            assert resp.status == 200, await resp.text()  # the same URL is no change
        # what the client changes is still checked
        await _send(s, "PATCH", u, 422, "scheme_not_allowed", json={"url": "/etc/passwd"})
        await _send(s, "PATCH", u, 422, "option_not_allowed", json={"ffmpeg_options": {"protocol_whitelist": "file"}})
        async with s.get(u, headers=h(READ)) as resp:
            info = await resp.json()
        assert info["url"] == str(clip) and info["fps"] == 3.0
        await until(lambda: d.streams.runners["file"].cfg.queue_size == 4, 5, what="the PATCHed stream")


# -- 4. tokens in the config -------------------------------------------------------------------------------------
def _config(tmp_path, redis_url, token_line):
    f = tmp_path / "c.yaml"
    f.write_text(f"redis:\n  url: {redis_url}\napi:\n  enabled: true\n  port: 0\n  tokens:\n    - name: ops\n"
                 f"      {token_line}\n")
    return f


def test_run_with_an_unset_token_env_exits_2_with_one_line(tmp_path, redis_server):
    f = _config(tmp_path, redis_server.url, "token_env: STREAMD_TEST_UNSET_TOKEN")
    env = {k: v for k, v in os.environ.items() if k != "STREAMD_TEST_UNSET_TOKEN"}
    p = subprocess.run(STREAMD + ["run", "-c", str(f)], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "api.tokens.0.token_env" in lines[0] and "STREAMD_TEST_UNSET_TOKEN" in lines[0], lines
    v = subprocess.run(STREAMD + ["validate", str(f)], capture_output=True, text=True, timeout=60, env=env)
    assert v.returncode == 2 and "STREAMD_TEST_UNSET_TOKEN" in v.stderr, v.stderr


def test_a_plain_text_token_in_the_config_is_warned_about(tmp_path, redis_server):
    f = _config(tmp_path, redis_server.url, "token: plain-text-token-0123456789")
    proc = subprocess.Popen(STREAMD + ["run", "-c", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        err = []
        for line in proc.stderr:
            err.append(line)
            if "control API listening" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        err.append(proc.stderr.read())
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(err)
    assert rc == 0, text
    warning = [ln for ln in text.splitlines() if "plain text" in ln]
    assert warning and "ops" in warning[0] and "token_env" in warning[0], text
    assert "plain-text-token-0123456789" not in text


# -- 5. stream ids -------------------------------------------------------------------------------------------------
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


async def test_stream_ids_follow_the_documented_pattern(r, redis_server):
    bad = [".", "..", "-a", "_a", ":a", ".hidden", "a b", "a/b", "", "a" * 129, "é"]
    good = ["a", "cam-1", "gate.north", "site:7_cam", "A" * 128, "0"]
    for sid in bad:
        with pytest.raises(ValueError):
            StreamConfig(id=sid, url="x.mp4")
    for sid in good:
        assert StreamConfig(id=sid, url="x.mp4").id == sid
    assert StreamConfig.model_fields["id"].metadata[0].pattern == ID_PATTERN
    assert ID_PATTERN.replace("\\", "") in (ROOT / "README.md").read_text().replace("\\", "")
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        for sid in (".", "..", "-a"):
            e = await _send(s, "POST", d.api_url + "/api/v1/streams", 422, "invalid_body",
                            json={"id": sid, "url": "redis:frames:x"})
            assert _paths(e["details"]) == ["id"], e
        async with s.get(d.api_url + "/openapi.json", headers=h(READ)) as resp:
            doc = await resp.json()
    param = doc["paths"]["/api/v1/streams/{id}"]["get"]["parameters"][0]
    assert param["schema"]["pattern"] == ID_PATTERN
    assert doc["components"]["schemas"]["StreamConfig"]["properties"]["id"]["pattern"] == ID_PATTERN


# -- 6. errors aiohttp answers itself --------------------------------------------------------------------------
async def test_bad_http_and_head_get_json_errors(r, redis_server):
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        for request in (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\nConnection: close\r\n\r\n",
                        b"GARBAGE\r\n\r\n"):
            status, headers, body = await _raw(d.api_url, request)
            assert status == 400 and headers["content-type"].startswith("application/json"), (status, body)
            err = json.loads(body)["error"]
            assert err["code"] == "bad_request" and isinstance(err["details"], dict), err
            assert b"aaaa" not in body  # the path is not echoed
        # HEAD: what GET would answer, without the body; a route without GET answers 405 with Allow
        for path in ("/api/v1/streams", "/health/live", "/openapi.json"):
            async with s.head(d.api_url + path, headers=h(READ)) as resp:
                assert resp.status == 200, path
        async with s.head(d.api_url + "/api/v1/streams") as resp:
            assert resp.status == 401 and resp.content_type == "application/json"
        async with s.head(d.api_url + "/api/v1/prompts/vlm/global/rollback", headers=h(READ)) as resp:
            assert resp.status == 405 and resp.content_type == "application/json" and resp.headers["Allow"] == "POST"
        async with s.request("TRACE", d.api_url + "/api/v1/streams", headers=h(READ)) as resp:
            e = (await resp.json())["error"]
            assert resp.status == 405 and e["code"] == "method_not_allowed" and "GET" in resp.headers["Allow"]


# -- 7. every error code documented ----------------------------------------------------------------------------
def _codes_in_source() -> set[str]:
    codes: set[str] = set()
    for f in (ROOT / "streamd" / "api").glob("*.py"):
        text = f.read_text()
        codes |= set(re.findall(r"(?:ApiError|error_response)\(\s*[\w.]+,\s*\"([a-z_]+)\"", text))
        for m in re.findall(r"code = \"([a-z_]+)\" if e\.code == \"\w+\" else \"([a-z_]+)\"", text):
            codes |= set(m)
        codes |= set(re.findall(r"\d{3}: \"([a-z_]+)\"", text))  # HTTP_CODES
        codes |= set(re.findall(r"\.get\([\w.]+, \"([a-z_]+)\"\)", text))  # the fallback of HTTP_CODES
    return codes


async def test_every_error_code_is_documented(r, redis_server):
    from streamd.api.errors import CODES

    used = _codes_in_source()
    expected = {"option_not_allowed", "unresolvable_host", "invalid_scope", "invalid_query", "unknown_prompt_kind",
                "cors_denied", "method_not_allowed", "internal", "egress_refused", "redis_key_not_allowed",
                "server_mode_not_allowed", "invalid_option_value", "invalid_json", "invalid_body", "not_ready",
                "redis_unavailable", "bad_request"}
    assert expected <= used, expected - used
    assert used <= set(CODES), used - set(CODES)
    readme = (ROOT / "README.md").read_text()
    table = {m for m in re.findall(r"^\| `([a-z_]+)` \|", readme, re.M)}
    assert set(CODES) <= table, set(CODES) - table
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async with s.get(d.api_url + "/openapi.json", headers=h(READ)) as resp:
            doc = await resp.json()
        async with s.get(d.api_url + "/api/v1/nope", headers=h(READ)) as resp:
            assert (await resp.json())["error"]["details"] == {}
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == set(CODES)
    assert error["properties"]["details"]["type"] == "object"
    assert set(error["required"]) == {"code", "message", "details"}


# -- 8. PATCH without a restart ----------------------------------------------------------------------------------
async def test_patch_of_fps_applies_live_and_an_empty_patch_does_nothing(r, redis_server, clip):
    from conftest import events, results

    cam = {"id": "cam", "url": str(clip), "playback": "realtime", "loop": True, "fps": 2.0}
    async with running(api_cfg(redis_server.url, [cam])) as d, aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/streams/cam"
        await until(lambda: _at_least(r, "cam", 3), 20, what="results at 2 fps")
        runner = d.streams.runners["cam"]
        n_events = len(await events(r, "cam"))
        # nothing to change: 200 with the stream, the same runner, no event
        for body in ({}, {"fps": 2.0, "queue_size": 8}, {"url": str(clip), "playback": "realtime"}):
            async with s.patch(u, json=body, headers=h(OPER)) as resp:
                info = await resp.json()
                assert resp.status == 200 and info["id"] == "cam" and info["fps"] == 2.0, info
            assert d.streams.runners["cam"] is runner
        assert len(await events(r, "cam")) == n_events
        n_before = len(await results(r, "cam"))
        async with s.patch(u, json={"fps": 5.0, "stall_timeout_s": 20}, headers=h(OPER)) as resp:
            info = await resp.json()
            assert resp.status == 200 and info["fps"] == 5.0 and info["state"] == "live", info
        assert d.streams.runners["cam"] is runner and runner.cfg.stall_timeout_s == 20
        await until(lambda: _at_least(r, "cam", n_before + 12), 20, what="results at 5 fps")
        evs = (await events(r, "cam"))[n_events:]
        assert not [e for e in evs if e["type"] in ("state", "discontinuity")], evs
        recs = await results(r, "cam")
        assert [x["seq"] for x in recs] == list(range(len(recs)))  # seq goes on: no new runner, no reconnect
        assert not any(x["discontinuity"] for x in recs[1:])
        gaps = [b["pts_s"] - a["pts_s"] for a, b in zip(recs, recs[1:])]
        before, after = gaps[:n_before - 2], gaps[n_before + 2:]
        assert all(abs(g - 0.5) < 0.05 for g in before), before
        assert all(abs(g - 0.2) < 0.05 for g in after), after
    assert json.loads(await r.hget("streamd:api:streams", "cam"))["fps"] == 5.0  # kept like any PATCH


async def _at_least(r, sid, n):
    from conftest import results

    recs = await results(r, sid)
    return recs if len(recs) >= n else None


# -- 9. one schema for POST and PATCH, strict types ------------------------------------------------------------
async def test_post_and_patch_share_one_strict_schema(r, redis_server):
    from streamd.api.schemas import StreamPatch

    # PATCH takes every field of POST but the id, with the same bounds
    post, patch = StreamConfig.model_json_schema(), StreamPatch.model_json_schema()
    assert set(patch["properties"]) == set(post["properties"]) - {"id"}
    for name, prop in patch["properties"].items():
        want = {k: v for k, v in post["properties"][name].items() if k != "default"}
        assert {k: v for k, v in prop.items() if k != "default"} == want, name
    cam = {"id": "cam", "url": "redis:frames:cam", "fps": 2.0}
    async with running(api_cfg(redis_server.url, [cam])) as d, aiohttp.ClientSession() as s:
        streams, cam_u = d.api_url + "/api/v1/streams", d.api_url + "/api/v1/streams/cam"
        # the same values are taken or refused by both: queue_size up to 10000, fps and timeouts as POST has them
        for field, value, ok in (("queue_size", 10_000, True), ("queue_size", 10_001, False), ("fps", 500, True),
                                 ("stall_timeout_s", 7200, True), ("open_timeout_s", 3601, False),
                                 ("loop", "yes", False), ("fps", "2", False), ("queue_size", 4.0, False),
                                 ("queue_size", True, False), ("url", 5, False), ("drop_policy", "wait", True),
                                 ("ffmpeg_options", {"a b": "x"}, False), ("reconnect", {"max_attempts": "3"}, False)):
            body = {"id": f"x{len(field)}", "url": "redis:frames:x", field: value}
            if ok:
                async with s.post(streams, json=body, headers=h(OPER)) as resp:
                    assert resp.status == 201, (field, value, await resp.text())
                async with s.delete(f"{streams}/{body['id']}", headers=h(OPER)) as resp:
                    assert resp.status == 204
                async with s.patch(cam_u, json={field: value}, headers=h(OPER)) as resp:
                    assert resp.status == 200, (field, value, await resp.text())
            else:
                e = await _send(s, "POST", streams, 422, "invalid_body", json=body)
                assert _paths(e["details"])[0].startswith(field), e
                e = await _send(s, "PATCH", cam_u, 422, "invalid_body", json={field: value})
                assert _paths(e["details"])[0].startswith(field), e
        # prompts: strict rollback versions, no field the kind ignores, no empty phrases
        base = d.api_url + "/api/v1/prompts"
        async with s.put(base + "/vlm/global", json={"text": "q?"}, headers=h(OPER)) as resp:
            assert resp.status == 201
        for version in (True, "1", 1.0):
            await _send(s, "POST", base + "/vlm/global/rollback", 422, "invalid_body", json={"version": version})
        e = await _send(s, "PUT", base + "/vlm/global", 422, "invalid_body", json={"text": "q?", "phrases": ["a"]})
        assert _paths(e["details"]) == ["phrases"], e
        for body in ({"phrases": ["a"], "text": "q?"}, {"phrases": ["a"], "schema": {"type": "object"}}):
            e = await _send(s, "PUT", base + "/vocabulary/global", 422, "invalid_body", json=body)
            assert _paths(e["details"]) in (["text"], ["schema"]), e
        for phrases in ([], [""], ["person", "  "]):
            await _send(s, "PUT", base + "/vocabulary/global", 422, "invalid_body", json={"phrases": phrases})
        async with s.put(base + "/vocabulary/global", json={"phrases": ["person"]}, headers=h(OPER)) as resp:
            assert resp.status == 201
        async with s.post(base + "/vlm/global/rollback", json={"version": 1}, headers=h(OPER)) as resp:
            assert resp.status == 201


# -- 10. failed authentication is throttled per client address ------------------------------------------------
async def test_failed_authentication_is_throttled_per_address(r, redis_server):
    assert parse_config({}, environ={}).api.auth_failure_limit == 20  # the default (config/streamd.yaml says so)
    async with running(api_cfg(redis_server.url, auth_failure_limit=3, auth_failure_window_s=2)) as d, \
            aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/streams"
        for _ in range(5):  # no token, and successful requests, are no failed guesses
            async with s.get(u) as resp:
                assert resp.status == 401
            async with s.get(u, headers=h(READ)) as resp:
                assert resp.status == 200
        for i in range(3):
            await _send(s, "GET", u, 401, "unauthorized", token=f"wrong-token-{i:016d}")
        t0 = asyncio.get_running_loop().time()
        for token in ("wrong-token-0123456789abcdef", READ):  # refused whatever the token: it is not checked
            e = await _send(s, "GET", u, 429, "too_many_auth_failures", token=token)
            assert 0 < e["details"]["retry_after_s"] <= 2
        async with s.get(u, headers=h(ADMIN)) as resp:
            assert resp.status == 429 and 1 <= int(resp.headers["Retry-After"]) <= 2
        async with s.get(d.api_url + "/health/live") as resp:
            assert resp.status == 200  # public routes need no token
        await asyncio.sleep(max(0.0, t0 + 2.1 - asyncio.get_running_loop().time()))
        async with s.get(u, headers=h(READ)) as resp:
            assert resp.status == 200, await resp.text()  # the window passed


# -- 11. an exhausted Redis pool is 503 busy, not redis_unavailable --------------------------------------------
async def test_an_exhausted_api_redis_pool_is_503_busy(r, redis_server):
    assert parse_config({}, environ={}).api.redis_pool == 64
    async with running(api_cfg(redis_server.url, redis_pool=2)) as d, aiohttp.ClientSession() as s:
        u = d.api_url + "/api/v1/prompts"
        async with s.get(u, headers=h(READ)) as resp:
            assert resp.status == 200
        pool = d.redis.connection_pool
        assert pool.max_connections == 2
        held = [await pool.get_connection() for _ in range(2)]  # every connection of the API busy
        try:
            e = await _send(s, "GET", u, 503, "busy", token=READ)
            assert e["details"] == {"pool": "api.redis_pool"}, e
            async with s.get(u + "/vlm/global", headers=h(READ)) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["code"] == "busy"
        finally:
            for c in held:
                await pool.release(c)
        async with s.get(u, headers=h(READ)) as resp:
            assert resp.status == 200, await resp.text()

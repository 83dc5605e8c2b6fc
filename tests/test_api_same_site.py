"""Without tokens (loopback only) a web page on another site must not drive the daemon (issue 16): Host and Origin
are checked, mutating bodies must be JSON; error responses carry CORS headers so an allowed page can read them."""

from __future__ import annotations

import aiohttp

from streamd.keys import API_STREAMS_KEY
from conftest import ADMIN, READ, api_cfg, h, make_config, running

STREAM = '{"id": "csrf", "url": "redis:frames:csrf", "pipeline": "frame_info"}'


def open_cfg(redis_url, **api):
    """No tokens: loopback only, anyone on the machine may act."""
    return make_config(redis_url, [], api={"enabled": True, "port": 0, **api})


async def test_a_text_plain_post_from_a_page_creates_nothing(r, redis_server):
    """What a page on any site can send without a CORS preflight: a text/plain (or form) POST. Accepted before."""
    async with running(open_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        url = d.api_url + "/api/v1/streams"
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            async with s.post(url, data=STREAM, headers={"Content-Type": ctype}) as resp:
                body = await resp.json()
                assert resp.status == 415 and body["error"]["code"] == "unsupported_media_type", body
        assert d.streams.runners == {} and await r.hgetall(API_STREAMS_KEY) == {}
        async with s.post(url, data=STREAM, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 201, await resp.text()


async def test_host_must_be_loopback_with_the_apis_port(r, redis_server):
    async with running(open_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        port = d.api.port
        url = d.api_url + "/api/v1/streams"
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", f"127.0.0.1:{port + 1}",
                     "127.0.0.1", f"10.0.0.1:{port}", f"[::1]x:{port}", f"localhost.attacker.example:{port}"):
            async with s.get(url, headers={"Host": host}) as resp:
                body = await resp.json()
                assert resp.status == 403 and body["error"]["code"] == "host_not_allowed", (host, body)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"127.0.0.2:{port}",
                     f"[::1]:{port}"):
            async with s.get(url, headers={"Host": host}) as resp:
                assert resp.status == 200, (host, await resp.text())
        # a DNS-rebinding page cannot add a stream either
        async with s.post(url, data=STREAM, headers={"Host": f"rebind.attacker.example:{port}",
                                                     "Content-Type": "application/json"}) as resp:
            assert resp.status == 403
        assert await r.hgetall(API_STREAMS_KEY) == {}


async def test_origin_must_be_the_apis_own_or_allowed(r, redis_server):
    cfg = open_cfg(redis_server.url, cors_origins=["http://dashboard.local:3000"])
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        url = d.api_url + "/api/v1/streams"
        for origin in ("http://attacker.example", "null", f"http://localhost:{d.api.port}"):
            async with s.post(url, data=STREAM, headers={"Origin": origin, "Content-Type": "application/json"}) \
                    as resp:
                body = await resp.json()
                assert resp.status == 403 and body["error"]["code"] == "cross_origin_refused", (origin, body)
        async with s.get(url, headers={"Sec-Fetch-Site": "cross-site"}) as resp:
            assert resp.status == 403
        assert await r.hgetall(API_STREAMS_KEY) == {}
        async with s.get(url, headers={"Origin": d.api_url}) as resp:  # the page the daemon serves itself
            assert resp.status == 200
        async with s.get(url, headers={"Origin": "http://dashboard.local:3000"}) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "http://dashboard.local:3000"


async def test_errors_carry_cors_headers(r, redis_server):
    """An allowed origin's page can read why it was refused (401, 404 ...): before, only successes had them."""
    cfg = api_cfg(redis_server.url, cors_origins=["http://dashboard.local:3000"])
    origin = {"Origin": "http://dashboard.local:3000"}
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        async with s.get(d.api_url + "/api/v1/streams", headers=origin) as resp:
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == "http://dashboard.local:3000"
            assert "ETag" in resp.headers["Access-Control-Expose-Headers"]
        async with s.get(d.api_url + "/api/v1/streams/nosuch/results", headers={**origin, **h(READ)}) as resp:
            assert resp.status == 404 and resp.headers["Access-Control-Allow-Origin"] == origin["Origin"]
        async with s.get(d.api_url + "/api/v1/streams", headers={"Origin": "http://other.example"}) as resp:
            assert resp.status == 401 and "Access-Control-Allow-Origin" not in resp.headers
        # the live results too (their headers go out before the first event)
        body = {"id": "yard", "url": "redis:frames:yard", "pipeline": "frame_info"}
        async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(ADMIN)) as resp:
            assert resp.status == 201
        async with s.get(d.api_url + "/api/v1/streams/yard/results/live", params={"timeout_s": "1"},
                         headers={**origin, **h(READ)}) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == origin["Origin"]
            await resp.read()
        # with tokens the Host is not checked (the token is what protects the API)
        async with s.get(d.api_url + "/api/v1/streams", headers={**h(READ), "Host": "streamd.example"}) as resp:
            assert resp.status == 200

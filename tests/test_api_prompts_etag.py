"""Deleting a prompt (a tombstone version) and optimistic concurrency with ETag / If-Match (RFC 9110), against a real
daemon, real Redis and real HTTP."""

import asyncio
import re
from pathlib import Path

import aiohttp

from streamd.api.errors import CODES
from streamd.testing.openai import ScriptedOpenAI, prompt_text
from conftest import ADMIN, OPER, READ, api_cfg, h, results, running, until, vlm_pipeline, vlm_records

ROOT = Path(__file__).resolve().parents[1]
P = "/api/v1/prompts"


async def _json(resp):
    return resp.status, await resp.json()


async def test_delete_writes_a_tombstone_version_and_history_keeps_every_version(r, redis_server):
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        url = d.api_url + P + "/vlm/stream:cam"
        for text in ("first", "second"):
            async with s.put(url, json={"text": text}, headers=h(ADMIN)) as resp:
                assert resp.status == 201
        async with s.delete(url + "?note=camera+moved", headers=h(OPER)) as resp:
            status, tomb = await _json(resp)
        assert status == 200, tomb
        assert tomb == {**tomb, "version": 3, "kind": "vlm", "scope": "stream:cam", "deleted": True, "author": "ops",
                        "note": "camera moved"}
        assert "text" not in tomb and isinstance(tomb["created_ts"], float)
        async with s.get(url, headers=h(READ)) as resp:
            status, body = await _json(resp)
        assert status == 404 and body["error"]["code"] == "prompt_deleted"
        assert body["error"]["details"] == {"version": 3} and "ETag" not in resp.headers
        async with s.get(url + "/history", headers=h(READ)) as resp:
            hist = await resp.json()
        assert hist["total"] == 3 and [v["version"] for v in hist["versions"]] == [3, 2, 1]
        assert hist["versions"][0] == tomb and [v.get("text") for v in hist["versions"]] == [None, "second", "first"]
        async with s.get(d.api_url + P, headers=h(READ)) as resp:
            assert (await resp.json())["prompts"] == []
        # a delete of a deleted prompt, or of one that never was, is a 404 and writes nothing
        async with s.delete(url, headers=h(OPER)) as resp:
            status, body = await _json(resp)
        assert status == 404 and body["error"]["code"] == "prompt_deleted" and body["error"]["details"]["version"] == 3
        async with s.delete(d.api_url + P + "/vlm/stream:nobody", headers=h(OPER)) as resp:
            status, body = await _json(resp)
        assert status == 404 and body["error"]["code"] == "prompt_not_found"
        async with s.delete(d.api_url + P + "/vocabulary/stream:cam", headers=h(OPER)) as resp:
            assert resp.status == 404  # another kind at the same scope is another prompt
        async with s.get(url + "/history", headers=h(READ)) as resp:
            assert (await resp.json())["total"] == 3
        async with s.delete(url, headers=h(READ)) as resp:
            assert resp.status == 403
        # a later PUT goes on counting; a delete then a rollback brings an old content back as a new version
        async with s.put(url, json={"text": "third"}, headers=h(OPER)) as resp:
            status, rec = await _json(resp)
        assert status == 201 and rec["version"] == 4 and "deleted" not in rec
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.status == 200 and (await resp.json())["text"] == "third"
        async with s.get(d.api_url + P, headers=h(READ)) as resp:
            assert [x["version"] for x in (await resp.json())["prompts"]] == [4]
        async with s.delete(url, headers=h(OPER)) as resp:
            assert resp.status == 200 and (await resp.json())["version"] == 5
        async with s.post(url + "/rollback", json={"version": 1}, headers=h(OPER)) as resp:
            status, rec = await _json(resp)
        assert status == 201 and (rec["version"], rec["text"], rec["rolled_back_from"]) == (6, "first", 1)
        async with s.get(url, headers=h(READ)) as resp:
            assert (await resp.json())["version"] == 6
        # a tombstone is no content to roll back to
        async with s.post(url + "/rollback", json={"version": 5}, headers=h(OPER)) as resp:
            status, body = await _json(resp)
        assert status == 422 and body["error"]["code"] == "invalid_body"
        assert body["error"]["details"]["errors"][0]["path"] == "version"
        async with s.get(url + "/history", headers=h(READ)) as resp:
            assert (await resp.json())["total"] == 6
        # a note is a query parameter of bounded length
        async with s.delete(url + "?note=" + "x" * 1001, headers=h(OPER)) as resp:
            status, body = await _json(resp)
        assert status == 422 and body["error"]["code"] == "invalid_query"
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.status == 200


async def test_a_deleted_prompt_gives_way_to_the_next_scope_at_the_next_frame(r, redis_server, clip):
    srv = await ScriptedOpenAI(lambda req: "answer to: " + prompt_text(req)).start()
    cfg = api_cfg(redis_server.url, [{"id": "v", "url": str(clip), "fps": 10.0, "playback": "realtime", "loop": True,
                                      "pipeline": "p"}], pipelines={"p": vlm_pipeline(srv.url, every_s=0)})

    async def scope_seen(scope):
        recs = await results(r, "v")
        return recs if recs and recs[-1]["prompt_versions"]["vlm"]["scope"] == scope else None

    async def more(n):
        return len(await results(r, "v")) >= n

    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            base = d.api_url + P + "/vlm/"
            for scope in ("global", "pipeline:p", "stream:v"):
                async with s.put(base + scope, json={"text": f"asked at {scope}"}, headers=h(OPER)) as resp:
                    assert resp.status == 201
            await until(lambda: scope_seen("stream:v"), 20, what="the stream's prompt")
            for deleted, nxt in (("stream:v", "pipeline:p"), ("pipeline:p", "global"), ("global", "config")):
                async with s.delete(base + deleted, headers=h(OPER)) as resp:
                    assert resp.status == 200
                await until(lambda nxt=nxt: scope_seen(nxt), 20, what=f"{nxt} after deleting {deleted}")
                rec = d.prompt_cache.resolve("vlm", "v", "p")
                assert (rec and rec["scope"]) == (None if nxt == "config" else nxt)
                n = len(await results(r, "v"))
                await until(lambda n=n: more(n + 3), 20, what="a few frames more")
    finally:
        await srv.stop()
    stamps = [x["prompt_versions"]["vlm"] for x in await results(r, "v")]
    scopes = [st["scope"] for st in stamps]
    tail = scopes[scopes.index("stream:v"):]
    blocks = [sc for i, sc in enumerate(tail) if i == 0 or tail[i - 1] != sc]
    assert blocks == ["stream:v", "pipeline:p", "global", "config"], blocks  # each switch once, never back
    assert all(st == {"scope": "config", "version": 0} for st in stamps if st["scope"] == "config")
    answers = [a for a in await vlm_records(r, "v") if a["prompt"]["scope"] != "config"]
    assert {a["prompt"]["scope"] for a in answers} >= {"stream:v", "pipeline:p", "global"}
    assert all(a["text"] == f"answer to: asked at {a['prompt']['scope']}" for a in answers)
    # a daemon started later loads the tombstones as "no prompt" too
    async with running(api_cfg(redis_server.url)) as d2:
        await asyncio.wait_for(d2.prompt_cache.loaded.wait(), 10)
        assert d2.prompt_cache.resolve("vlm", "v", "p") is None


async def test_prompt_etag_and_if_match(r, redis_server):
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        url = d.api_url + P + "/vocabulary/global"
        # nothing exists: If-Match, even *, fails and writes nothing
        for tag in ("*", '"v1"'):
            async with s.put(url, json={"phrases": ["cat"]}, headers={**h(OPER), "If-Match": tag}) as resp:
                status, body = await _json(resp)
            assert status == 412 and body["error"]["code"] == "precondition_failed", body
            assert body["error"]["details"] == {"current_etag": None}
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "prompt_not_found"
        # without If-Match, as before; the answer carries the new ETag, GET the same
        async with s.put(url, json={"phrases": ["cat"]}, headers=h(OPER)) as resp:
            assert resp.status == 201 and resp.headers["ETag"] == '"v1"'
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == '"v1"'
        async with s.head(url, headers=h(READ)) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == '"v1"'
        async with s.put(url, json={"phrases": ["dog"]}, headers={**h(OPER), "If-Match": '"v1"'}) as resp:
            assert resp.status == 201 and resp.headers["ETag"] == '"v2"'
        # a stale tag, a weak one, a malformed field: 412 with the current ETag, nothing written
        for tag in ('"v1"', 'W/"v2"', 'v2', '"v2', '"2"'):
            async with s.put(url, json={"phrases": ["eel"]}, headers={**h(OPER), "If-Match": tag}) as resp:
                status, body = await _json(resp)
            assert status == 412 and body["error"]["details"] == {"current_etag": '"v2"'}, (tag, body)
        # a list matches any of its tags; * anything that exists
        async with s.put(url, json={"phrases": ["eel"]}, headers={**h(OPER), "If-Match": '"v7", "v2"'}) as resp:
            assert resp.status == 201 and resp.headers["ETag"] == '"v3"'
        async with s.put(url, json={"phrases": ["fox"]}, headers={**h(OPER), "If-Match": "*"}) as resp:
            assert resp.status == 201 and resp.headers["ETag"] == '"v4"'
        # rollback: conditional too, and its answer has the new ETag
        async with s.post(url + "/rollback", json={"version": 1}, headers={**h(OPER), "If-Match": '"v3"'}) as resp:
            assert resp.status == 412 and (await resp.json())["error"]["details"]["current_etag"] == '"v4"'
        async with s.post(url + "/rollback", json={"version": 1}, headers={**h(OPER), "If-Match": '"v4"'}) as resp:
            assert resp.status == 201 and resp.headers["ETag"] == '"v5"'
        # delete: a stale tag is 412 and the prompt stays; the current one deletes it
        async with s.delete(url, headers={**h(OPER), "If-Match": '"v4"'}) as resp:
            assert resp.status == 412 and (await resp.json())["error"]["details"]["current_etag"] == '"v5"'
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.status == 200 and (await resp.json())["phrases"] == ["cat"]
        async with s.delete(url, headers={**h(OPER), "If-Match": '"v5"'}) as resp:
            assert resp.status == 200 and (await resp.json())["version"] == 6
        # a deleted prompt has no ETag: If-Match fails; a delete of it is still a 404 (found nothing to delete)
        async with s.put(url, json={"phrases": ["gnu"]}, headers={**h(OPER), "If-Match": "*"}) as resp:
            status, body = await _json(resp)
        assert status == 412 and body["error"]["details"] == {"current_etag": None}
        async with s.delete(url, headers={**h(OPER), "If-Match": '"v6"'}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "prompt_deleted"
        async with s.get(url + "/history", headers=h(READ)) as resp:
            assert (await resp.json())["total"] == 6


async def test_two_clients_with_the_same_prompt_etag_exactly_one_wins(r, redis_server):
    async with running(api_cfg(redis_server.url)) as d, \
            aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
        url = d.api_url + P + "/vlm/pipeline:p"
        async with a.put(url, json={"text": "start"}, headers=h(OPER)) as resp:
            assert resp.status == 201
        for i in range(20):
            tags = []
            for c in (a, b):  # both read the same version
                async with c.get(url, headers=h(READ)) as resp:
                    tags.append(resp.headers["ETag"])
            assert tags[0] == tags[1] == f'"v{i + 1}"'

            async def put(c, text, tag):
                async with c.put(url, json={"text": text}, headers={**h(OPER), "If-Match": tag}) as resp:
                    return resp.status, await resp.json()

            answers = await asyncio.gather(put(a, f"a{i}", tags[0]), put(b, f"b{i}", tags[1]))
            assert sorted(st for st, _ in answers) == [201, 412], answers
            won = next(body for st, body in answers if st == 201)
            lost = next(body for st, body in answers if st == 412)
            assert won["version"] == i + 2 and lost["error"]["details"]["current_etag"] == f'"v{i + 2}"'
            async with a.get(url, headers=h(READ)) as resp:
                assert (await resp.json())["text"] == won["text"]
        # and for deletes: one tombstone, the other sees it
        async with a.get(url, headers=h(READ)) as resp:
            tag = resp.headers["ETag"]

        async def delete(c):
            async with c.delete(url, headers={**h(OPER), "If-Match": tag}) as resp:
                return resp.status

        assert sorted(await asyncio.gather(delete(a), delete(b))) in ([200, 404], [200, 412])
        async with a.get(url + "/history", headers=h(READ)) as resp:
            assert (await resp.json())["total"] == 22


REDIS_STREAM = {"id": "cam", "url": "redis:frames:cam", "fps": 2.0, "pipeline": "frame_info"}


async def test_stream_etag_and_if_match(r, redis_server):
    async with running(api_cfg(redis_server.url, allowed_schemes=["redis"])) as d, aiohttp.ClientSession() as s:
        url = d.api_url + "/api/v1/streams/cam"
        async with s.patch(url, json={"fps": 1.0}, headers={**h(OPER), "If-Match": "*"}) as resp:
            assert resp.status == 404  # nothing to match: not found first
        async with s.post(d.api_url + "/api/v1/streams", json=REDIS_STREAM, headers=h(OPER)) as resp:
            assert resp.status == 201, await resp.text()
            created = resp.headers["ETag"]
        assert re.fullmatch(r'"[0-9a-f]{16}"', created)
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == created
        # a stale ETag: 412 with the current one, the stream unchanged
        async with s.patch(url, json={"fps": 1.0}, headers={**h(OPER), "If-Match": '"0123456789abcdef"'}) as resp:
            status, body = await _json(resp)
        assert status == 412 and body["error"] == {"code": "precondition_failed", "message": body["error"]["message"],
                                                   "details": {"current_etag": created}}
        assert d.streams.stream_config("cam").fps == 2.0
        # the current one: changed; the answer's ETag is the new one, and GET agrees
        async with s.patch(url, json={"fps": 1.0}, headers={**h(OPER), "If-Match": created}) as resp:
            assert resp.status == 200 and (await resp.json())["fps"] == 1.0
            changed = resp.headers["ETag"]
        assert changed != created
        async with s.get(url, headers=h(READ)) as resp:
            assert resp.headers["ETag"] == changed
        # a change that changes nothing keeps the ETag; without If-Match as before
        async with s.patch(url, json={}, headers={**h(OPER), "If-Match": changed}) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == changed
        async with s.patch(url, json={"fps": 2.0}, headers=h(OPER)) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == created  # the same configuration, the same tag
        # delete: stale is 412 and the stream stays; * deletes what exists
        async with s.delete(url, headers={**h(OPER), "If-Match": changed}) as resp:
            status, body = await _json(resp)
        assert status == 412 and body["error"]["details"] == {"current_etag": created}
        assert d.streams.has_stream("cam")
        async with s.delete(url, headers={**h(OPER), "If-Match": "*"}) as resp:
            assert resp.status == 204
        assert not d.streams.has_stream("cam")


async def test_two_clients_with_the_same_stream_etag_exactly_one_wins(r, redis_server):
    async with running(api_cfg(redis_server.url, allowed_schemes=["redis"])) as d, \
            aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
        url = d.api_url + "/api/v1/streams/cam"
        async with a.post(d.api_url + "/api/v1/streams", json=REDIS_STREAM, headers=h(OPER)) as resp:
            assert resp.status == 201
        for i, (fa, fb) in enumerate([(1.0, 3.0), (4.0, 5.0), (6.0, 7.0)]):
            tags = []
            for c in (a, b):
                async with c.get(url, headers=h(READ)) as resp:
                    tags.append(resp.headers["ETag"])
            assert tags[0] == tags[1]

            async def patch(c, body, tag):
                async with c.patch(url, json=body, headers={**h(OPER), "If-Match": tag}) as resp:
                    return resp.status, await resp.json()

            # one changes the fps live, the other also a field that restarts the stream
            answers = await asyncio.gather(patch(a, {"fps": fa}, tags[0]),
                                           patch(b, {"fps": fb, "queue_size": 4 + i}, tags[1]))
            assert sorted(st for st, _ in answers) == [200, 412], answers
            won = next(body for st, body in answers if st == 200)
            assert d.streams.stream_config("cam").fps == won["fps"]


async def test_openapi_and_readme_describe_delete_and_the_headers(r, redis_server):
    assert CODES["prompt_deleted"][0] == 404 and CODES["precondition_failed"][0] == 412
    readme = (ROOT / "README.md").read_text()
    assert {"prompt_deleted", "precondition_failed"} <= set(re.findall(r"^\| `([a-z_]+)` \|", readme, re.M))
    assert "DELETE /api/v1/prompts/<kind>/<scope>" in readme and "If-Match" in readme and "ETag" in readme
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async with s.get(d.api_url + "/openapi.json", headers=h(READ)) as resp:
            doc = await resp.json()
    prompt = doc["paths"]["/api/v1/prompts/{kind}/{scope}"]
    assert set(prompt) == {"get", "put", "delete"}
    delete = prompt["delete"]
    assert {"200", "404", "412"} <= set(delete["responses"])
    assert delete["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PromptRecord")
    assert "deleted" in doc["components"]["schemas"]["PromptRecord"]["properties"]
    assert {p["name"] for p in delete["parameters"]} == {"kind", "scope", "note", "If-Match"}
    stream = doc["paths"]["/api/v1/streams/{id}"]
    conditional = [prompt["put"], prompt["delete"], stream["patch"], stream["delete"],
                   doc["paths"]["/api/v1/prompts/{kind}/{scope}/rollback"]["post"]]
    for op in conditional:
        assert any(p["in"] == "header" and p["name"] == "If-Match" for p in op["parameters"]), op["operationId"]
        assert "412" in op["responses"], op["operationId"]
    for op, code in ((prompt["get"], "200"), (prompt["put"], "201"), (stream["get"], "200"), (stream["patch"], "200"),
                     (doc["paths"]["/api/v1/streams"]["post"], "201")):
        assert "ETag" in op["responses"][code]["headers"], op["operationId"]
    assert "412" not in doc["paths"]["/api/v1/streams"]["get"]["responses"]


async def test_cors_preflight_allows_if_match_and_exposes_the_etag(r, redis_server):
    async with running(api_cfg(redis_server.url, cors_origins=["http://ui.example"])) as d, \
            aiohttp.ClientSession() as s:
        async with s.options(d.api_url + "/api/v1/prompts/vlm/global", headers={
                "Origin": "http://ui.example", "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "if-match"}) as resp:
            assert resp.status == 204
            assert "if-match" in resp.headers["Access-Control-Allow-Headers"].lower()
        async with s.put(d.api_url + "/api/v1/prompts/vlm/global", json={"text": "x"},
                         headers={**h(OPER), "Origin": "http://ui.example"}) as resp:
            assert resp.status == 201 and "etag" in resp.headers["Access-Control-Expose-Headers"].lower()

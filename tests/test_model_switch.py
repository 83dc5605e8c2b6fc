"""Switching a stage's model live (issue 14): PATCH /api/v1/pipelines/{name} loads the new model while the old one
serves, then every stream of the pipeline switches between two batches: no frame lost, none processed by a mix,
each record naming its model and the weights' version; a model that cannot load leaves the old one serving with
an event; the change is a version in Redis that a restarted daemon and the other daemons on the Redis follow;
rollback; the old model unloads after its keep_alive_s. Real daemons, real redis-server, real HTTP, real models
(YOLO built from yaml: two different architectures, random weights, offline)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import aiohttp

from conftest import LOOPBACK_ALLOWED, OPER, READ, api_cfg, at_least, events, h, make_config, results, running, until

OLD = "yolo11n.yaml"  # the pipeline's configured model: a source, with the stage's own device and runtime
NEW = "v8"  # the API switches to declared models (or aliases), never to a path or URL a request names
MISSING = "/nonexistent/weights/missing.pt"
CATALOG = {NEW: {"source": "yolov8n.yaml", "device": "cpu", "options": {"runtime": "torch"}},
           "broken": {"source": MISSING, "device": "cpu"}}
PIPE = {"stages": [{"type": "detect", "model": OLD, "conf": 0.0, "imgsz": 160, "max_det": 3, "runtime": "torch"},
                   {"type": "frame_info"}]}
FPS = 5.0


def cams(clip: Any, *ids: str) -> list[dict[str, Any]]:
    """Looping file streams sampled at 5 fps in real time; `wait`: a full queue holds the decoder, never drops."""
    return [{"id": i, "url": str(clip), "playback": "realtime", "loop": True, "fps": FPS, "pipeline": "sw",
             "drop_policy": "wait"} for i in ids]


def config(redis_url: str, streams: list[dict[str, Any]], **models: Any) -> Any:
    api = api_cfg(redis_url).api.model_dump()
    return make_config(redis_url, streams, api=api, egress=LOOPBACK_ALLOWED, pipelines={"sw": PIPE},
                       models={"catalog": CATALOG, **models})


async def patch(s: aiohttp.ClientSession, d: Any, body: dict[str, Any], token: str = OPER,
                name: str = "sw") -> tuple[int, dict[str, Any]]:
    async with s.patch(f"{d.api_url}/api/v1/pipelines/{name}", json=body, headers=h(token)) as resp:
        return resp.status, await resp.json()


async def pipeline_info(s: aiohttp.ClientSession, d: Any, name: str = "sw") -> dict[str, Any]:
    async with s.get(d.api_url + "/api/v1/pipelines", headers=h(READ)) as resp:
        assert resp.status == 200
        return next(p for p in (await resp.json())["pipelines"] if p["name"] == name)


async def more(r: Any, sid: str, n: int) -> list[dict[str, Any]]:
    """Wait until the stream has `n` results more than now."""
    have = len(await results(r, sid))
    return await until(lambda: at_least(r, sid, have + n), 60, what=f"{n} more results of {sid}")


def models_in_order(recs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(x["outputs"]["detect"]["model"], x["outputs"]["detect"]["model_version"]) for x in recs]


def largest_gap_s(recs: list[dict[str, Any]], t0: float, t1: float) -> float:
    """The largest time between two consecutive results published within [t0, t1]."""
    ts = [x["publish_ts"] for x in recs if t0 <= x["publish_ts"] <= t1]
    return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


async def test_a_live_switch_on_three_streams_loses_no_frame_and_never_mixes_models(r, redis_server, clip):
    ids = ("cam-a", "cam-b", "cam-c")
    async with running(config(redis_server.url, cams(clip, *ids), keep_alive_s=1.0)) as d, \
            aiohttp.ClientSession() as s:
        for sid in ids:
            await until(lambda: at_least(r, sid, 5), 60, what=f"results of {sid}")
        old_version = d.models.get_entry(OLD).version
        t_patch = time.time()
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "model": NEW}], "note": "v8 instead"})
        t_done = time.time()
        assert status == 200, body
        assert body["status"] == "switched" and body["streams"] == sorted(ids)
        rec = body["record"]
        assert rec["version"] == 1 and rec["stages"] == {"detect": {"model": NEW}}
        assert rec["author"] == "ops" and rec["note"] == "v8 instead" and rec["created_ts"] > 0
        sw = body["switched"][0]
        new_version = sw["model_version"]
        assert sw == {"stage": "detect", "model": NEW, "model_version": new_version, "from_model": OLD,
                      "from_version": old_version}
        assert old_version.startswith("sha256:") and new_version.startswith("sha256:") and old_version != new_version
        assert d.models.get_entry(NEW).version_method == "weights"  # a .yaml: the loaded tensors are hashed
        # the old model is released: nothing holds it, and it unloads keep_alive_s (1 s) after its last call
        await until(lambda: d.models.get_entry(OLD).state.value == "unloaded", 10, 0.05,
                    what="the old model unloaded")
        unloaded_after_s = time.time() - t_done
        assert d.models.get_entry(OLD).reason == "idle for 1 s"
        assert d.models.get_entry(NEW).state.value == "ready"
        assert d.models.get_entry(NEW).users()["streams"] == sorted(ids)
        info = await pipeline_info(s, d)
        assert info["version"] == 1 and info["changes"] == {"detect": {"model": NEW}}
        assert info["stages"][0]["model"] == NEW
        assert info["stages"][0]["serving"] == {"model": NEW, "model_version": new_version}
        assert info["last_switch"]["state"] == "switched" and info["last_switch"]["version"] == 1
        for sid in ids:
            await more(r, sid, 10)
    gaps = []
    for sid in ids:
        recs = await results(r, sid)
        assert [x["seq"] for x in recs] == list(range(len(recs))), f"{sid}: a seq missing or repeated"
        assert all(x["error"] is None for x in recs)
        order = models_in_order(recs)
        k = order.index((NEW, new_version))  # the first frame of the new model: old before it, new from it on
        assert k >= 5 and len(order) - k >= 10, (sid, k, len(order))
        assert order[:k] == [(OLD, old_version)] * k and order[k:] == [(NEW, new_version)] * (len(order) - k), sid
        evs = await events(r, sid, "model_switched")
        assert len(evs) == 1 and evs[0]["from_version"] == old_version and evs[0]["model_version"] == new_version
        assert evs[0]["pipeline"] == "sw" and evs[0]["version"] == 1 and evs[0]["stage"] == "detect"
        gaps.append(largest_gap_s(recs, t_patch - 1.0, t_done + 2.0))
    print(f"\nswitch answered in {t_done - t_patch:.2f} s; largest gap between two results of a stream around it: "
          f"{max(gaps) * 1000:.0f} ms (frame period {1000 / FPS:.0f} ms); old model unloaded {unloaded_after_s:.2f} s "
          "after the switch (keep_alive_s 1)")
    # the target (2 periods) is the benchmark's (benchmarks/model_switch.py), measured on a quiet machine; here only
    # a stall no CPU contention explains: a load or an unload on the event loop, a full collection per switch
    assert max(gaps) < 5 / FPS, gaps


async def test_a_model_that_cannot_load_leaves_the_old_one_serving_with_an_event(r, redis_server, clip):
    ids = ("cam-a", "cam-b")
    async with running(config(redis_server.url, cams(clip, *ids))) as d, aiohttp.ClientSession() as s:
        for sid in ids:
            await until(lambda: at_least(r, sid, 3), 60, what=f"results of {sid}")
        old_version = d.models.get_entry(OLD).version
        status, body = await patch(s, d, {"stages": [{"stage": 0, "model": "broken"}]})
        assert status == 422 and body["error"]["code"] == "model_load_failed", body
        assert "No such file" in body["error"]["details"]["reason"] and MISSING in body["error"]["message"]
        for sid in ids:
            evs = await until(lambda: events(r, sid, "model_switch_failed"), 10, what=f"the event on {sid}")
            assert evs[0]["model"] == "broken" and evs[0]["serving"] == OLD and evs[0]["stage"] == "detect"
            assert "No such file" in evs[0]["reason"]
        n = {sid: len(await results(r, sid)) for sid in ids}
        for sid in ids:
            await more(r, sid, 5)
        info = await pipeline_info(s, d)
        assert info["version"] == 0 and info["changes"] == {} and info["stages"][0]["model"] == OLD
        assert info["stages"][0]["serving"] == {"model": OLD, "model_version": old_version}
        assert info["last_switch"]["state"] == "failed" and "No such file" in info["last_switch"]["reason"]
        async with s.get(d.api_url + "/api/v1/pipelines/sw/history", headers=h(READ)) as resp:
            hist = await resp.json()
        assert hist["total"] == 1 and [v["version"] for v in hist["versions"]] == [0]  # nothing was written

        # refused before anything loads: 422 naming the part of the body, 404, 403
        for source in (MISSING, "yolov8n.yaml", "https://models.example/x.pt"):  # never a path or URL
            status, body = await patch(s, d, {"stages": [{"stage": 0, "model": source}]})
            assert status == 422 and body["error"]["details"]["errors"][0]["path"] == "stages.0.model", body
            assert "is not declared" in body["error"]["message"] and "declared: broken, v8" in body["error"]["message"]
        status, body = await patch(s, d, {"stages": [{"stage": "nope", "model": NEW}]})
        assert status == 422 and body["error"]["details"]["errors"][0]["path"] == "stages.0.stage", body
        status, body = await patch(s, d, {"stages": [{"stage": 5, "model": NEW}]})
        assert status == 422 and "no stage 5" in body["error"]["message"], body
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "device": "cpu"}]})
        assert status == 422 and body["error"]["details"]["errors"][0]["path"] == "stages.0.device", body
        status, body = await patch(s, d, {"stages": [{"stage": "frame_info", "model": NEW}]})
        assert status == 422 and "cannot change while it runs" in body["error"]["message"], body
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "conf": 2}]})
        assert status == 422 and body["error"]["code"] == "invalid_body", body
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "model": NEW}]}, name="nope")
        assert status == 404 and body["error"]["code"] == "pipeline_not_found", body
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "model": NEW}]}, token=READ)
        assert status == 403, body
        # the model loads, and the stage cannot use it: a class it does not have
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "classes": ["unicorn"]}]})
        assert status == 422 and "'unicorn' is not one of the model's classes" in body["error"]["message"], body
        # a change of a live option only (the same model): switched the same way
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "conf": 0.5, "max_det": 1}]})
        assert status == 200 and body["record"]["version"] == 1, body
        assert body["switched"][0]["model_version"] == old_version  # the same loaded weights
        # the same change again: nothing to do
        status, body = await patch(s, d, {"stages": [{"stage": "detect", "conf": 0.5}]})
        assert status == 200 and body["status"] == "unchanged" and body["record"]["version"] == 1, body
        for sid in ids:
            await more(r, sid, 3)
    for sid in ids:
        recs = await results(r, sid)
        assert [x["seq"] for x in recs] == list(range(len(recs))), f"{sid}: a seq missing or repeated"
        assert all(x["outputs"]["detect"]["model"] == OLD for x in recs)
        assert {x["outputs"]["detect"]["model_version"] for x in recs} == {old_version}
        after = recs[n[sid]:]
        assert all(len(x["outputs"]["detect"]["detections"]) <= 1 for x in after[-3:])  # max_det 1 took effect


async def test_other_daemons_follow_a_switch_a_restart_keeps_it_and_a_rollback_undoes_it(r, redis_server, clip):
    async with running(config(redis_server.url, cams(clip, "a"))) as a, \
            running(config(redis_server.url, cams(clip, "b"))) as b, aiohttp.ClientSession() as s:
        for sid in ("a", "b"):
            await until(lambda: at_least(r, sid, 3), 60, what=f"results of {sid}")
        status, body = await patch(s, a, {"stages": [{"stage": "detect", "model": NEW}]})
        assert status == 200 and body["streams"] == ["a"], body
        # daemon b runs the same pipeline: it learns the version (pub/sub) and switches its stream the same way
        evs = await until(lambda: events(r, "b", "model_switched"), 30, what="b switched")
        assert evs[0]["model"] == NEW and evs[0]["version"] == 1 and evs[0]["from_model"] == OLD
        b_version = evs[0]["model_version"]
        assert b_version == b.models.get_entry(NEW).version
        await more(r, "b", 3)
        info = await pipeline_info(s, b)
        assert info["version"] == 1 and info["stages"][0]["serving"]["model"] == NEW
    recs = await results(r, "b")
    assert [x["seq"] for x in recs] == list(range(len(recs)))
    order = [m for m, _ in models_in_order(recs)]
    k = order.index(NEW)
    assert order[:k] == [OLD] * k and order[k:] == [NEW] * (len(order) - k)

    # a restarted daemon: its pipeline starts with the switched model, from the first frame
    async with running(config(redis_server.url, cams(clip, "c"))) as c, aiohttp.ClientSession() as s:
        recs = await until(lambda: at_least(r, "c", 3), 60, what="results of c")
        assert {x["outputs"]["detect"]["model"] for x in recs} == {NEW}
        assert recs[0]["outputs"]["detect"]["model_version"] == c.models.get_entry(NEW).version
        assert OLD not in {x["name"] for x in c.models.catalog()}  # the configured model was never loaded
        info = await pipeline_info(s, c)
        assert info["version"] == 1 and info["changed_by"] == "ops" and info["stages"][0]["model"] == NEW
        # roll back to the configuration (version 0): a new version, switched the same way; asked to answer
        # within 10 ms, it answers 202 while the old model loads again, and the switch goes on
        async with s.post(c.api_url + "/api/v1/pipelines/sw/rollback", json={"version": 0, "timeout_s": 0.01},
                          headers=h(OPER)) as resp:
            body = await resp.json()
            assert resp.status == 202 and body["status"] == "pending" and body["record"] is None, body
        evs = await until(lambda: events(r, "c", "model_switched"), 30, what="c switched back")
        assert evs[0]["model"] == OLD and evs[0]["from_model"] == NEW and evs[0]["version"] == 2
        info = await pipeline_info(s, c)
        assert info["version"] == 2 and info["changes"] == {} and info["last_switch"]["state"] == "switched"
        await more(r, "c", 3)
        async with s.get(c.api_url + "/api/v1/pipelines/sw/history", headers=h(READ)) as resp:
            hist = await resp.json()
        assert hist["total"] == 3 and [v["version"] for v in hist["versions"]] == [2, 1, 0]
        assert hist["versions"][1]["stages"] == {"detect": {"model": NEW}}
        assert hist["versions"][0]["rolled_back_from"] == 0 and hist["versions"][0]["note"] == "rollback to version 0"
        async with s.post(c.api_url + "/api/v1/pipelines/sw/rollback", json={"version": 7},
                          headers=h(OPER)) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["details"]["version"] == 7
    order = [m for m, _ in models_in_order(await results(r, "c"))]
    k = order.index(OLD)
    assert order[:k] == [NEW] * k and order[k:] == [OLD] * (len(order) - k) and k >= 3


async def test_a_model_version_is_the_sha256_of_its_weights_file(redis_server):
    from streamd.models.manager import ModelManager
    from streamd.models.sources import resolve_model_path
    from streamd.models.spec import ModelSpec

    m = ModelManager()
    ref = m.ref("person", ModelSpec(source="person"), "test.person")
    try:
        async with ref.use():
            pass
        e = m.get_entry("person")
        digest = hashlib.sha256(open(resolve_model_path("person"), "rb").read()).hexdigest()
        assert (e.version, e.version_method) == ("sha256:" + digest[:16], "file")
        assert {x["name"]: x for x in m.catalog()}["person"]["version"] == e.version
        await m.unload("person")
        assert e.version is None  # unloaded: no weights, no version
        async with ref.use():  # loaded again: the same file, the same version (its hash cached)
            pass
        assert e.version == "sha256:" + digest[:16]
    finally:
        ref.close()
        await m.aclose()
        await asyncio.sleep(0)


def test_a_folders_version_reads_no_file_the_hugging_face_cache_names_by_its_hash(tmp_path):
    from streamd.models.version import Versions

    weights = bytes(range(256)) * 4096
    digest = hashlib.sha256(weights).hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(weights)
    (tmp_path / "snapshot").mkdir()  # as huggingface_hub lays out a download: links to blobs named by their sha256
    (tmp_path / "snapshot" / "model.safetensors").symlink_to(tmp_path / "blobs" / digest)
    (tmp_path / "snapshot" / "config.json").write_text("{}")  # not a weights file: not part of the version
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "model.safetensors").write_bytes(weights)
    v = Versions()
    assert v.of(str(tmp_path / "snapshot"), None) == v.of(str(tmp_path / "copy"), None)
    assert v.of(str(tmp_path / "snapshot"), None)[1] == "folder"
    assert v.of(str(tmp_path / "copy" / "model.safetensors"), None) == ("sha256:" + digest[:16], "file")
    (tmp_path / "blobs" / digest).write_bytes(b"changed")  # the blob's name is its hash: taken, not read
    assert v.of(str(tmp_path / "snapshot"), None) == v.of(str(tmp_path / "copy"), None)


async def stored(r: Any, version: int, record: Any, current: int | None = None, name: str = "sw") -> None:
    """A version record put in Redis as a daemon (or a hand, or an eviction) left it; `record` None: the versions
    hash deleted. The change is announced as a daemon announces its own."""
    from streamd.keys import PIPELINES_CHANNEL, PIPELINES_INDEX_KEY, pipeline_keys

    seq, versions, cur = pipeline_keys(name)
    await r.set(seq, version)
    if record is None:
        await r.delete(versions)
    else:
        await r.hset(versions, str(version), record if isinstance(record, str) else json.dumps(record))
    await r.set(cur, current if current is not None else version)
    await r.sadd(PIPELINES_INDEX_KEY, name)
    await r.publish(PIPELINES_CHANNEL, name)


def version_record(version: int, stages: dict[str, Any]) -> dict[str, Any]:
    return {"version": version, "pipeline": "sw", "stages": stages, "author": "ops", "note": None,
            "created_ts": time.time()}


async def test_a_missing_or_garbage_version_record_runs_the_pipeline_as_configured(r, redis_server, clip):
    # the current pointer names version 1, and the versions hash is gone (LRU eviction, a hand DEL)
    await stored(r, 1, None)
    async with running(config(redis_server.url, cams(clip, "a"))) as d, aiohttp.ClientSession() as s:
        recs = await until(lambda: at_least(r, "a", 3), 60, what="results of a")
        assert {x["outputs"]["detect"]["model"] for x in recs} == {OLD}
        info = await pipeline_info(s, d)
        assert info["version"] == 0 and info["changes"] == {}
        # a record that is not JSON, announced while the daemon runs: it follows on, as configured
        await stored(r, 2, "{not json")
        await asyncio.sleep(1.5)
        await more(r, "a", 5)
        assert d.pipelines.switches.versions.get("sw")["version"] == 0
    # a restart with the garbage record current (and one that is JSON but no version record)
    for garbage in ("{not json", json.dumps(["detect"]), json.dumps({"version": 3, "stages": "x"})):
        await stored(r, 3, garbage)
        async with running(config(redis_server.url, cams(clip, "b"))) as d:
            recs = await more(r, "b", 3)
            assert {x["outputs"]["detect"]["model"] for x in recs} == {OLD}
            assert d.pipelines.switches.versions.get("sw")["version"] == 0
    recs = await results(r, "a")
    assert [x["seq"] for x in recs] == list(range(len(recs)))
    assert {x["outputs"]["detect"]["model"] for x in recs} == {OLD}


async def test_a_stored_version_naming_a_model_not_declared_here_is_not_applied(r, redis_server, clip):
    # version 1 names `big`, declared in the catalog of the daemon that wrote it; this daemon's catalog has no `big`
    await stored(r, 1, version_record(1, {"detect": {"model": "big"}}))
    async with running(config(redis_server.url, cams(clip, "a"))) as d, aiohttp.ClientSession() as s:
        recs = await until(lambda: at_least(r, "a", 3), 60, what="results of a")
        assert {x["outputs"]["detect"]["model"] for x in recs} == {OLD}
        assert all(x["error"] is None for x in recs)
        names = {x["name"] for x in d.models.catalog()}
        assert "big" not in names and OLD in names
        info = await pipeline_info(s, d)
        assert info["stages"][0]["serving"]["model"] == OLD
        assert info["last_switch"]["state"] == "failed" and "'big' is not declared" in info["last_switch"]["reason"]
        # a version another daemon wrote naming a source (a file, a hub name), followed: never loaded, the
        # current model serves on, with an event
        await stored(r, 2, version_record(2, {"detect": {"model": "yolov8s.yaml"}}))
        evs = await until(lambda: events(r, "a", "model_switch_failed"), 20, what="the refusal's event")
        assert evs[-1]["model"] == "yolov8s.yaml" and evs[-1]["serving"] == OLD and evs[-1]["version"] == 2
        assert "is not declared" in evs[-1]["reason"]
        await more(r, "a", 5)
        assert "yolov8s.yaml" not in {x["name"] for x in d.models.catalog()}
        # an option the stage cannot change while it runs, followed: not applied either
        await stored(r, 3, version_record(3, {"detect": {"model": NEW, "device": "meta"}}))
        async def refused_3() -> list[dict[str, Any]]:
            return [e for e in await events(r, "a", "model_switch_failed") if e["version"] == 3]

        evs = await until(refused_3, 20, what="the refusal of version 3")
        assert "device cannot change while the pipeline runs" in evs[0]["reason"], evs
        await more(r, "a", 3)
    recs = await results(r, "a")
    assert [x["seq"] for x in recs] == list(range(len(recs)))
    assert {x["outputs"]["detect"]["model"] for x in recs} == {OLD}


async def test_a_vlm_stage_switches_its_model_live_and_every_answer_names_the_model_that_gave_it(
        r, redis_server, tiny_vlm):
    """The transformers backend's model switched live: questions decided before the switch are answered by the old
    model, after it by the new; every pushed frame is answered once; the old model unloads after keep_alive_s."""
    from streamd.testing.media import push_frames
    from streamd.samples import load_photo, pan_frames

    catalog = {m: {"source": str(tiny_vlm), "kind": "vlm", "device": "cpu", "options": {"generate_batch": 4}}
               for m in ("va", "vb")}
    vlm = {"type": "vlm", "backend": "transformers", "model": "va", "every_s": 0, "max_tokens": 2,
           "max_pixels": 112 * 112, "staleness_s": 600, "max_in_flight": 64}
    api = api_cfg(redis_server.url).api.model_dump()
    cfg = make_config(redis_server.url, [{"id": "q", "url": "redis:frames:q", "pipeline": "v"}], api=api,
                      egress=LOOPBACK_ALLOWED, pipelines={"v": {"stages": [{"type": "frame_info"}, vlm]}},
                      models={"catalog": catalog, "keep_alive_s": 1.0})
    frames = list(pan_frames(load_photo("bus.jpg"), 24, 10.0, (96, 64)))
    from conftest import vlm_at_least

    async with running(cfg) as d, aiohttp.ClientSession() as s:
        await push_frames(r, "frames:q", frames[:8])
        await until(lambda: vlm_at_least(r, "q", 4), 120, what="answers from the first model")
        status, body = await patch(s, d, {"stages": [{"stage": "vlm", "model": "vb"}]}, name="v")
        assert status == 200, body
        sw = body["switched"][0]
        assert sw["stage"] == "vlm" and sw["model"] == "vb" and sw["from_model"] == "va", sw
        assert sw["model_version"] == d.models.get_entry("vb").version and sw["model_version"].startswith("sha256:")
        await push_frames(r, "frames:q", frames[8:])
        answers = await until(lambda: vlm_at_least(r, "q", 24), 180, what="every frame answered")
        await until(lambda: d.models.get_entry("va").state.value == "unloaded", 15, 0.05,
                    what="the old model unloaded")
        info = await pipeline_info(s, d, "v")
        assert info["stages"][1]["serving"] == {"model": "vb", "model_version": sw["model_version"]}
        status, body = await patch(s, d, {"stages": [{"stage": "vlm", "mode": "summary"}]}, name="v")
        assert status == 422 and body["error"]["details"]["errors"][0]["path"] == "stages.0.mode", body
        status, body = await patch(s, d, {"stages": [{"stage": "frame_info", "max_tokens": 3}]}, name="v")
        assert status == 422 and "cannot change while" in body["error"]["message"], body
        status, body = await patch(s, d, {"stages": [{"stage": "vlm", "max_tokens": 3}]}, name="v")
        assert status == 200 and body["record"]["stages"]["vlm"] == {"model": "vb", "max_tokens": 3}, body
    by_seq = sorted(answers, key=lambda a: a["seq"])
    assert [a["seq"] for a in by_seq] == list(range(24))  # each frame answered once, none lost
    models = [a["model"] for a in by_seq]
    first_new = models.index("vb")
    assert models == ["va"] * first_new + ["vb"] * (24 - first_new), models  # never a mix, old before new
    assert first_new >= 4 and all("text" in a for a in by_seq), by_seq
    versions = {a["model_version"] for a in by_seq}  # one weights file behind both names: one version
    assert len(versions) == 1 and versions.pop().startswith("sha256:")
    switched = [e for e in await events(r, "q") if e["type"] == "model_switched"]
    assert [(e["stage"], e["model"], e["version"]) for e in switched] == [("vlm", "vb", 1), ("vlm", "vb", 2)]

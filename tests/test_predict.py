"""Single-image predict (issue 14): POST /api/v1/predict/{pipeline} through the real daemon, the real aiohttp server,
a real redis-server and the real `person` detector. The image goes through the same pipeline as live frames (its
predict queue in the pipeline's ingress): the same detections as a Redis-input stream's frame of the same image,
typed 4xx errors for bad images, load shedding (503 overloaded + Retry-After) when flooded, nothing leaked by clients
that go away, live streams gapless while predicts run."""

from __future__ import annotations

import asyncio
import io
import json
import time

import aiohttp
import numpy as np

from conftest import (OPER, PERSON, READ, api_cfg, at_least, h, results, running, until, vlm_at_least, vlm_pipeline,
                      vlm_records)
from streamd.samples import load_photo, pan_frames
from streamd.streams.predict import QUEUE_KEY
from streamd.testing.media import encode_jpeg, push_frames

DETECT_TRACK = {"stages": PERSON + [{"type": "track", "tracker": "bytetrack"}]}
URL = "/api/v1/predict/{}"


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample(metric, **labels) -> float:
    total = 0.0
    for fam in metric.collect():
        for s in fam.samples:
            if s.name.endswith(("_total", "_count")) or s.name == fam.name:
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
    return total


async def post(s: aiohttp.ClientSession, d, pipeline: str, body: bytes | aiohttp.FormData,
               ctype: str | None = "image/png", token: str = OPER) -> tuple[int, dict, dict]:
    headers = h(token) | ({"Content-Type": ctype} if ctype and not isinstance(body, aiohttp.FormData) else {})
    async with s.post(d.api_url + URL.format(pipeline), data=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_predict_returns_the_detections_of_a_stream_frame_of_the_same_image(r, redis_server):
    bus = load_photo("bus.jpg")
    await push_frames(r, "frames:bus", [bus], "png")
    cfg = api_cfg(redis_server.url, [{"id": "bus", "url": "redis:frames:bus", "pipeline": "dt"}],
                  pipelines={"dt": DETECT_TRACK})
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        (rec,) = await until(lambda: at_least(r, "bus", 1), 60, what="the stream's result")
        status, _, got = await post(s, d, "dt", png(bus))
        assert status == 200, got
        form = aiohttp.FormData()
        form.add_field("file", png(bus), filename="bus.png", content_type="image/png")
        status, _, multi = await post(s, d, "dt", form)
        assert status == 200, multi
        keys = await r.keys("*_predict*")
        metrics = d.metrics
        users = {m["name"]: m["users"] for m in d.models.catalog()}
    people = [x for x in got["outputs"]["detect"]["detections"] if x["label"] == "person"]
    print(f"\nstream frame: {len(rec['outputs']['detect']['detections'])} detections; predict: {len(people)} people, "
          f"timings {got['timings_ms']}")
    assert len(people) >= 3  # bus.jpg: 4 people
    # the same outputs as the stream's first frame: detections (with their track ids) and first-frame tracks
    assert got["outputs"] == rec["outputs"] and multi["outputs"] == rec["outputs"]
    assert got["width"] == rec["width"] == 810 and got["height"] == rec["height"] == 1080
    assert got["prompt_versions"] == rec["prompt_versions"] and got["pipeline"] == "dt"
    assert got["models"] == {"detect": {k: v for k, v in rec["outputs"]["detect"].items()
                                        if k in ("model", "model_version")}}
    assert {"decode", "queue", "detect", "track", "total"} <= set(got["timings_ms"])
    # nothing of the predict images in Redis (no results, no events), nor among the model's users
    assert keys == [], keys
    assert len(await results(r, "bus")) == 1
    assert not any(s.startswith("_predict") for u in users.values() for s in u["streams"]), users
    assert sample(metrics.predict_requests, pipeline="dt", outcome="ok") == 2
    assert sample(metrics.predict_latency, pipeline="dt") == 2  # observations
    assert sample(metrics.predict_queue_depth, pipeline="dt") == 0


async def test_bad_images_and_pipelines_get_typed_json_errors(r, redis_server, tmp_path):
    from test_redis_source import _bomb_png

    pipelines = {"broken": {"stages": [{"type": "detect", "model": str(tmp_path / "missing.pt")}]}}
    cfg = api_cfg(redis_server.url, pipelines=pipelines, predict={"max_image_bytes": 200_000, "max_pixels": 10**6})
    ok = png(np.full((48, 64, 3), 200, np.uint8))
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        status, _, body = await post(s, d, "frame_info", ok)
        assert status == 200 and body["outputs"]["frame_info"]["width"] == 64, body
        assert body["outputs"]["frame_info"]["mean_brightness"] == 200.0 and body["models"] == {}
        cases = {
            "garbage": (("frame_info", b"not an image at all", "image/jpeg"), 422, "invalid_image"),
            "truncated": (("frame_info", ok[: len(ok) // 2], "image/png"), 422, "invalid_image"),
            "empty": (("frame_info", b"", "image/png"), 422, "invalid_image"),
            "text": (("frame_info", ok, "text/plain"), 415, "unsupported_media_type"),
            "json": (("frame_info", b"{}", "application/json"), 415, "unsupported_media_type"),
            "bomb": (("frame_info", _bomb_png(), "image/png"), 413, "image_too_large"),  # 5000x5000 in 70 KB
            "bytes": (("frame_info", b"\xff" * 300_000, "image/jpeg"), 413, "image_too_large"),
            "pipeline": (("no-such", ok, "image/png"), 404, "pipeline_not_found"),
            "path": (("..%2Fconfig", ok, "image/png"), 404, None),
            "setup": (("broken", ok, "image/png"), 422, "pipeline_failed"),
        }
        for name, ((pipeline, data, ctype), want, code) in cases.items():
            status, _, body = await post(s, d, pipeline, data, ctype)
            assert status == want, (name, status, body)
            assert code is None or body["error"]["code"] == code, (name, body)
        status, _, body = await post(s, d, "frame_info", ok, token=READ)
        assert status == 403 and body["error"]["code"] == "forbidden"
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("note", "no file here")
        status, _, body = await post(s, d, "frame_info", form)
        assert status == 422 and body["error"]["details"] == {"reason": "no file part"}, body
        bad = b"--xx\r\nContent-Disposition: form-data; name=file\r\n\r\nabc"  # no closing boundary
        status, _, body = await post(s, d, "frame_info", bad, "multipart/form-data; boundary=xx")
        assert status == 422 and body["error"]["code"] == "invalid_image", body
        bad = b"--xx\r\n-1.8e+16--xx--\r\n"  # a part header line without a colon (schemathesis found it)
        status, _, body = await post(s, d, "frame_info", bad, "multipart/form-data; boundary=xx")
        assert status == 422 and body["error"]["details"] == {"reason": "malformed multipart body"}, body
        status, _, body = await post(s, d, "broken", ok)
        assert "missing.pt" in body["error"]["details"]["reason"], body
        status, _, body = await post(s, d, "frame_info", ok)  # the daemon goes on answering
        assert status == 200
        m = d.metrics.predict_requests
        assert sample(m, pipeline="frame_info", outcome="invalid_image") == 10
        assert sample(m, pipeline="broken", outcome="failed") == 2


async def test_flooding_predict_sheds_load_with_retry_after_and_answers_every_accepted_one(r, redis_server):
    cfg = api_cfg(redis_server.url, pipelines={"p": {"stages": PERSON}}, predict={"queue_size": 4, "max_requests": 1000})
    image = png(load_photo("zidane.jpg"))
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        status, _, first = await post(s, d, "p", image)  # the model loads; the rate is measured from here on
        assert status == 200, first
        got = await asyncio.gather(*(post(s, d, "p", image) for _ in range(40)))
        statuses = [g[0] for g in got]
        shed = [g for g in got if g[0] == 503]
        print(f"\n40 concurrent predicts, queue_size 4: {statuses.count(200)} answered, {len(shed)} shed, Retry-After "
              f"{sorted({int(g[1]['Retry-After']) for g in shed})}")
        assert set(statuses) <= {200, 503}, statuses
        assert shed and statuses.count(200) >= 4
        for _, headers, body in shed:
            assert body["error"]["code"] == "overloaded"
            assert int(headers["Retry-After"]) >= 1 and body["error"]["details"]["retry_after_s"] == \
                int(headers["Retry-After"]) and body["error"]["details"]["queue_size"] == 4
        for _, _, body in got:  # every accepted one answered with the same people
            if "outputs" in body:
                assert body["outputs"] == first["outputs"]
        q = d.streams.predict.queue("p")
        assert len(q) == 0 and q.rate.per_s(time.monotonic()) > 0
        m = d.metrics
        assert sample(m.predict_rejections, pipeline="p") == len(shed)
        assert sample(m.predict_requests, pipeline="p", outcome="overloaded") == len(shed)
        assert sample(m.predict_requests, pipeline="p", outcome="ok") == 1 + statuses.count(200)

        # clients that go away while their images are queued: nothing stays behind
        async def gone():
            async with aiohttp.ClientSession() as s2:
                await post(s2, d, "p", image)

        tasks = [asyncio.create_task(gone()) for _ in range(4)]
        await until(lambda: len(q) >= 2, 10, 0.005, what="images in flight")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: len(q) == 0, 20, what="the abandoned images out of the pipeline")
        assert q._waiting == {} and sample(m.predict_queue_depth, pipeline="p") == 0
        assert (await post(s, d, "p", image))[0] == 200  # and it goes on


async def test_predict_while_live_streams_run_on_the_same_pipeline(r, redis_server):
    frames = list(pan_frames(load_photo("zidane.jpg"), 24, 10.0, (640, 360)))
    sids = ["cam0", "cam1", "cam2"]
    for sid in sids:
        await push_frames(r, f"frames:{sid}", frames, "jpeg")
    cfg = api_cfg(redis_server.url, [{"id": sid, "url": f"redis:frames:{sid}", "pipeline": "dt"} for sid in sids],
                  pipelines={"dt": DETECT_TRACK})
    image = encode_jpeg(load_photo("bus.jpg"))
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        await until(lambda: at_least(r, "cam0", 1), 60, what="the live streams running")
        answers, answered_ts = [], []
        for _ in range(5):  # while the streams' frames go through: bursts of three
            answers += await asyncio.gather(*(post(s, d, "dt", image, "image/jpeg") for _ in range(3)))
            answered_ts.append(time.time())
        ingress = d.pipelines["dt"].ingress
        assert QUEUE_KEY in ingress._queues.values()  # one more queue of the same fan-in
        recs = {sid: await until(lambda sid=sid: at_least(r, sid, len(frames)), 60, what=f"{sid}'s results")
                for sid in sids}
        track_events = [json.loads(f[b"event"]) for k in await r.keys("streamd:{*}:events")
                        for _, f in await r.xrange(k)]
    assert all(a[0] == 200 for a in answers), [a[2] for a in answers if a[0] != 200]
    outs = [a[2]["outputs"] for a in answers]
    assert all(o == outs[0] for o in outs)  # each image a fresh stream: the same tracks every time
    assert [t["track_id"] for t in outs[0]["track"]["tracks"]] == list(range(1, len(outs[0]["track"]["tracks"]) + 1))
    live_done = max(x["publish_ts"] for rs in recs.values() for x in rs)
    during = sum(t < live_done for t in answered_ts)
    print(f"\n15 predicts while 3 streams ran: p50 total {np.median([a[2]['timings_ms']['total'] for a in answers]):.0f}"
          f" ms; {during} of 5 bursts answered before the streams' last result")
    assert during >= 1  # the predicts really ran while live frames went through
    for sid, rs in recs.items():
        assert [x["seq"] for x in rs] == list(range(len(frames))), sid  # gapless, in order, none twice
        assert all(x["error"] is None for x in rs)
    assert not any(e.get("stream_id", "").startswith("_predict") for e in track_events)


async def test_a_predict_past_its_timeout_is_503_and_its_image_leaves_nothing_behind(r, redis_server):
    cfg = api_cfg(redis_server.url, pipelines={"p": {"stages": PERSON}}, predict={"timeout_s": 0.05})
    image = png(load_photo("bus.jpg"))
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        for _ in range(3):  # the first waits for the model's load; each of them for a forward pass (> 50 ms)
            status, headers, body = await post(s, d, "p", image)
            assert status == 503 and body["error"]["code"] == "predict_timeout", body
            assert int(headers["Retry-After"]) >= 1
        q = d.streams.predict.queue("p")
        await until(lambda: len(q) == 0, 30, what="the timed-out images through the pipeline")
        assert sample(d.metrics.predict_requests, pipeline="p", outcome="timeout") == 3
        assert sample(d.metrics.predict_latency, pipeline="p") == 0  # never answered
        users = {m["name"]: m["users"]["streams"] for m in d.models.catalog()}
    assert users["person"] == [], users


async def test_bodies_sent_slowly_hold_at_most_max_requests_places_and_time_out(r, redis_server):
    """A client that sends its image slowly holds one of api.predict.max_requests places while its body is read, and
    only for api.predict.timeout_s: past the bound others get 503 overloaded at once (nothing read, no memory
    held), and a body that never finishes is answered 503 predict_timeout."""
    image = png(load_photo("bus.jpg")[::4, ::4])
    cfg = api_cfg(redis_server.url, pipelines={"fi": {"stages": [{"type": "frame_info"}]}},
                  predict={"max_requests": 2, "timeout_s": 3})
    release = asyncio.Event()

    async def slow_body():
        yield image[:100]
        await release.wait()
        yield image[100:]

    async with running(cfg) as d, aiohttp.ClientSession() as s:
        async def slow():
            async with s.post(d.api_url + URL.format("fi"), data=slow_body(),
                              headers=h(OPER) | {"Content-Type": "image/png"}) as resp:
                return resp.status, await resp.json()

        slows = [asyncio.ensure_future(slow()) for _ in range(2)]
        await until(lambda: d.streams.predict.requests == 2, 10, what="two slow bodies holding their places")
        t0 = time.monotonic()
        status, headers, body = await post(s, d, "fi", image)
        assert status == 503 and body["error"]["code"] == "overloaded" and "Retry-After" in headers, body
        assert time.monotonic() - t0 < 1.0  # refused at once, not after the others
        (st1, b1), (st2, b2) = await asyncio.wait_for(asyncio.gather(*slows), 10)  # their bodies never finish
        assert st1 == st2 == 503 and b1["error"]["code"] == b2["error"]["code"] == "predict_timeout", (b1, b2)
        release.set()
        assert d.streams.predict.requests == 0
        status, _, body = await post(s, d, "fi", image)  # the places are free again
        assert status == 200, body


async def test_predict_through_a_vlm_pipeline_answers_in_the_outputs_while_its_live_stream_goes_on(r, redis_server):
    """A VLM stage answers a predict image in its outputs (tags parsed as its mode says, the prompt version, the
    model), publishes nothing for it, and the live stream on the same pipeline keeps its own answers."""
    from test_vlm_modes import flat, frame_number, push

    from streamd.testing.openai import ScriptedOpenAI

    script = {n: {"tags": [{"tag": "fire" if n % 2 else "smoke", "confidence": 0.9}]} for n in range(12)}
    srv = await ScriptedOpenAI(lambda req: script[frame_number(req)]).start()
    pipe = vlm_pipeline(srv.url, mode="tags", tags=["fire", "smoke"], every_s=0)
    cfg = api_cfg(redis_server.url, [{"id": "cam", "url": "redis:frames:cam", "pipeline": "v"}],
                  pipelines={"v": pipe})
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            live = asyncio.create_task(push(r, "frames:cam", [(n, flat(n)) for n in range(6)]))
            answers = await asyncio.gather(*(post(s, d, "v", png(flat(n))) for n in (3, 4, 7)))
            await live
            await until(lambda: vlm_at_least(r, "cam", 6), 20, what="the live stream's 6 answers")
    finally:
        await srv.stop()
    for n, (status, _, body) in zip((3, 4, 7), answers):
        assert status == 200, body
        out = body["outputs"]["vlm"]
        assert out["asked"] is True and out["trigger"] == "predict" and out["mode"] == "tags", out
        assert out["tags"] == [{"tag": "fire" if n % 2 else "smoke", "confidence": 0.9}], (n, out)
        assert out["prompt"] == {"scope": "config", "version": 0} and out["model"] == "scripted"
        assert body["prompt_versions"]["vlm"] == {"scope": "config", "version": 0}
        assert "frame_info" in body["outputs"] and out["latency_ms"] > 0 and "error" not in out, out
    live_answers = await vlm_records(r, "cam")
    assert sorted(a["seq"] for a in live_answers) == list(range(6))  # the stream's own, every one
    assert {a["trigger"] for a in live_answers} != {"predict"}
    keys = [k.decode() async for k in r.scan_iter("streamd:{_predict*")]
    assert keys == [], keys  # nothing published for the predict images
    assert len(srv.requests) == 6 + 3

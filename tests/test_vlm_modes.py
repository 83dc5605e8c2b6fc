"""VLM triggers (scene change, clips, new tracks, templates) and modes (tags/safety time ranges, summaries).

What a model answers comes from a scripted OpenAI-compatible server whose answer depends on the image it is sent
(frames are flat colours that encode their number), so the logic is checked against known answers."""

import asyncio
import base64
import io
import json
import re
import time

import numpy as np
import pytest

from streamd.config import parse_config
from streamd.errors import ConfigError
from streamd.testing.openai import ScriptedOpenAI, prompt_text, request_images
from conftest import (PERSON, at_least, events, make_config, results, running, until, vlm_at_least, vlm_pipeline,
                      vlm_records)


def flat(n: int) -> np.ndarray:
    """Frame n: a flat colour whose red channel encodes n (survives JPEG)."""
    img = np.zeros((72, 128, 3), np.uint8)
    img[..., 0] = 10 + 20 * n
    img[..., 1] = 128
    return img


def frame_number(request) -> int:
    """Which `flat` frame the last image of a request shows."""
    from PIL import Image

    content = request["messages"][-1]["content"]
    url = [p for p in content if p.get("type") == "image_url"][-1]["image_url"]["url"]
    red = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))[..., 0].mean()
    return int(round((red - 10) / 20))


async def push(r, key, frames, gap_s=0.15, pts_step_s=1.0):
    """XADD frames with pts n * pts_step_s, one every gap_s (a camera pushing frames)."""
    from streamd.testing.media import encode_jpeg

    for n, img in frames:
        await r.xadd(key, {"image": encode_jpeg(img, 95), "ts": repr(time.time()), "pts": repr(n * pts_step_s)})
        await asyncio.sleep(gap_s)


def has_image(request) -> bool:
    content = request["messages"][-1]["content"]
    return isinstance(content, list) and any(p.get("type") == "image_url" for p in content)


TAG_SCRIPT = {
    0: {"tags": [{"tag": "fire", "confidence": 0.9}]},
    1: {"tags": [{"tag": "fire", "confidence": 0.85}]},
    2: {"fire": 0.9, "person": 0.99},  # the other accepted shape; a tag not in the list is ignored
    3: {"tags": [{"tag": "fire", "confidence": 0.8}, {"tag": "smoke", "confidence": 0.7},
                 {"tag": "weapon", "confidence": 0.3}]},  # weapon below its threshold: not present
    4: {"tags": [{"tag": "fire", "confidence": 0.8}, {"tag": "smoke", "confidence": 0.9}]},
    5: {"tags": [{"tag": "FIRE", "confidence": 0.6}, {"tag": "smoke", "confidence": 0.7}]},
    6: {"tags": [{"tag": "smoke", "confidence": 0.7}]},
    7: {"tags": [{"tag": "smoke", "confidence": 0.6}]},  # below smoke's own threshold 0.65
    8: {"tags": []},
    9: "the model rambled instead of answering in JSON",
    10: "```json\n{\"tags\": [{\"tag\": \"fire\", \"confidence\": 0.95}]}\n```",
    11: {"tags": []},
}


@pytest.mark.parametrize("mode", ["tags", "safety"])
async def test_tags_become_time_ranges(r, redis_server, mode):
    srv = await ScriptedOpenAI(lambda req: TAG_SCRIPT[frame_number(req)]).start()
    opts = {"mode": mode, "every_s": 0, "tag_threshold": 0.5, "tag_thresholds": {"smoke": 0.65}}
    if mode == "tags":
        opts["tags"] = ["fire", "smoke", "weapon"]
    cfg = make_config(redis_server.url, [{"id": "tg", "url": "redis:frames:tg", "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(srv.url, **opts)})
    try:
        async with running(cfg):
            await push(r, "frames:tg", [(n, flat(n)) for n in range(12)])
            await until(lambda: vlm_at_least(r, "tg", 12), 20, what="12 answers")
    finally:
        await srv.stop()
    answers = {a["seq"]: a for a in await vlm_records(r, "tg")}
    assert sorted(answers) == list(range(12))
    assert answers[3]["tags"] == [{"tag": "fire", "confidence": 0.8}, {"tag": "smoke", "confidence": 0.7},
                                  {"tag": "weapon", "confidence": 0.3}]
    assert answers[3]["active_tags"] == ["fire", "smoke"] and answers[8]["active_tags"] == []
    assert "parse_error" in answers[9] and "tags" not in answers[9]  # recorded, not fatal
    assert answers[10]["active_tags"] == ["fire"] and answers[0]["mode"] == mode
    # the request asked for the tag list as JSON, with a schema
    req = srv.requests[0]
    enum = req["response_format"]["json_schema"]["schema"]["properties"]["tags"]["items"]["properties"]["tag"]["enum"]
    assert "fire" in enum and "smoke" in enum and "Tags: " in prompt_text(req)
    if mode == "safety":
        assert "violence" in enum and "watch a security camera" in prompt_text(req)
    evs = [e for e in await events(r, "tg") if e["type"] in ("tag_started", "tag_ended")]
    got = [(e["type"], e["tag"], e.get("seq", e.get("start_seq")), e.get("end_seq")) for e in evs]
    assert got == [("tag_started", "fire", 0, None),
                   ("tag_started", "smoke", 3, None),
                   ("tag_ended", "fire", 0, 5),
                   ("tag_ended", "smoke", 3, 6),
                   ("tag_started", "fire", 10, None),
                   ("tag_ended", "fire", 10, 10)]
    fire = evs[2]
    assert fire["start_pts_s"] == 0.0 and fire["end_pts_s"] == 5.0 and fire["duration_s"] == 5.0
    assert fire["max_confidence"] == 0.9 and fire["answers"] == 6 and fire["absent_seq"] == 6
    assert fire["reason"] == "absent" and fire["start_ts"] <= fire["end_ts"] and fire["mode"] == mode


async def test_tag_end_waits_for_end_after_s(r, redis_server):
    script = {0: {"fire": 0.9}, 1: {}, 2: {"fire": 0.9}, 3: {}, 4: {}, 5: {}}
    srv = await ScriptedOpenAI(lambda req: script[frame_number(req)]).start()
    srv.structured = False  # a server without structured output: asked once with it, then without
    cfg = make_config(redis_server.url, [{"id": "te", "url": "redis:frames:te", "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(srv.url, mode="tags", tags=["fire"], every_s=0,
                                                   tag_end_after_s=2.0)})
    try:
        async with running(cfg):
            await push(r, "frames:te", [(n, flat(n)) for n in range(6)])
            await until(lambda: vlm_at_least(r, "te", 6), 20, what="6 answers")
    finally:
        await srv.stop()
    evs = [e for e in await events(r, "te") if e["type"].startswith("tag_")]
    assert srv.refused >= 1 and not any("response_format" in q for q in srv.requests)
    assert "Answer with JSON only" in prompt_text(srv.requests[0])  # the format is still asked for in words
    # a one-answer gap (1 s) does not end the range; absent for 2 s (pts 4) does
    assert [(e["type"], e.get("start_seq", e.get("seq")), e.get("end_seq"), e.get("absent_seq")) for e in evs] == \
        [("tag_started", 0, None, None), ("tag_ended", 0, 2, 4)]


async def test_summary_mode_summarises_windows_of_captions(r, redis_server):
    def answer(req):
        if has_image(req):
            return f"caption {frame_number(req)}"
        lines = [x for x in prompt_text(req).splitlines() if x.startswith("[")]
        return "SUMMARY " + " | ".join(lines)

    srv = await ScriptedOpenAI(answer).start()
    cfg = make_config(redis_server.url, [{"id": "su", "url": "redis:frames:su", "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(srv.url, mode="summary", every_s=0, summary_every_s=4)})
    try:
        async with running(cfg) as d:
            await push(r, "frames:su", [(n, flat(n)) for n in range(12)])
            await until(lambda: vlm_at_least(r, "su", 14), 20, what="12 captions and 2 summaries")
        # the last, partial window is summarised at shutdown
        recs = await vlm_records(r, "su")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for m in d.metrics.registry.collect() if m.name.startswith("streamd_vlm") for s in m.samples}
    finally:
        await srv.stop()
    caps = sorted((a for a in recs if a["kind"] == "answer"), key=lambda a: a["seq"])
    assert [c["text"] for c in caps] == [f"caption {n}" for n in range(12)]
    sums = [a for a in recs if a["kind"] == "summary"]
    assert [s["window"] for s in sums] == [
        {"start_seq": 0, "end_seq": 4, "start_pts_s": 0.0, "end_pts_s": 4.0, "captions": 5},
        {"start_seq": 5, "end_seq": 9, "start_pts_s": 5.0, "end_pts_s": 9.0, "captions": 5},
        {"start_seq": 10, "end_seq": 11, "start_pts_s": 10.0, "end_pts_s": 11.0, "captions": 2}]
    assert sums[0]["text"] == "SUMMARY " + " | ".join(f"[{n}.0s] caption {n}" for n in range(5))
    assert all(s["mode"] == "summary" and s["tokens"]["prompt"] == 10 and "error" not in s for s in sums)
    assert sum(1 for q in srv.requests if not has_image(q)) == 3  # summaries are text-only requests
    answered = (("outcome", "answered"), ("stage", "vlm"), ("stream", "su"))
    assert samples[("streamd_vlm_questions_total", answered)] == 15  # 12 captions + 3 summaries
    assert samples[("streamd_vlm_latency_seconds_count", (("stage", "vlm"),))] == 15
    assert samples[("streamd_vlm_tokens_total", (("kind", "prompt"), ("stage", "vlm")))] == 150


async def test_scene_change_and_clips(r, redis_server):
    srv = await ScriptedOpenAI(lambda req: f"saw {frame_number(req)}").start()
    # frames 0-4 show one scene, 5-9 another (each frame slightly different: noise below the threshold)
    rng = np.random.default_rng(1)
    scene = [flat(0), flat(9)]
    frames = []
    for n in range(10):
        img = scene[n >= 5].astype(np.int16) + rng.integers(-3, 4, scene[0].shape)
        img[0, 0, 0] = 10 + 20 * n  # keeps frame_number working: one pixel does not move the mean much
        frames.append((n, np.clip(img, 0, 255).astype(np.uint8)))
    cfg = make_config(redis_server.url, [{"id": "sc", "url": "redis:frames:sc", "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(srv.url, every_s=None, scene_change=0.1, clip_frames=3)})
    try:
        async with running(cfg):
            await push(r, "frames:sc", frames)
            await until(lambda: at_least(r, "sc", 10), 20, what="10 results")
            await until(lambda: vlm_at_least(r, "sc", 2), 10, what="2 answers")
            await asyncio.sleep(0.5)
    finally:
        await srv.stop()
    answers = sorted(await vlm_records(r, "sc"), key=lambda a: a["seq"])
    assert [(a["seq"], a["trigger"]) for a in answers] == [(0, "start"), (5, "scene_change")]
    assert "frames" not in answers[0] and answers[1]["frames"] == [3, 4, 5]  # the clip: last 3 sampled frames
    assert [len(request_images(q)) for q in srv.requests] == [1, 3]
    recs = await results(r, "sc")
    assert [x["outputs"]["vlm"]["asked"] for x in recs] == [True] + [False] * 4 + [True] + [False] * 4
    assert recs[5]["outputs"]["vlm"]["trigger"] == "scene_change"


async def test_new_tracks_are_asked_about_their_crop(r, redis_server, tmp_path):
    from streamd.testing.media import make_pan_clip

    clip = make_pan_clip(tmp_path / "z.mp4", "zidane.jpg", seconds=2, fps=10, size=(960, 540))
    srv = await ScriptedOpenAI(lambda req: "a man").start()
    vlm = vlm_pipeline(srv.url, every_s=100, on_new_track=True, max_pixels=2_000_000, max_in_flight=8,
                       crop_padding=0.1, prompt="Seen: {labels}. Tracks: {tracks}. At {pts_s} s, frame {seq}.",
                       track_prompt="Describe the {label} (track {track_id}).")["stages"][1]
    pipeline = {"stages": [*PERSON, {"type": "track"}, vlm]}
    cfg = make_config(redis_server.url, [{"id": "nt", "url": str(clip), "fps": 5.0, "pipeline": "p",
                                          "playback": "realtime"}],  # a live camera
                      pipelines={"p": pipeline})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["nt"].state.value == "stopped", 120, what="end of clip")
        await until(lambda: at_least(r, "nt", 10), 60, what="10 results")
        await asyncio.sleep(0.5)
    await srv.stop()
    recs = await results(r, "nt")
    tracks = {t["track_id"]: t for x in recs for t in reversed(x["outputs"]["track"]["tracks"])}
    answers = await vlm_records(r, "nt")
    crops = [a for a in answers if a["kind"] == "track"]

    assert sorted(a["track_id"] for a in crops) == sorted(tracks) and len(tracks) >= 2  # each new track once
    for a in crops:
        req = next((q for q in srv.requests if prompt_text(q) == f"Describe the person (track {a['track_id']})."),
                   None)
        assert req is not None, [prompt_text(q) for q in srv.requests]
        (w, h), = request_images(req)
        x1, y1, x2, y2 = a["box"]
        px, py = 0.1 * (x2 - x1), 0.1 * (y2 - y1)  # the box grown by crop_padding, clipped to the frame
        assert abs(w - (min(960, x2 + px) - max(0, x1 - px))) <= 2
        assert abs(h - (min(540, y2 + py) - max(0, y1 - py))) <= 2
        assert a["trigger"] == "new_track" and a["label"] == "person" and a["text"] == "a man"
    frame_q = [prompt_text(q) for q in srv.requests if prompt_text(q).startswith("Seen:")]
    assert len(frame_q) == 1  # every_s 100: only the first frame
    assert re.match(r"Seen: \d person\. Tracks: #\d+ person at \[\d+, \d+, \d+, \d+\]", frame_q[0]), frame_q[0]
    assert frame_q[0].endswith("At 0.0 s, frame 0.")


def test_vlm_options_are_checked():
    base = {"streams": [{"id": "a", "url": "redis:x", "pipeline": "p"}]}

    def cfg(**opts):
        from streamd.streams.pipelines import check_config

        stage = {"type": "vlm", "model": "m", "endpoints": [{"url": "http://127.0.0.1:1/v1"}], **opts}
        check_config(parse_config({**base, "pipelines": {"p": {"stages": [stage]}}}, environ={}))

    with pytest.raises(ConfigError, match="tags"):
        cfg(mode="tags")
    with pytest.raises(ConfigError, match="tag_thresholds"):
        cfg(mode="tags", tags=["a"], tag_thresholds={"b": 0.2})
    with pytest.raises(ConfigError, match="scene_change"):
        cfg(scene_change=2)
    cfg(mode="safety")


def test_tag_answers_parse_leniently():
    from streamd.stages.vlm.prompting import parse_tags

    tags = ["fire", "smoke"]
    assert parse_tags('{"tags": ["Fire", {"name": "smoke", "score": 2}]}', tags) == {"fire": 1.0, "smoke": 1.0}
    assert parse_tags('{"fire": 0.4, "smoke": true, "x": 1}', tags) == {"fire": 0.4}
    with pytest.raises(ValueError):
        parse_tags("fire!", tags)
    with pytest.raises(ValueError):
        parse_tags("[1, 2]", tags)
    assert json.loads(json.dumps(parse_tags("{}", tags))) == {}

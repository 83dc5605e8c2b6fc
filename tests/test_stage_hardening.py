"""Stages and the prompt cache, hardened (issue 12): the VLM's staleness checked when an endpoint's slot is granted,
the configured VLM prompt stamped on records, the pipelines' own descriptions, repeated log lines rate-limited."""

import asyncio
import json
import time

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from streamd import keys
from streamd.config import StreamConfig
from streamd.log import RepeatedLog, get_logger
from streamd.pipelines import REPO_PIPELINES
from streamd.prompts import PromptCache, PromptStore
from streamd.testing.openai import ScriptedOpenAI, prompt_text
from streamd.testing.servers import ManagedRedis
from conftest import events, make_config, results, running, until


async def vlm_records(r, sid):
    return [json.loads(f[b"record"]) for _, f in await r.xrange(keys.vlm_key(sid))]


def vlm_stage(url, max_concurrency=4, **opts):
    return {"type": "vlm", "model": "scripted", "endpoints": [{"url": url, "max_concurrency": max_concurrency}],
            **opts}


def metric(d, name, **labels):
    for m in d.metrics.registry.collect():
        for s in m.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_vlm_staleness_checked_when_the_endpoint_slot_is_granted(r, redis_server, clip):
    """A slow endpoint with one request at a time and more questions than it can answer: questions wait for its
    slot, and those whose frame got older than `staleness_s` meanwhile are skipped, never sent."""
    staleness = 1.0
    sent: dict[tuple[str, int], float] = {}
    srv = ScriptedOpenAI(lambda req: "seen")
    srv.delay_s = 0.4
    orig = srv._chat

    async def stamped(request):
        body = await request.json()
        sid, seq = prompt_text(body).split()
        sent[(sid, int(seq))] = time.time()
        return await orig(request)

    srv._chat = stamped
    await srv.start()
    sids = ["st0", "st1", "st2"]
    cfg = make_config(redis_server.url, [{"id": sid, "url": str(clip), "fps": 2.0, "playback": "realtime",
                                          "loop": True, "pipeline": "p"} for sid in sids],
                      pipelines={"p": {"stages": [vlm_stage(srv.url, max_concurrency=1, every_s=0, max_in_flight=8,
                                                            staleness_s=staleness, prompt="{stream_id} {seq}")]}})
    try:
        async with running(cfg) as d:
            async def answered():
                return sum([len(await vlm_records(r, sid)) for sid in sids]) >= 10
            await until(answered, 30, what="10 answers")
            stage = d.pipelines["p"].stages[0]
        # stopped: the questions in flight were answered or skipped
        skipped = sum(metric(d, "streamd_vlm_questions_total", stream=sid, outcome="skipped") for sid in sids)
    finally:
        await srv.stop()
    answers = [a for sid in sids for a in await vlm_records(r, sid)]
    assert answers and all("error" not in a for a in answers)
    late = [(a["stream_id"], a["seq"], round(sent[(a["stream_id"], a["seq"])] - a["capture_ts"], 2))
            for a in answers if sent[(a["stream_id"], a["seq"])] - a["capture_ts"] > staleness + 0.3]
    assert not late, f"sent after staleness_s ({staleness} s): {late[:5]}"
    stale = [e for sid in sids for e in await events(r, sid, "vlm_skipped") if "stale" in e["reason"]]
    assert stale and all((e["stream_id"], e["seq"]) not in sent for e in stale)  # skipped ones were never sent
    assert skipped >= len(stale)  # counted like the other skips
    assert stage.failed == 0 and stage.asked == stage.answered == len(answers)  # skipped ones were not asked


async def test_vlm_configured_prompt_is_stamped_on_records(r, redis_server, clip):
    """No prompt in the store: records say the configured prompt was used ({scope: config, version: 0}), as
    detection does for its configured vocabulary, and the same version as the VLM answers about them."""
    srv = await ScriptedOpenAI(lambda req: "seen").start()
    cfg = make_config(redis_server.url, [{"id": "cp", "url": str(clip), "fps": 4.0, "pipeline": "p"}],
                      pipelines={"p": {"stages": [{"type": "frame_info"},
                                                  vlm_stage(srv.url, every_s=0.5, prompt="what is here?")]}})
    try:
        async with running(cfg):
            await until(lambda: _at_least(vlm_records(r, "cp"), 3), 20, what="3 answers")
    finally:
        await srv.stop()
    config = {"scope": "config", "version": 0}
    recs = await results(r, "cp")
    assert recs and all(x["prompt_versions"] == {"vlm": config} for x in recs), recs[0]["prompt_versions"]
    answers = await vlm_records(r, "cp")
    assert answers and all(a["prompt"] == config and a["text"] == "seen" for a in answers)
    by_seq = {x["seq"]: x for x in recs}
    asked = [a for a in answers if a["seq"] in by_seq]
    assert asked and all(by_seq[a["seq"]]["outputs"]["vlm"]["asked"] for a in asked)


async def _at_least(coro, n):
    return len(await coro) >= n


def test_only_the_default_pipeline_calls_itself_the_default():
    default = StreamConfig.model_fields["pipeline"].default  # what a stream that names no pipeline gets
    assert (REPO_PIPELINES / f"{default}.yaml").is_file()
    claims = {p.stem for p in REPO_PIPELINES.glob("*.yaml") if "the default pipeline" in p.read_text().lower()}
    assert claims == {default}


LOST, BACK = "prompt cache lost Redis, retrying", "prompt cache has Redis back"


async def test_prompt_cache_logs_a_redis_outage_once_not_every_second(tmp_path):
    """The prompt cache retries every second during an outage: one line when it begins, one when it ends."""
    srv = ManagedRedis(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(srv.url)
    cache = PromptCache(PromptStore(client))
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.wait_for(cache.loaded.wait(), 10)
        with capture_logs() as logs:
            srv.stop(kill=True)
            await asyncio.sleep(4.5)  # ~4 retries
            during = [x["event"] for x in logs if x["event"] in (LOST, BACK)]
            assert during == [LOST], f"{len(during)} lines in 4.5 s of outage"
            srv.start()
            await until(lambda: any(x["event"] == BACK for x in logs), 15, what="the cache to have Redis back")
            lines = [x for x in logs if x["event"] in (LOST, BACK)]
            await PromptStore(client).put("vlm", "global", {"text": "still followed?"}, "test")
            await until(lambda: cache.resolve("vlm", "any", "p"), 10, what="a prompt put after the outage")
            srv.stop(kill=True)  # a second outage is logged again at once
            await until(lambda: sum(x["event"] == LOST for x in logs) == 2, 10, what="the second outage")
    finally:
        cache.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        srv.stop()
    assert [x["event"] for x in lines] == [LOST, BACK]
    assert lines[0]["log_level"] == "warning" and lines[1]["occurrences"] >= 4


def test_repeated_log_lines_at_most_once_per_interval_with_a_count():
    now = [0.0]
    with capture_logs() as logs:
        rep = RepeatedLog(get_logger("test"), every_s=30, clock=lambda: now[0])
        assert not rep.over("back")  # nothing was logged: nothing to close
        for _ in range(65):  # once a second for 65 s
            rep.warning("down", error="refused")
            now[0] += 1
        assert rep.active
        rep.over("back")
        rep.warning("down again")
    assert [(x["event"], x.get("suppressed"), x.get("occurrences")) for x in logs] == [
        ("down", None, None), ("down", 29, None), ("down", 29, None), ("back", None, 65), ("down again", None, None)]
    assert logs[1]["error"] == "refused" and logs[0]["log_level"] == "warning"

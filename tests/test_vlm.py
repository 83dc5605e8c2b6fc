"""The VLM stage through the `openai` backend, against real HTTP servers. Prompt versions from the store."""

import aiohttp

from streamd.testing.openai import ScriptedOpenAI, prompt_text
from conftest import at_least, make_config, results, running, until, vlm_at_least, vlm_pipeline, vlm_records


async def test_prompt_switch_happens_at_one_frame_boundary(r, redis_server, clip):
    srv = await ScriptedOpenAI(lambda req: "answer to: " + prompt_text(req)).start()
    cfg = make_config(redis_server.url, [{"id": "v", "url": str(clip), "fps": 10.0, "playback": "realtime",
                                         "loop": True, "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(srv.url, every_s=0.5)},
                      api={"enabled": True, "port": 0})
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            url = d.api_url + "/api/v1/prompts/vlm/stream:v"
            async with s.put(url, json={"text": "what is the first question?"}) as resp:
                assert resp.status == 201
            await until(lambda: d.prompt_cache.resolve("vlm", "v", "p"), 5)
            await until(lambda: at_least(r, "v", 10), 20)
            async with s.put(url, json={"text": "and the second?"}) as resp:
                assert (await resp.json())["version"] == 2
            n = len(await results(r, "v"))
            await until(lambda: at_least(r, "v", n + 10), 20)
            await until(lambda: vlm_at_least(r, "v", 4), 20)
    finally:
        await srv.stop()
    recs = await results(r, "v")
    stamps = [x["prompt_versions"]["vlm"] for x in recs]  # every record says which prompt its frame was asked with
    versions = [s["version"] for s in stamps]
    first = next(i for i, v in enumerate(versions) if v)
    assert all(s == {"scope": "config", "version": 0} for s in stamps[:first])  # the configured one until then
    tail = versions[first:]
    assert 0 not in tail  # once the store's prompt exists, every record has its version
    assert tail == sorted(tail) and set(tail) == {1, 2}
    switch = tail.index(2)
    assert all(v == 1 for v in tail[:switch]) and all(v == 2 for v in tail[switch:])  # one boundary
    # the answers were produced with the version they are stamped with
    answers = await vlm_records(r, "v")
    for a in answers:
        if a["prompt"]["version"] == 1:
            assert a["text"] == "answer to: what is the first question?"
        elif a["prompt"]["version"] == 2:
            assert a["text"] == "answer to: and the second?"
    assert {a["prompt"]["version"] for a in answers} >= {1, 2}
    assert all(a["prompt"]["scope"] == "stream:v" for a in answers if a["prompt"]["version"])
    asked = [x for x in recs if x["outputs"]["vlm"]["asked"]]
    assert asked and len(asked) < len(recs)  # asked at its own rate, not every frame


async def test_fallback_takes_over_when_the_primary_dies(r, redis_server, clip):
    primary = await ScriptedOpenAI(lambda req: "primary").start()
    backup = await ScriptedOpenAI(lambda req: "backup").start()
    primary.delay_s = 0.05
    cfg = make_config(redis_server.url, [{"id": "f", "url": str(clip), "fps": 4.0, "pipeline": "p",
                                         "playback": "realtime"}],
                      pipelines={"p": vlm_pipeline(primary.url, fallback=backup.url, every_s=0,
                                                   retry={"attempts": 3, "initial_s": 0.05, "eject_s": 60})})
    try:
        async with running(cfg) as d:
            await until(lambda: vlm_at_least(r, "f", 3), 20, what="answers from the primary")
            await primary.stop()  # killed mid-run
            await until(lambda: d.streams.runners["f"].state.value == "stopped", 30)
            await until(lambda: vlm_at_least(r, "f", 24), 30, what="an answer for every sampled frame")
    finally:
        await backup.stop()
        await primary.stop()
    answers = sorted(await vlm_records(r, "f"), key=lambda a: a["seq"])
    assert [a["seq"] for a in answers] == list(range(24))  # no sampled frame lost
    assert all("error" not in a for a in answers), [a for a in answers if "error" in a][:2]
    texts = [a["text"] for a in answers]
    assert texts[0] == "primary" and texts[-1] == "backup"
    assert texts.index("backup") >= 3 and "primary" not in texts[texts.index("backup"):]  # backup only after
    assert len(backup.requests) == texts.count("backup")  # the fallback was idle while the primary worked
    assert all(a["tokens"]["prompt"] == 10 and a["latency_ms"] > 0 and a["model"] == "scripted" for a in answers)


async def test_retries_back_off_and_honour_retry_after(r, redis_server, clip):
    import time

    srv = await ScriptedOpenAI(lambda req: "ok").start()
    srv.faults = [(503, 0.4), (429, 0.3), (500, None)]
    stamps = []
    orig = srv._chat

    async def timed(request):
        stamps.append(time.monotonic())
        return await orig(request)

    srv._chat = timed
    await srv.stop()
    await srv.start()
    cfg = make_config(redis_server.url, [{"id": "rt", "url": str(clip), "fps": 0.2, "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(srv.url, every_s=100, max_in_flight=1,
                                                   retry={"attempts": 4, "initial_s": 0.1, "max_s": 2,
                                                          "eject_after": 10})})
    try:
        async with running(cfg):
            (a,) = await until(lambda: _vrecs(r, "rt", 1), 20, what="the answer after the retries")
    finally:
        await srv.stop()
    assert a["text"] == "ok" and "error" not in a
    assert len(stamps) == 4  # three injected failures, then the answer
    gaps = [b - x for x, b in zip(stamps, stamps[1:])]
    assert gaps[0] >= 0.38 and gaps[1] >= 0.28  # Retry-After honoured
    assert 0.05 <= gaps[2] < 1.0  # no Retry-After: exponential backoff with jitter


async def _vrecs(r, sid, n):
    recs = await vlm_records(r, sid)
    return recs if len(recs) >= n else None


def _has_sglang():
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


async def test_sglang_backend_without_sglang_fails_the_stream_clearly(r, redis_server, clip):
    if _has_sglang():
        import pytest

        pytest.skip("SGLang is installed on this machine (this test covers the error shown where it is not)")
    cfg = make_config(redis_server.url, [{"id": "sg", "url": str(clip), "pipeline": "p"},
                                         {"id": "fine", "url": str(clip), "fps": 1.0}],
                      pipelines={"p": {"stages": [{"type": "vlm", "backend": "sglang", "model": "Qwen/x"}]}})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["sg"].state.value == "failed", 20)
        await until(lambda: at_least(r, "fine", 6), 20)
        reason = d.streams.runners["sg"].reason
    assert "pip install 'streamd[sglang]'" in reason and "openai backend" in reason


async def test_transformers_backend_batches_streams_into_one_generate(r, redis_server, clip, tiny_vlm):
    stage = {"type": "vlm", "backend": "transformers", "model": str(tiny_vlm), "device": "cpu", "every_s": 0,
             "generate_batch": 4, "max_wait_ms": 100, "max_in_flight": 12, "max_tokens": 6, "max_pixels": 112 * 112}
    # three cameras (files played in real time); frames arriving together are answered in one generate call
    cfg = make_config(redis_server.url, [{"id": f"t{i}", "url": str(clip), "fps": 1.0, "pipeline": "p",
                                          "playback": "realtime"} for i in range(3)],
                      pipelines={"p": {"stages": [stage]}})
    async with running(cfg) as d:
        for i in range(3):
            await until(lambda: vlm_at_least(r, f"t{i}", 6), 60, what=f"answers for t{i}")
        assert d.pipelines["p"].stages[0].skipped == 0
        shared = next(iter(d.models._models.values()))
    for i in range(3):
        answers = await vlm_records(r, f"t{i}")
        assert sorted(a["seq"] for a in answers) == list(range(6))
        assert all("error" not in a and a["tokens"]["completion"] <= 6 for a in answers)
        assert all(a["endpoint"] == "transformers:cpu" and a["model"] == str(tiny_vlm) for a in answers)
        assert all(not any(ord(c) < 32 and c not in "\t\n\r" for c in a["text"]) for a in answers)
    assert max(shared.batch_sizes) > 1 and shared.calls < 18  # frames of several streams in one generate


async def test_quantization_on_cpu_is_a_clear_error(r, redis_server, clip, tiny_vlm):
    stage = {"type": "vlm", "backend": "transformers", "model": str(tiny_vlm), "device": "cpu",
             "quantization": "4bit"}
    cfg = make_config(redis_server.url, [{"id": "q", "url": str(clip), "pipeline": "p"}],
                      pipelines={"p": {"stages": [stage]}})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["q"].state.value == "failed", 30)
        assert "needs CUDA" in d.streams.runners["q"].reason


async def test_openai_backend_against_a_real_transformers_serve(r, redis_server, clip, transformers_serve):
    srv = transformers_serve
    cfg = make_config(redis_server.url, [{"id": "ts", "url": str(clip), "fps": 1.0, "pipeline": "p",
                                          "playback": "realtime"}],
                      pipelines={"p": vlm_pipeline(srv["url"], model=srv["model"], every_s=0, max_tokens=8,
                                                   max_pixels=112 * 112)})
    async with running(cfg):
        answers = await until(lambda: _vrecs(r, "ts", 6), 90, what="six answers from transformers serve")
    assert sorted(a["seq"] for a in answers) == list(range(6))
    assert all("error" not in a and a["endpoint"] == srv["url"] for a in answers), answers[0]
    assert all(a["tokens"]["completion"] >= 1 and a["tokens"]["prompt"] > 10 for a in answers)


async def test_faults_in_front_of_a_real_server_are_retried_as_configured(r, redis_server, clip, transformers_serve):
    """A fault-injecting proxy in front of a real `transformers serve`: 503 and 429 with Retry-After, a stall
    past the timeout, then the real answer."""
    from streamd.testing.openai import FaultProxy

    srv = transformers_serve
    proxy = await FaultProxy(srv["url"]).start()
    proxy.faults = [{"status": 503, "retry_after": 0.4}, {"status": 429, "retry_after": 0.3}, {"stall_s": 3.0}]
    cfg = make_config(redis_server.url, [{"id": "fp", "url": str(clip), "fps": 0.2, "pipeline": "p"}],
                      pipelines={"p": vlm_pipeline(proxy.url, model=srv["model"], every_s=100, max_in_flight=1,
                                                   max_tokens=4, max_pixels=112 * 112, timeout_s=1.0,
                                                   retry={"attempts": 4, "initial_s": 0.1, "max_s": 2,
                                                          "eject_after": 10})})
    try:
        async with running(cfg):
            (a,) = await until(lambda: _vrecs(r, "fp", 1), 60, what="the answer after the faults")
    finally:
        await proxy.stop()
    assert "error" not in a and a["tokens"]["completion"] >= 1 and a["endpoint"] == proxy.url
    assert [what for _, what in proxy.seen] == ["503", "429", "stall", "pass"]
    t = [when for when, _ in proxy.seen]
    assert t[1] - t[0] >= 0.38 and t[2] - t[1] >= 0.28  # Retry-After honoured
    assert t[3] - t[2] >= 1.0  # the stalled request timed out (timeout_s 1) before the retry


async def test_fallback_to_a_real_server_when_the_primary_endpoint_dies(r, redis_server, clip, transformers_serve):
    """Primary: a proxy to the real server, killed mid-run; fallback: the real server itself. No sampled frame
    goes unanswered."""
    from streamd.testing.openai import FaultProxy

    srv = transformers_serve
    primary = await FaultProxy(srv["url"]).start()
    cfg = make_config(redis_server.url, [{"id": "fb", "url": str(clip), "fps": 2.0, "pipeline": "p",
                                          "playback": "realtime"}],
                      pipelines={"p": vlm_pipeline(primary.url, fallback=srv["url"], model=srv["model"], every_s=0,
                                                   max_tokens=4, max_pixels=112 * 112, max_in_flight=8,
                                                   retry={"attempts": 3, "initial_s": 0.05, "eject_s": 60})})
    try:
        async with running(cfg) as d:
            await until(lambda: vlm_at_least(r, "fb", 3), 60, what="answers through the primary")
            await primary.stop()  # the endpoint dies mid-run
            await until(lambda: d.streams.runners["fb"].state.value == "stopped", 30)
            await until(lambda: vlm_at_least(r, "fb", 12), 60, what="an answer for every sampled frame")
    finally:
        await primary.stop()
    answers = sorted(await vlm_records(r, "fb"), key=lambda a: a["seq"])
    assert [a["seq"] for a in answers] == list(range(12))  # 6 s at 2 fps: none lost
    assert all("error" not in a and a["tokens"]["completion"] >= 1 for a in answers), answers
    eps = [a["endpoint"] for a in answers]
    assert eps[0] == primary.url and eps[-1] == srv["url"]
    switch = eps.index(srv["url"])
    assert switch >= 3 and primary.url not in eps[switch:]  # the fallback served only once the primary died


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


async def test_sglang_engine_answers_on_a_gpu(r, redis_server, clip, tiny_vlm):
    import pytest

    if not _cuda():
        pytest.skip("no CUDA GPU on this machine")
    if not _has_sglang():
        pytest.skip("SGLang is not installed on this machine")
    stage = {"type": "vlm", "backend": "sglang", "model": str(tiny_vlm), "every_s": 0, "max_tokens": 4,
             "max_pixels": 112 * 112}
    cfg = make_config(redis_server.url, [{"id": "sgl", "url": str(clip), "fps": 1.0, "pipeline": "p"}],
                      pipelines={"p": {"stages": [stage]}})
    async with running(cfg):
        answers = await until(lambda: _vrecs(r, "sgl", 3), 300, what="answers from the SGLang engine")
    assert all("error" not in a and a["endpoint"] == "sglang:in-process" for a in answers)


async def test_transformers_backend_4bit_on_a_gpu(r, redis_server, clip, tiny_vlm):
    import importlib.util

    import pytest

    if not _cuda():
        pytest.skip("no CUDA GPU on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed on this machine")
    stage = {"type": "vlm", "backend": "transformers", "model": str(tiny_vlm), "device": "cuda",
             "quantization": "4bit", "dtype": "float16", "every_s": 0, "max_tokens": 4, "max_pixels": 112 * 112}
    cfg = make_config(redis_server.url, [{"id": "q4", "url": str(clip), "fps": 1.0, "pipeline": "p"}],
                      pipelines={"p": {"stages": [stage]}})
    async with running(cfg):
        answers = await until(lambda: _vrecs(r, "q4", 3), 120, what="answers from the 4-bit model")
    assert all("error" not in a and a["endpoint"].startswith("transformers:cuda") for a in answers)

"""Jobs under failure and abuse (issue 17, the review of its first landing): a Redis outage when a job starts ends
that job's writes, never the daemon; a queued upload cancelled leaves no file; a job cancelled before it starts stays
cancelled; uploads are bounded in number and time; a hostile cursor or an oversized job part gets a typed 4xx.
Real redis-server (killed and restarted), real HTTP servers, the scripted VLM server to keep a job busy."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp

from conftest import LOOPBACK_ALLOWED, OPER, READ, at_least, h, make_config, results, running, until
from streamd.jobs.options import JobSpec
from streamd.testing.openai import ScriptedOpenAI
from streamd.testing.servers import HttpDir, ManagedRedis
from test_jobs import api_cfg, post_upload

P = "/api/v1/jobs"


def slow_pipeline(url: str) -> dict:
    """Every frame asked about, one question in flight per job: a job that takes a while."""
    return {"stages": [{"type": "frame_info"}, {"type": "vlm", "model": "scripted", "endpoints": [{"url": url}],
                                                "every_s": 0}]}


def spec(url: str, pipeline: str = "slow") -> JobSpec:
    return JobSpec.model_validate({"source": {"url": url}, "pipeline": pipeline, "sampling": {"mode": "every_frame"}})


@contextlib.asynccontextmanager
async def own_redis_and_slow_job_servers(tmp_path, clip, durable: bool = False, delay_s: float = 0.05):
    """A redis-server of the test's own (to kill and restart), the scripted VLM answering after `delay_s`, the clip
    over HTTP: (redis server, a config with the `slow` pipeline, the clip's URL)."""
    srv = ManagedRedis(tmp_path / "redis", durable=durable).start()
    vlm = await ScriptedOpenAI(lambda req: "ok").start()
    vlm.delay_s = delay_s
    http = HttpDir(clip.parent).start()
    try:
        yield srv, api_cfg(srv.url, {"slow": slow_pipeline(vlm.url)}), http.url(clip.name)
    finally:
        http.stop()
        await vlm.stop()
        srv.stop()


async def test_a_redis_outage_when_a_queued_job_starts_ends_no_more_than_that_job(tmp_path, clip):
    """Job B starts while Redis is down (job A, running, is cancelled then): B runs without its first save, the
    daemon and its live stream go on, and once Redis is back the stream publishes again."""
    import redis.asyncio as aioredis

    srv = ManagedRedis(tmp_path / "redis", durable=True).start()
    vlm = await ScriptedOpenAI(lambda req: "ok").start()
    vlm.delay_s = 0.2
    http = HttpDir(clip.parent).start()
    r = aioredis.Redis.from_url(srv.url)
    cfg = make_config(srv.url, [{"id": "cam", "url": str(clip), "playback": "realtime", "loop": True, "fps": 4.0}],
                      api=api_cfg(srv.url).api.model_dump(), egress=LOOPBACK_ALLOWED,
                      pipelines={"slow": slow_pipeline(vlm.url)}, jobs={"max_running": 1})
    try:
        async with running(cfg) as d:
            await until(lambda: at_least(r, "cam", 2), 30, what="the live stream's results")
            a = await d.jobs.submit(spec(http.url(clip.name)), origin="config")
            b = await d.jobs.submit(spec(http.url(clip.name), "frame_info"), origin="config")
            await until(lambda: a.state == "running" and a.done_frames >= 1, 30, what="job A running")
            assert b.state == "queued"
            srv.stop(kill=True)
            await until(lambda: not d.sink.healthy, 10, what="the sink to notice the outage")
            await d.jobs.cancel(a.id)  # A ends; B starts with Redis down: its first save fails
            await until(lambda: b.finished.is_set(), 60, what="job B ends")
            assert b.state == "done" and b.done_frames == 180, (b.state, b.reason, b.done_frames)
            assert d.streams.runners["cam"].state.value == "live"
            srv.start()
            await r.aclose()
            r = aioredis.Redis.from_url(srv.url)
            have = len(await results(r, "cam"))
            await until(lambda: at_least(r, "cam", have + 4), 30, what="the live stream publishing again")
    finally:
        await r.aclose()
        http.stop()
        await vlm.stop()
        srv.stop()


async def test_a_queued_job_cancelled_keeps_no_upload_and_one_cancelled_before_its_start_stays_cancelled(
        redis_server, clip, tmp_path):
    vlm = await ScriptedOpenAI(lambda req: "ok").start()
    vlm.delay_s = 0.2
    http = HttpDir(clip.parent).start()
    updir = tmp_path / "up"
    cfg = api_cfg(redis_server.url, {"slow": slow_pipeline(vlm.url)}, max_running=1, upload_dir=str(updir))
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            a = await d.jobs.submit(spec(http.url(clip.name)), origin="config")
            await until(lambda: a.state == "running", 30, what="job A running")
            form = aiohttp.FormData()
            form.add_field("job", '{"pipeline": "frame_info"}', content_type="application/json")
            form.add_field("file", clip.read_bytes(), filename="pan.mp4", content_type="video/mp4")
            async with s.post(d.api_url + P, data=form, headers=h(OPER)) as resp:
                assert resp.status == 202, await resp.text()
                queued = (await resp.json())["id"]
            assert [p.name for p in updir.iterdir()] == [f"{queued}.upload"]
            async with s.delete(f"{d.api_url}{P}/{queued}", headers=h(OPER)) as resp:
                assert resp.status == 200 and (await resp.json())["state"] == "cancelled"
            assert list(updir.iterdir()) == []  # the queued job's upload went with it
            # a job cancelled after it left the queue, before it ran (a re-score reads the stream's answers then)
            c = await d.jobs.submit(spec(http.url(clip.name), "frame_info"), origin="config")
            c.cancel()
            await d.jobs.cancel(a.id)
            await until(lambda: c.finished.is_set(), 30, what="job C ends")
            doc = await d.jobs.get(c.id) or c.document()
    finally:
        http.stop()
        await vlm.stop()
    assert c.state == "cancelled" and c.done_frames == 0 and doc["state"] == "cancelled", doc


async def test_uploads_are_bounded_in_number_and_time(redis_server, tmp_path):
    """jobs.max_uploads at once (one more: 503 before a byte is read); one that stalls past jobs.upload_timeout_s:
    408 and nothing kept."""
    updir = tmp_path / "up"
    cfg = api_cfg(redis_server.url, max_uploads=1, upload_timeout_s=1.0, upload_dir=str(updir))
    stalled = asyncio.Event()

    async def body():
        yield (b"--b\r\nContent-Disposition: form-data; name=file; filename=x.mp4\r\n"
               b"Content-Type: video/mp4\r\n\r\n" + b"\0" * 50_000)
        stalled.set()
        await asyncio.sleep(30)  # the client stalls (cancelled when the server answers and closes)
        yield b"\r\n--b--\r\n"

    async with running(cfg) as d, aiohttp.ClientSession() as s:
        slow = asyncio.create_task(s.post(d.api_url + P, data=body(), headers={
            **h(OPER), "Content-Type": "multipart/form-data; boundary=b"}))
        await stalled.wait()
        await until(lambda: d.jobs.uploading == 1, 10, 0.02, what="the first upload being received")
        form = aiohttp.FormData()
        form.add_field("file", b"\0" * 10, filename="y.mp4", content_type="video/mp4")
        async with s.post(d.api_url + P, data=form, headers=h(OPER)) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1", await resp.text()
            assert (await resp.json())["error"]["code"] == "jobs_full"
        resp = await asyncio.wait_for(slow, 30)
        assert resp.status == 408 and (await resp.json())["error"]["code"] == "upload_timeout"
        resp.release()
        assert d.jobs.uploading == 0 and list(updir.iterdir()) == []


async def test_hostile_cursors_and_an_oversized_job_part_get_typed_errors(redis_server, clip, tmp_path):
    cfg = api_cfg(redis_server.url, upload_dir=str(tmp_path / "up"))
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"max_body_bytes": 100_000})})
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("file", clip.read_bytes(), filename="pan.mp4", content_type="video/mp4")
        async with s.post(d.api_url + P, data=form, headers=h(OPER)) as resp:
            jid = (await resp.json())["id"]
        for after in ("\u00b2-0", "1-\u00b3", "99999999999999999999999-0", "1-2-3", "-"):
            async with s.get(f"{d.api_url}{P}/{jid}/results", params={"after": after}, headers=h(READ)) as resp:
                assert resp.status == 422, (after, await resp.text())
                assert (await resp.json())["error"]["details"]["path"] == "after"
        form = aiohttp.FormData()
        form.add_field("job", json.dumps({"pipeline": "frame_info", "note": "x" * 200_000}),
                       content_type="application/json")
        form.add_field("file", b"\0" * 10, filename="y.mp4", content_type="video/mp4")
        async with s.post(d.api_url + P, data=form, headers=h(OPER)) as resp:
            assert resp.status == 413, await resp.text()
            assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_a_jobs_page_reads_only_its_documents_and_skips_expired_ones(r):
    """Listing reads the page's documents, not every job's; expired ones leave the index as a page meets them and
    the page is filled from the ids after them; the index itself expires."""
    from streamd import keys
    from streamd.jobs.store import JobStore

    store = JobStore(r, ttl_s=60, records_maxlen=100)
    for n in range(1, 8):
        await store.save({"id": f"j{n}", "created_ts": float(n), "state": "done"}, "m|t", new=True)
    await r.delete(keys.job_key("j6"), keys.job_key("j5"))  # expired
    total, page = await store.page(0, 3)
    assert [d["id"] for d in page] == ["j7", "j4", "j3"]
    assert total == 5 and not await r.zscore(keys.JOBS_INDEX_KEY, "j6")
    total, page = await store.page(3, 3)
    assert [d["id"] for d in page] == ["j2", "j1"] and total == 5
    assert 0 < await r.pttl(keys.JOBS_INDEX_KEY) <= 120_000


async def test_a_job_whose_records_redis_does_not_take_fails_with_bounded_memory(tmp_path, clip, monkeypatch):
    """Redis gone under a running job: its records wait in memory up to a bound, then the job fails with
    redis_unavailable and stops (it does not hold a whole video's records)."""
    import streamd.jobs.runner as runner

    monkeypatch.setattr(runner, "MAX_PENDING", 20)
    async with own_redis_and_slow_job_servers(tmp_path, clip) as (srv, cfg, url), running(cfg) as d:
        job = await d.jobs.submit(spec(url), origin="config")
        await until(lambda: job.state == "running" and job.done_frames >= 1, 30, what="the job running")
        srv.stop(kill=True)
        await until(lambda: job.finished.is_set(), 60, what="the job ends")
        assert job.state == "failed" and job.reason_code == "redis_unavailable", (job.state, job.reason)
        assert len(job._pending) <= 2 * 20 + 10 and job.done_frames < 180


async def test_a_redis_blip_during_a_job_loses_none_of_its_records(tmp_path, clip):
    """Redis killed and restarted while a job runs: the records it could not write are written after, every
    sampled frame once."""
    import redis.asyncio as aioredis

    from streamd import keys

    async with own_redis_and_slow_job_servers(tmp_path, clip, durable=True) as (srv, cfg, url):
        async with running(cfg) as d:
            job = await d.jobs.submit(spec(url), origin="config")
            await until(lambda: job.done_frames >= 20, 60, what="20 frames done")
            srv.stop(kill=True)
            done_then = job.done_frames
            await until(lambda: job.done_frames >= done_then + 60, 60, what="60 frames more while Redis is down")
            srv.start()
            await until(lambda: job.finished.is_set(), 120, what="the job ends")
        r = aioredis.Redis.from_url(srv.url)
        entries = await r.xrange(keys.job_records_key(job.id))
        await r.aclose()
    import json

    frames = [json.loads(f[b"record"])["seq"] for _, f in entries if json.loads(f[b"record"])["type"] == "frame"]
    assert job.state == "done" and sorted(frames) == list(range(180)), (job.state, len(frames))


async def test_a_daemon_that_lost_a_jobs_lease_leaves_its_upload_to_the_new_owner(redis_server, clip, tmp_path):
    """An uploaded job running here whose lease another daemon took (this one was paused past jobs.lease_ttl_s; the
    other's claim is done here as it does it, a SET of the lease): this daemon stops the job and keeps the upload
    (the new owner runs it again from that file); the old code deleted it in its cleanup."""
    import redis.asyncio as aioredis

    vlm = await ScriptedOpenAI(lambda req: "ok").start()
    vlm.delay_s = 0.1
    updir = tmp_path / "up"
    cfg = api_cfg(redis_server.url, {"slow": slow_pipeline(vlm.url)}, upload_dir=str(updir), lease_ttl_s=1)
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            status, body = await post_upload(s, d, clip.read_bytes(),
                                             '{"pipeline": "slow", "sampling": {"mode": "every_frame"}}')
            assert status == 202, body
            jid = body["id"]
            job = d.jobs.jobs[jid]
            await until(lambda: job.state == "running" and job.done_frames >= 3, 30, what="the job running")
            await r.set(f"streamd:{{job:{jid}}}:lease", "b|other", px=60_000)  # another daemon's claim
            await until(lambda: jid not in d.jobs._tasks, 30, what="the job's run here over (its cleanup done)")
            left = [p.name for p in updir.iterdir()]
    finally:
        await r.aclose()
        await vlm.stop()
    assert job.lease_lost and job.reason_code == "lease_lost"
    assert left == [f"{jid}.upload"]


def other_daemon(cfg, redis_client, name="b"):
    """Another daemon's job manager on the same Redis (its lease rounds driven by the test, one at a time)."""
    from streamd.jobs.manager import JobManager
    from streamd.metrics import Metrics

    m = JobManager(cfg, Metrics(), None, redis_client, None, None)
    m.member_id = name
    return m


async def test_a_lease_that_expired_in_a_redis_outage_stays_with_its_holder(redis_server, clip, tmp_path):
    """Every lease expired while Redis was away (done here by dropping the running job's lease): another daemon's
    first round after Redis is back sees it missing but does not take the job (the old code did, at once, and the
    healthy holder lost it); the holder re-takes its lease and ends the job itself."""
    import asyncio

    import redis.asyncio as aioredis

    from streamd import keys

    vlm = await ScriptedOpenAI(lambda req: "ok").start()
    vlm.delay_s = 0.02
    http = HttpDir(clip.parent).start()
    cfg = api_cfg(redis_server.url, {"slow": slow_pipeline(vlm.url)}, lease_ttl_s=1)
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        async with running(cfg) as d:
            job = await d.jobs.submit(spec(http.url(clip.name)), origin="config")
            await until(lambda: job.done_frames >= 5, 60, what="the job running")
            b = other_daemon(cfg, r)
            lease = keys.job_lease_key(job.id)
            await r.delete(lease)
            assert await b.lease_round()
            assert not (await r.get(lease) or b"").startswith(b"b|")  # b did not take it
            await until(lambda: r.get(lease), 10, 0.05, what="the holder re-takes its lease")
            await asyncio.sleep(1.2)  # past b's wait of a lease TTL: the lease is there, b takes nothing
            assert await b.lease_round()
            taken_by_b = b.jobs
            await until(lambda: job.finished.is_set(), 120, what="the job ends")
    finally:
        await r.aclose()
        http.stop()
        await vlm.stop()
    assert taken_by_b == {}
    assert job.state == "done" and not job.lease_lost and job.attempt == 1, (job.state, job.reason)


async def test_a_missing_lease_is_claimed_only_after_a_ttl_of_healthy_link(tmp_path):
    """A daemon takes a job whose lease is missing only once it has seen it missing for a whole jobs.lease_ttl_s
    with its own Redis link healthy: a round that failed (Redis down) in between starts the wait again."""
    import asyncio

    import redis.asyncio as aioredis

    from streamd import keys

    srv = ManagedRedis(tmp_path / "redis", durable=True).start()
    cfg = api_cfg(srv.url, lease_ttl_s=1)
    r = aioredis.Redis.from_url(srv.url)
    try:
        b = other_daemon(cfg, r)
        jid = "0123456789abcdef"
        await b.store.save({"id": jid, "state": "running", "created_ts": 1.0, "daemon": "a", "started_ts": 1.0},
                           "a|gone", new=True)
        lease = keys.job_lease_key(jid)
        await r.delete(lease)  # a's lease expired (a is gone, or Redis was away)
        assert await b.lease_round() and await r.get(lease) is None  # first seen missing: not taken
        srv.stop(kill=True)
        assert not await b.lease_round()  # b's own link is down
        srv.start()
        await until(lambda: r.ping(), 30, 0.1, what="Redis back")
        await asyncio.sleep(1.2)  # a lease TTL since the first sighting, but b's link failed in between
        assert await b.lease_round() and await r.get(lease) is None
        await asyncio.sleep(1.2)  # a whole TTL seen missing with a healthy link
        assert await b.lease_round()
        taken = await r.get(lease)
        doc = json.loads(await r.get(keys.job_key(jid)))
    finally:
        await r.aclose()
        srv.stop()
    assert taken.startswith(b"b|")
    assert doc["state"] == "failed" and doc["reason_code"] == "daemon_lost", doc


async def test_every_active_job_is_watched_and_a_running_jobs_spec_outlives_the_job_ttl(r):
    """unowned() pages through the whole active set (the old code looked at its 1000 oldest only), and a renewed
    lease keeps the job's spec (what another daemon needs to run it again) for another jobs.ttl_s (the old code set
    its TTL once: a job running past jobs.ttl_s could not be run again)."""
    from streamd import keys
    from streamd.jobs.store import JobStore

    store = JobStore(r, ttl_s=600, records_maxlen=100, lease_ttl_s=5)
    await r.zadd(keys.JOBS_ACTIVE_KEY, {f"j{n:05d}": float(n) for n in range(1005)})
    await r.set(keys.job_lease_key("j01002"), "m|t")
    got = await store.unowned({"j00003"})
    assert len(got) == 1003 and got[:3] == ["j00000", "j00001", "j00002"] and got[-1] == "j01004"
    assert "j01002" not in got and "j00003" not in got
    await store.save_spec("j00001", {"spec": {}})
    await r.pexpire(keys.job_spec_key("j00001"), 500)  # jobs.ttl_s nearly over, the job still running
    assert await store.renew("j00001", "m|t")
    assert await r.pttl(keys.job_spec_key("j00001")) > 500_000


async def test_a_job_is_said_done_only_once_its_records_are_written(redis_server, r, clip):
    """A client that reads a job's records on seeing `done` gets every one. The runner writes its last records after
    its pipeline is through, and the document said `done` before that write: a client reading at once was a few
    records short (a CI run: the last 3 of 180). Writes to Redis are paused (CLIENT PAUSE WRITE, reads go on) from
    the job's start past its end, so its last write waits: a GET that says `done` must now wait for it too."""
    from test_jobs import all_records, get_job, post_job

    srv = HttpDir(clip.parent).start()
    try:
        async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
            _, doc, _ = await post_job(s, d, {"source": {"url": srv.url(clip.name)}, "pipeline": "frame_info",
                                              "sampling": {"mode": "every_frame"}})
            jid = doc["id"]
            while (await get_job(s, d, jid))["state"] == "queued":
                await asyncio.sleep(0.005)
            await r.execute_command("CLIENT", "PAUSE", 4000, "WRITE")
            try:
                ended = await until(lambda: _terminal(s, d, jid), 60, 0.05, what="the job ends")
                recs = [x for x in (await all_records(s, d, jid, 1000))[0] if x["type"] == "frame"]
            finally:
                await r.execute_command("CLIENT", "UNPAUSE")
    finally:
        srv.stop()
    assert ended["state"] == "done", ended
    assert len(recs) == ended["progress"]["frames_done"] == 180, (len(recs), ended["progress"])


async def _terminal(s, d, jid):
    from test_jobs import get_job

    doc = await get_job(s, d, jid)
    return doc if doc["state"] in ("done", "failed", "cancelled") else None

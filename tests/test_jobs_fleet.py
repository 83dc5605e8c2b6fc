"""Jobs whose daemon dies (issue 17): a running job is held under a lease its daemon renews; when the daemon is
killed with SIGKILL, another daemon of the fleet takes the job over and runs it again from the start (the lost
attempt's records removed, every record stamped with its attempt), or, past jobs.retries, the daemon restarted ends
it `failed` with reason_code daemon_lost. Real daemons as subprocesses on a redis-server of the test's own, the
clip over HTTP, the scripted VLM server keeping the job busy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys

import aiohttp
import redis.asyncio as aioredis

from conftest import LOOPBACK_ALLOWED, OPER, READ, TOKENS, h, until
from streamd.testing.openai import ScriptedOpenAI
from streamd.testing.servers import HttpDir, ManagedRedis, free_port
from test_jobs_hardening import slow_pipeline

P = "/api/v1/jobs"
TTL = 2.0
FRAMES = 180  # the clip: 6 s at 30 fps, every frame


class Daemons:
    """Daemon processes (`python -m streamd run -c`) on one Redis, each with its control API on its own port."""

    def __init__(self, tmp_path, redis_url: str, vlm_url: str, **jobs):
        self.tmp, self.redis_url, self.vlm_url, self.jobs = tmp_path, redis_url, vlm_url, jobs
        self.procs: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}

    def start(self, name: str) -> str:
        port = self.urls.get(name, "").rsplit(":", 1)[-1] or free_port()
        cfg = {"redis": {"url": self.redis_url, "retry_initial_s": 0.05, "retry_max_s": 0.5},
               "fleet": {"enabled": True, "member_id": name, "lease_ttl_s": TTL, "renew_s": 0.5},
               "api": {"enabled": True, "port": int(port), "tokens": TOKENS, "rate_limit_per_s": 10_000,
                       "rate_limit_burst": 10_000},
               "egress": LOOPBACK_ALLOWED, "shutdown": {"grace_s": 5}, "streams": [],
               "pipelines": {"slow": slow_pipeline(self.vlm_url)},
               "jobs": {"lease_ttl_s": TTL, "max_vlm_in_flight": 1, **self.jobs}}
        f = self.tmp / f"{name}.json"
        f.write_text(json.dumps(cfg))
        log = open(self.tmp / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "streamd", "run", "-c", str(f)], stdout=log,
                                            stderr=subprocess.STDOUT)
        self.urls[name] = f"http://127.0.0.1:{port}"
        return self.urls[name]

    async def ready(self, s: aiohttp.ClientSession, name: str) -> None:
        async def up():
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(self.urls[name] + "/health/ready") as resp:
                    return resp.status == 200
        await until(up, 60, 0.2, what=f"daemon {name} ready")

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


@contextlib.asynccontextmanager
async def servers(tmp_path, clip, **jobs):
    srv = ManagedRedis(tmp_path / "redis").start()
    vlm = await ScriptedOpenAI(lambda req: "ok").start()
    vlm.delay_s = 0.05
    http = HttpDir(clip.parent).start()
    d = Daemons(tmp_path, srv.url, vlm.url, **jobs)
    r = aioredis.Redis.from_url(srv.url)
    try:
        async with aiohttp.ClientSession() as s:
            yield d, r, s, http.url(clip.name)
    finally:
        d.stop_all()
        await r.aclose()
        http.stop()
        await vlm.stop()
        srv.stop()


async def get_job(s, base, jid):
    async with s.get(f"{base}{P}/{jid}", headers=h(READ)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def start_job(d, s, r, name, url):
    """A job posted to daemon `name`, once its document in Redis says it runs there with a few frames done: its
    id."""
    async with s.post(d.urls[name] + P, json={"source": {"url": url}, "pipeline": "slow",
                                               "sampling": {"mode": "every_frame"}}, headers=h(OPER)) as resp:
        doc = await resp.json()
        assert resp.status == 202, doc

    async def busy():
        got = await redis_doc(r, doc["id"])
        return got["state"] == "running" and got["progress"]["frames_done"] >= 10 and got
    got = await until(busy, 60, 0.1, what="the job running on " + name)
    assert got["daemon"] == name and got["attempt"] == 1
    return doc["id"]


async def redis_doc(r, jid):
    raw = await r.get(f"streamd:{{job:{jid}}}:job")
    return json.loads(raw) if raw else {"state": None}


async def ended_in_redis(r, jid, timeout_s):
    """The job's document once Redis has its end (its daemon wrote the end and the last records)."""
    async def ended():
        doc = await redis_doc(r, jid)
        return doc["state"] in ("done", "failed", "cancelled") and doc
    return await until(ended, timeout_s, 0.2, what=f"job {jid} ends")


async def two_daemons_a_running_a_job(d, s, r, url):
    """Daemons a and b up, a job running on a with a few frames done: its id."""
    for name in ("a", "b"):
        d.start(name)
    for name in ("a", "b"):
        await d.ready(s, name)
    return await start_job(d, s, r, "a", url)


async def records(r, jid):
    return [json.loads(f[b"record"]) for _, f in await r.xrange(f"streamd:{{job:{jid}}}:records")]


async def test_a_killed_daemons_job_runs_again_on_another_daemon_without_duplicate_records(tmp_path, clip):
    async with servers(tmp_path, clip) as (d, r, s, url):
        jid = await two_daemons_a_running_a_job(d, s, r, url)
        before = await records(r, jid)
        assert before and {x["attempt"] for x in before} == {1}
        d.kill("a")
        await ended_in_redis(r, jid, 120)
        doc = await get_job(s, d.urls["b"], jid)
        recs = await records(r, jid)
        active = await r.zscore("streamd:jobs:active", jid)
    assert doc["state"] == "done", doc
    assert doc["daemon"] == "b" and doc["attempt"] == 2, doc
    assert [x["daemon"] for x in doc["lost"]] == ["a"] and doc["lost"][0]["attempt"] == 1
    assert doc["lost"][0]["progress"]["frames_done"] >= 10
    frames = [x for x in recs if x["type"] == "frame"]
    # the lost attempt's records went: each frame once, all of the second attempt
    assert [x["seq"] for x in frames] == list(range(FRAMES)), [x["seq"] for x in frames][:20]
    assert {x["attempt"] for x in recs} == {2}
    assert doc["progress"]["frames_done"] == FRAMES and doc["summary"] is not None
    assert active is None


async def test_a_killed_daemons_job_past_its_retries_fails_daemon_lost_when_it_restarts(tmp_path, clip):
    async with servers(tmp_path, clip, retries=0) as (d, r, s, url):
        d.start("a")
        await d.ready(s, "a")
        jid = await start_job(d, s, r, "a", url)
        d.kill("a")
        d.start("a")  # the same daemon restarted (a new process)
        await d.ready(s, "a")

        await ended_in_redis(r, jid, 60)
        doc = await get_job(s, d.urls["a"], jid)
        await asyncio.sleep(TTL)  # nothing runs it again afterwards
        again = await get_job(s, d.urls["a"], jid)
        spec_left = await r.exists(f"streamd:{{job:{jid}}}:spec")
    assert doc["state"] == "failed" and doc["reason_code"] == "daemon_lost", doc
    assert "jobs.retries" in doc["reason"] and doc["attempt"] == 1 and doc["lost"][0]["daemon"] == "a"
    assert again == doc and not spec_left


async def test_a_paused_daemon_writes_nothing_for_its_job_once_another_took_it_over(tmp_path, clip):
    """SIGSTOP past the lease: b takes the job over and runs it again; a, resumed while b runs it, finds its lease
    taken (its writes are fenced) and stops the job without writing a record or its document; a itself goes on."""
    async with servers(tmp_path, clip) as (d, r, s, url):
        jid = await two_daemons_a_running_a_job(d, s, r, url)
        d.procs["a"].send_signal(signal.SIGSTOP)
        try:
            async def taken():
                doc = await redis_doc(r, jid)
                return doc.get("daemon") == "b" and doc["state"] == "running" and doc
            await until(taken, 30, 0.1, what="b running the job")
        finally:
            d.procs["a"].send_signal(signal.SIGCONT)
        await ended_in_redis(r, jid, 120)
        await asyncio.sleep(1.0)  # a's writer had time to try
        doc = await redis_doc(r, jid)
        recs = await records(r, jid)
        await d.ready(s, "a")  # a answers: the lost job ended a's part, not a
    assert doc["state"] == "done" and doc["daemon"] == "b" and doc["attempt"] == 2, doc
    frames = [x for x in recs if x["type"] == "frame"]
    assert [x["seq"] for x in frames] == list(range(FRAMES)) and {x["attempt"] for x in recs} == {2}
    assert "job lease lost" in (tmp_path / "a.log").read_text()

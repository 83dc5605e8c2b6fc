"""Several daemon processes on one redis-server (fleet mode): every stream runs on exactly one daemon; a killed
daemon's streams resume on the others within the lease TTL; a daemon stopped gracefully hands over at once; a
daemon paused past its lease publishes nothing after the takeover (the result write is fenced)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import redis

from streamd import keys

TTL = 3.0
STREAMS = [f"cam{i}" for i in range(6)]


class Daemons:
    def __init__(self, tmp_path, redis_url, clip):
        self.tmp, self.redis_url, self.clip = tmp_path, redis_url, clip
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, settle_s: float = 2) -> None:
        cfg = {"redis": {"url": self.redis_url},
               "fleet": {"enabled": True, "member_id": name, "lease_ttl_s": TTL, "renew_s": 0.5, "settle_s": settle_s},
               "shutdown": {"grace_s": 5},
               "streams": [{"id": s, "url": str(self.clip), "playback": "realtime", "loop": True, "fps": 4,
                            "pipeline": "frame_info"} for s in STREAMS]}
        f = self.tmp / f"{name}.json"
        f.write_text(json.dumps(cfg))
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "streamd", "run", "-c", str(f)], stdout=log,
                                            stderr=subprocess.STDOUT)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)


@pytest.fixture
def fleet(tmp_path, redis_server, clip):
    r = redis.Redis.from_url(redis_server.url)
    for sid in STREAMS:
        r.delete(keys.results_key(sid), keys.events_key(sid), f"streamd:{{{sid}}}:lease",
                 f"streamd:{{{sid}}}:lease:last")
    d = Daemons(tmp_path, redis_server.url, clip)
    try:
        yield d, r
    finally:
        d.stop_all()
        r.close()


def results(r, sid):
    return [(eid.decode(), json.loads(f[b"record"])) for eid, f in r.xrange(keys.results_key(sid))]


def wait(cond, timeout_s, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def owners(r, since_ts):
    """stream -> the daemons that published its results captured after `since_ts`"""
    out = defaultdict(set)
    for sid in STREAMS:
        for _, rec in results(r, sid):
            if rec["publish_ts"] >= since_ts:
                out[sid].add(rec["daemon"])
    return out


def assert_no_duplicate_seq(r):
    for sid in STREAMS:
        seqs = [rec["seq"] for _, rec in results(r, sid)]
        assert len(seqs) == len(set(seqs)), (sid, [s for s in seqs if seqs.count(s) > 1][:5])
        assert seqs == sorted(seqs), sid


def test_each_stream_runs_once_and_moves_when_its_daemon_dies_or_stops(fleet):
    d, r = fleet
    for name in ("a", "b", "c"):
        d.start(name)
    wait(lambda: all(results(r, s) for s in STREAMS), 40, "every stream's first result")
    time.sleep(6)  # daemons that started later get their share (settle_s 2 s, 2 moves per renew interval)
    t0 = time.time()
    time.sleep(3)
    own = owners(r, t0)
    assert all(len(own[s]) == 1 for s in STREAMS), dict(own)  # exactly one daemon per stream
    assert len({next(iter(v)) for v in own.values()}) >= 2, dict(own)  # shared, not all on one daemon
    assert_no_duplicate_seq(r)

    # kill -9 the daemon with the most streams: they resume on the others within the lease TTL (+ 2 s)
    counts = defaultdict(list)
    for s, v in own.items():
        counts[next(iter(v))].append(s)
    victim = max(counts, key=lambda m: len(counts[m]))
    moved = counts[victim]
    d.signal(victim, signal.SIGKILL)
    t_kill = time.time()

    def resumed():
        got = {}
        for s in moved:
            after = [rec for _, rec in results(r, s) if rec["publish_ts"] > t_kill and rec["daemon"] != victim]
            if not after:
                return None
            got[s] = after[0]["publish_ts"] - t_kill
        return got

    gaps = wait(resumed, TTL + 10, "the killed daemon's streams elsewhere")
    print("time to first new result after kill -9:", {s: round(g, 2) for s, g in gaps.items()})
    assert max(gaps.values()) <= TTL + 2, gaps
    firsts = {s: next(rec for _, rec in results(r, s) if rec["publish_ts"] > t_kill and rec["daemon"] != victim)
              for s in moved}
    assert all(rec["discontinuity"] for rec in firsts.values())  # the new owner's first frame says so
    changed = [json.loads(f[b"event"]) for s in moved for _, f in r.xrange(keys.events_key(s))
               if json.loads(f[b"event"]).get("reason_code") == "owner_changed"]
    assert {e["stream_id"] for e in changed} == set(moved)

    # SIGTERM another daemon: it hands its streams over at once (gap <= 2 s)
    alive = [m for m in ("a", "b", "c") if m != victim]
    time.sleep(1.5)
    t1 = time.time()
    own = owners(r, t1 - 1)
    leaving = alive[0]
    theirs = [s for s, v in own.items() if leaving in v]
    d.signal(leaving, signal.SIGTERM)
    t_term = time.time()
    assert d.procs[leaving].wait(15) == 0

    def handed():
        got = {}
        for s in theirs:
            last_old = max((rec["publish_ts"] for _, rec in results(r, s) if rec["daemon"] == leaving), default=t_term)
            new = [rec["publish_ts"] for _, rec in results(r, s) if rec["daemon"] == alive[1]
                   and rec["publish_ts"] > t_term - 1]
            if not new:
                return None
            got[s] = min(new) - last_old
        return got

    gaps = wait(handed, 15, "the stopped daemon's streams on the last one") if theirs else {}
    print("hand-over gap after SIGTERM:", {s: round(g, 2) for s, g in gaps.items()})
    assert all(g <= 2.0 for g in gaps.values()), gaps
    assert_no_duplicate_seq(r)


def test_a_paused_daemon_publishes_nothing_after_the_takeover(fleet):
    d, r = fleet
    for name in ("p", "q"):
        d.start(name, settle_s=600)  # no rebalancing: streams taken over stay where they went
    wait(lambda: all(results(r, s) for s in STREAMS), 40, "every stream's first result")
    time.sleep(2)
    own = owners(r, time.time() - 1)
    paused = "p" if any("p" in v for v in own.values()) else "q"
    theirs = [s for s, v in own.items() if paused in v]
    assert theirs, dict(own)
    d.signal(paused, signal.SIGSTOP)
    t_stop = time.time()
    wait(lambda: all(any(rec["daemon"] != paused and rec["publish_ts"] > t_stop for _, rec in results(r, s))
                     for s in theirs), TTL + 10, "the takeover")
    time.sleep(1)
    d.signal(paused, signal.SIGCONT)  # it wakes up with results buffered and leases it believes it holds
    time.sleep(4)
    for s in theirs:
        recs = [rec for _, rec in results(r, s)]
        first_new = next(i for i, rec in enumerate(recs) if rec["daemon"] != paused and rec["publish_ts"] > t_stop)
        late = [rec for rec in recs[first_new:] if rec["daemon"] == paused]
        assert late == [], (s, len(late))
    assert_no_duplicate_seq(r)
    assert d.procs[paused].poll() is None  # it lives on (and owns what it gets again), it only lost the leases
    os.kill(d.procs[paused].pid, 0)


async def test_a_result_write_is_fenced_by_the_lease_token(redis_server):
    """The sink writes a leased stream's result only while the lease key holds the writer's token: with the lease
    taken by another daemon (another token) the record is not written, counted, and reported."""
    import asyncio

    import numpy as np
    import redis.asyncio as aioredis

    from streamd.config import RedisConfig
    from streamd.fleet import lease_key
    from streamd.frames import Frame, Work
    from streamd.metrics import Metrics
    from streamd.sinks.redis import RedisSink

    r = aioredis.Redis.from_url(redis_server.url)
    sid = "fenced-cam"
    await r.delete(keys.results_key(sid), lease_key(sid))
    metrics = Metrics()
    sink = RedisSink(r, RedisConfig(url=redis_server.url), metrics)
    lost: list[str] = []
    sink.fence_for = lambda s: (lease_key(s), "me|1")
    sink.on_fenced = lost.append
    task = asyncio.create_task(sink.run())

    def work(seq):
        return Work(Frame(stream_id=sid, seq=seq, pts_s=seq / 2, capture_ts=1.0, image=np.zeros((2, 2, 3), np.uint8)))

    try:
        await r.set(lease_key(sid), "me|1")
        await sink.publish_results([work(0)])
        await asyncio.wait_for(sink.wait_idle(), 5)
        await r.set(lease_key(sid), "other|2")  # the lease moved on
        await sink.publish_results([work(1)])
        await asyncio.wait_for(sink.wait_idle(), 5)
        await r.delete(lease_key(sid))  # or expired
        await sink.publish_results([work(2)])
        await asyncio.wait_for(sink.wait_idle(), 5)
        written = [int(f[b"seq"]) for _, f in await r.xrange(keys.results_key(sid))]
    finally:
        task.cancel()
        await sink.aclose()
        await r.aclose()
    assert written == [0]
    assert lost == [sid, sid] and sink.fenced == 2
    assert metrics.registry.get_sample_value("streamd_results_fenced_total", {"stream": sid}) == 2


async def test_any_daemons_api_adds_reads_and_removes_fleet_streams_within_capacity(redis_server):
    """Two daemons (max_streams 1 each): a camera added through one API runs on exactly one daemon and both APIs
    say where; a second fits; a third is refused with 503 capacity_exhausted + Retry-After; /api/v1/cluster lists
    both; a DELETE through the daemon that does not run it stops it where it runs."""
    import asyncio

    import aiohttp
    import redis.asyncio as aioredis

    from conftest import api_cfg, h, OPER, READ, until
    from streamd.keys import API_STREAMS_KEY
    from streamd.testing.daemon import running

    r = aioredis.Redis.from_url(redis_server.url)
    await r.delete(API_STREAMS_KEY, "streamd:fleet:members")

    def cfg(name):
        c = api_cfg(redis_server.url)
        return c.model_copy(update={"fleet": c.fleet.model_copy(update={
            "enabled": True, "member_id": name, "max_streams": 1, "lease_ttl_s": 3, "renew_s": 0.5})})

    cam = {"url": "rtsp://127.0.0.1:9/cam", "pipeline": "frame_info", "reconnect": {"max_attempts": None}}
    try:
        async with running(cfg("x")) as dx, running(cfg("y")) as dy, aiohttp.ClientSession() as s:
            apis = {"x": dx.api_url, "y": dy.api_url}

            async def call(who, method, path, token=OPER, **kw):
                async with s.request(method, apis[who] + "/api/v1" + path, headers=h(token), **kw) as resp:
                    return resp.status, await resp.json() if resp.status != 204 else None, resp.headers

            await asyncio.sleep(1.5)  # both heartbeats seen
            st, body, _ = await call("x", "POST", "/streams", json={"id": "one", **cam})
            assert st == 201, body
            await until(lambda: ("one" in dx.streams.runners) != ("one" in dy.streams.runners), 10, what="one runs on one daemon")
            owner = "x" if "one" in dx.streams.runners else "y"

            async def owner_everywhere():
                got = [(await call(w, "GET", "/streams/one", READ))[1].get("owner") for w in ("x", "y")]
                return got == [owner, owner]

            await until(owner_everywhere, 10, what="both APIs name the owner")
            st, body, _ = await call("y", "POST", "/streams", json={"id": "two", **cam})
            assert st == 201, body
            await until(lambda: {"one", "two"} == set(dx.streams.runners) | set(dy.streams.runners) and len(dx.streams.runners) == 1
                        and len(dy.streams.runners) == 1, 10, what="one stream per daemon")
            st, body, headers = await call("x", "POST", "/streams", json={"id": "three", **cam})
            assert st == 503 and body["error"]["code"] == "capacity_exhausted" and "Retry-After" in headers, body
            st, body, _ = await call("y", "GET", "/cluster", READ)
            assert st == 200 and body["fleet"] and {m["id"] for m in body["members"]} == {"x", "y"}
            assert body["capacity"] == 2 and body["streams"] == 2
            st, listed, _ = await call("x", "GET", "/streams", READ)
            assert {x["id"] for x in listed["streams"]} == {"one", "two"}
            other = "y" if owner == "x" else "x"
            st, _, _ = await call(other, "DELETE", "/streams/one")
            assert st == 204
            await until(lambda: "one" not in dx.streams.runners and "one" not in dy.streams.runners, 10, what="one stopped")
            await asyncio.sleep(1.5)
            assert "one" not in dx.streams.runners and "one" not in dy.streams.runners  # and not started again anywhere
    finally:
        await r.delete(API_STREAMS_KEY)
        await r.aclose()


def test_a_daemon_that_joins_gets_a_share(fleet):
    d, r = fleet
    for name in ("j1", "j2"):
        d.start(name)
    wait(lambda: all(results(r, s) for s in STREAMS), 40, "every stream's first result")
    d.start("j3")
    t_join = time.time()
    share = wait(lambda: [s for s, v in owners(r, t_join).items() if "j3" in v], 30, "the new daemon's share")
    print("streams handed to the new daemon:", share, "after", round(time.time() - t_join, 1), "s")
    time.sleep(2)
    t0 = time.time()
    time.sleep(2)
    own = owners(r, t0)
    assert all(len(own[s]) == 1 for s in STREAMS), dict(own)
    assert_no_duplicate_seq(r)


async def test_a_taken_over_streams_track_ids_stay_above_the_previous_owners():
    """Two Track stages standing for two daemons: the first tracks a box from seq 0, the second takes the stream
    over at seq 40 (seq continues); its track ids start above anything the first could have given."""
    import numpy as np

    from streamd.config import StageConfig
    from streamd.frames import Frame, Work
    from streamd.stages.track import TRACK_IDS_PER_FRAME, Track

    async def run(seqs):
        stage = Track.from_config(StageConfig(type="track"), "test")
        await stage.setup()
        ids = set()
        for seq in seqs:
            w = Work(Frame(stream_id="cam", seq=seq, pts_s=seq / 4, capture_ts=seq / 4,
                           image=np.zeros((360, 640, 3), np.uint8)))
            x = 100 + 2 * (seq % 40)
            w.carry["detect"] = np.array([[x, 100, x + 80, 260, 0.9, 0], [400, 50, 460, 200, 0.9, 0]], np.float32)
            w.outputs["detect"] = {"detections": [{"label": "person"}, {"label": "person"}]}
            await stage.process([w])
            ids |= {t["track_id"] for t in w.outputs["track"]["tracks"]}
        return ids

    first = await run(range(0, 40))
    second = await run(range(40, 60))
    assert first and second and max(first) < 40 * TRACK_IDS_PER_FRAME < min(second), (first, second)

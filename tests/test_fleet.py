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
    """Neither a result nor an event: the paused daemon's stop of the streams it lost (a `state` event saying
    `stopped`) is fenced like its results (the old code published it after the new owner's `owner_changed`)."""
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
        evs = [json.loads(f[b"event"]) for _, f in r.xrange(keys.events_key(s))]
        taken = max(i for i, e in enumerate(evs) if e.get("reason_code") == "owner_changed" and e["owner"] != paused)
        stale = [e for e in evs[taken:] if e["type"] == "state" and e["to"] == "stopped"]  # the new owner runs on
        assert stale == [], (s, stale)
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
    sink.on_fenced = lambda sid, _token: lost.append(sid)
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
    await r.delete(API_STREAMS_KEY, "streamd:{fleet}:members")

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


BIG = [f"big{i:02d}" for i in range(20)]
BIG_TTL = 10.0  # the default lease TTL


class Sampler:
    """Every `every_s`, from a thread: the lease key of every stream (one MGET: one instant) and each daemon's
    GET /api/v1/cluster (the member records: which streams each daemon says it runs, and when it said so)."""

    def __init__(self, redis_url: str, streams: list[str], apis: dict[str, str], every_s: float = 1.0):
        import threading

        from streamd.fleet import lease_key

        self.r = redis.Redis.from_url(redis_url)
        self.streams, self.apis, self.every_s = streams, apis, every_s
        self.lease_keys = [lease_key(s) for s in streams]
        self.leases: list[tuple[float, float, dict[str, str | None]]] = []  # (t0, t1, stream -> holder)
        self.claims: dict[tuple[str, float], set[str]] = {}  # (member, heartbeat) -> streams it said it runs
        self.answers: list[tuple[float, dict]] = []  # (time, GET /api/v1/cluster)
        self.api_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.r.close()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            t_next = time.monotonic() + self.every_s
            t0 = time.time()
            vals = self.r.mget(self.lease_keys)
            t1 = time.time()
            self.leases.append((t0, t1, {s: v.decode().split("|", 1)[0] if v else None
                                         for s, v in zip(self.streams, vals)}))
            for url in self.apis.values():
                try:
                    with urllib.request.urlopen(url + "/api/v1/cluster", timeout=2) as resp:
                        body = json.loads(resp.read())
                except OSError:  # not listening yet (starting), or too slow this once
                    self.api_errors += 1
                    continue
                if not isinstance(body, dict) or "members" not in body:  # not the cluster view: counted, skipped
                    self.api_errors += 1
                    continue
                self.answers.append((time.time(), body))
                for m in body["members"]:
                    if m["last_heartbeat"] is not None:
                        self.claims[(m["id"], float(m["last_heartbeat"]))] = set(m["streams"])
            self._stop.wait(max(0.0, t_next - time.monotonic()))

    def holder_around(self, t: float, sid: str) -> tuple[str | None, str | None]:
        """The lease holder of `sid` at the last observation that ended before `t` and at the first one that began
        after it (None where there is no such observation, or the lease was free)."""
        before = [o for o in self.leases if o[1] < t]
        after = [o for o in self.leases if o[0] > t]
        return (before[-1][2][sid] if before else None, after[0][2][sid] if after else None)


def test_fleet_twenty_cameras_three_daemons(tmp_path, redis_server):
    """Issue 13, the big case: three daemon processes on one redis-server share 20 cameras (a local file looped and
    played as live, 2 fps, the pass-through pipeline) for about 60 s; the third joins 10 s into the run, so streams
    are handed over while it is watched. Every second the lease keys and each daemon's
    GET /api/v1/cluster are sampled; then: no stream is ever claimed by a daemon while another one holds its lease
    on both sides of that claim, no result is written by a daemon while another one holds the lease on both sides
    of the write (the XADD id is Redis's clock), no stream stays without an owner longer than the lease TTL after
    the start, no duplicate `seq` in any result stream, and every stream produced results until the end."""
    from streamd.fleet import lease_key
    from streamd.testing.media import make_pan_clip
    from streamd.testing.servers import free_port

    clip = make_pan_clip(tmp_path / "cam.mp4", seconds=4, fps=10, size=(320, 180), gop=10)  # 10 fps to decode
    r = redis.Redis.from_url(redis_server.url)
    for sid in BIG:
        r.delete(keys.results_key(sid), keys.events_key(sid), lease_key(sid), lease_key(sid) + ":last")
    names = ("big-a", "big-b", "big-c")
    ports = {n: free_port() for n in names}
    d = Daemons(tmp_path, redis_server.url, clip)

    def start(name):
        cfg = {"redis": {"url": redis_server.url},
               "api": {"enabled": True, "port": ports[name]},
               "fleet": {"enabled": True, "member_id": name, "lease_ttl_s": BIG_TTL, "renew_s": 1.0,
                         "settle_s": 2},
               "shutdown": {"grace_s": 5},
               "streams": [{"id": s, "url": str(clip), "playback": "realtime", "loop": True, "fps": 2,
                            "pipeline": "frame_info"} for s in BIG]}
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(cfg))
        log = open(tmp_path / f"{name}.log", "w")
        d.procs[name] = subprocess.Popen([sys.executable, "-m", "streamd", "run", "-c", str(f)], stdout=log,
                                         stderr=subprocess.STDOUT)

    t_start = time.time()
    apis = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    try:
        with Sampler(redis_server.url, BIG, apis) as sampler:
            start("big-a")
            start("big-b")
            wait(lambda: all(r.xlen(keys.results_key(s)) for s in BIG), 120, "every stream's first result")
            t_first = time.time()
            time.sleep(10)
            start("big-c")  # joins the running fleet: streams are handed over to it while the run is sampled
            t_join = time.time()
            time.sleep(max(0.0, t_first + 60 - time.time()))
            t_end = time.time()
        alive = {n: p.poll() is None for n, p in d.procs.items()}
    finally:
        d.stop_all()
    logs = {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in names}
    assert all(alive.values()), (alive, logs)

    recs = {s: [(int(eid.split("-")[0]) / 1000, rec) for eid, rec in results(r, s)] for s in BIG}
    r.close()
    n_leases = len(sampler.leases)
    gaps = [b[0] - a[1] for a, b in zip(sampler.leases, sampler.leases[1:])]

    # no daemon says it runs a stream whose lease another daemon holds just before and just after it said so
    double_claims = []
    for (member, hb), streams in sampler.claims.items():
        # members and streams of this test only (a daemon of an earlier test can still be in the member list until
        # its record's TTL ends)
        if member not in names:
            continue
        for s in streams & set(BIG):
            before, after = sampler.holder_around(hb, s)
            if before is not None and before == after and before != member:
                double_claims.append((s, member, before, round(hb - t_start, 2)))
    # and the same within one answer: two members listing one stream (counted; stale records may overlap briefly)
    listed_twice = 0
    for _, body in sampler.answers:
        listed = [s for m in body["members"] if m["id"] in names for s in m["streams"] if s in BIG]
        listed_twice += len(listed) - len(set(listed))

    # no result written by a daemon while another holds the lease on both sides of the write
    foreign = []
    for s, rs in recs.items():
        for w, rec in rs:
            before, after = sampler.holder_around(w, s)
            if before is not None and before == after and before != rec["daemon"]:
                foreign.append((s, rec["seq"], rec["daemon"], before, round(w - t_start, 2)))

    # owners over time: changes of lease holder, and the longest time a stream was seen without one after the start
    moves = {s: 0 for s in BIG}
    ownerless = {s: 0.0 for s in BIG}
    for s in BIG:
        held = [(o[1], o[2][s]) for o in sampler.leases if o[0] >= t_first]
        free_since = None
        for t, h in held:
            if h is None and free_since is None:
                free_since = t
            elif h is not None and free_since is not None:
                ownerless[s], free_since = max(ownerless[s], t - free_since), None
        if free_since is not None:
            ownerless[s] = max(ownerless[s], held[-1][0] - free_since)
        owners_seen = [h for _, h in held if h is not None]
        moves[s] = sum(1 for a, b in zip(owners_seen, owners_seen[1:]) if a != b)
    final = sampler.leases[-1][2]
    per_daemon = {n: sorted(s for s in BIG if final[s] == n) for n in names}

    counts = {s: len(rs) for s, rs in recs.items()}
    late = {s: sum(1 for w, _ in rs if w >= t_end - 10) for s, rs in recs.items()}
    dup = {s: len(rs) - len({rec["seq"] for _, rec in rs}) for s, rs in recs.items()}
    unordered = [s for s, rs in recs.items() if [rec["seq"] for _, rec in rs] != sorted(rec["seq"] for _, rec in rs)]
    print(f"every stream's first result {t_first - t_start:.1f} s after the start; big-c joined "
          f"{t_join - t_first:.0f} s later; the run went on {t_end - t_first:.0f} s in all")
    print(f"lease samples: {n_leases}, largest interval {max(gaps, default=0):.2f} s; member records: "
          f"{len(sampler.claims)}, cluster answers: {len(sampler.answers)} ({sampler.api_errors} failed)")
    print("streams per daemon at the end:", {n: len(v) for n, v in per_daemon.items()},
          "; owner changes after the first results:", sum(moves.values()),
          "; longest time without an owner:", f"{max(ownerless.values()):.1f} s")
    print(f"results per stream: min {min(counts.values())}, max {max(counts.values())}, total "
          f"{sum(counts.values())}; in the last 10 s: min {min(late.values())}; duplicate seq: {sum(dup.values())}")
    print(f"double claims: {len(double_claims)}, stream listed twice in one answer: {listed_twice}, "
          f"results by a daemon not holding the lease: {len(foreign)}")

    assert n_leases >= 50 and len(sampler.claims) >= 50, (n_leases, len(sampler.claims))  # the checks had data
    assert double_claims == [], double_claims[:10]
    assert foreign == [], foreign[:10]
    assert all(v == 0 for v in dup.values()) and unordered == [], (dup, unordered)
    assert all(late.values()), late  # every stream kept producing to the end
    assert max(ownerless.values()) <= BIG_TTL + 2, ownerless
    assert all(per_daemon.values()), per_daemon  # shared by all three


def _fleet_api_cfg(redis_url, name, **fleet):
    from conftest import api_cfg

    c = api_cfg(redis_url)
    return c.model_copy(update={"fleet": c.fleet.model_copy(update={
        "enabled": True, "member_id": name, "lease_ttl_s": 3, "renew_s": 0.5, **fleet})})


async def test_a_stream_deleted_while_its_lease_is_being_taken_never_starts(redis_server, clip):
    """The owner-to-be took the lease and waits for Redis (the last seq) before it starts the stream; meanwhile the
    stream is deleted through the other daemon and withdrawn here (the lease given back). Once Redis answers, the
    stream must not start: no runner anywhere, no result written, no lease (the old code started it unleased and
    its results were written unfenced, for good). And a result of a stream this daemon holds no lease for is
    refused in fleet mode, never written plain."""
    import asyncio

    import aiohttp
    import redis.asyncio as aioredis

    from conftest import OPER, READ, h, until
    from streamd.fleet import lease_key
    from streamd.keys import API_STREAMS_KEY
    from streamd.testing.daemon import running
    from streamd.testing.servers import HttpDir

    sid = "gone-early"
    r = aioredis.Redis.from_url(redis_server.url)
    await r.delete(API_STREAMS_KEY, "streamd:{fleet}:members", keys.results_key(sid), lease_key(sid),
                   lease_key(sid) + ":last")
    web = HttpDir(clip.parent).start()
    src = {"id": sid, "url": web.url(clip.name), "pipeline": "frame_info", "loop": True, "playback": "realtime",
           "fps": 4}
    try:
        async with running(_fleet_api_cfg(redis_server.url, "hx")) as dx, \
                running(_fleet_api_cfg(redis_server.url, "hy")) as dy, aiohttp.ClientSession() as s:
            async def call(d, method, path, token=OPER, **kw):
                async with s.request(method, d.api_url + "/api/v1" + path, headers=h(token), **kw) as resp:
                    return resp.status

            held, gate = asyncio.Event(), asyncio.Event()
            for d in (dx, dy):
                async def hold(stream_id, orig=d.streams.fleet._last_seq):
                    held.set()
                    await gate.wait()
                    return await orig(stream_id)

                d.streams.fleet._last_seq = hold
            await asyncio.sleep(1.5)  # both heartbeats seen
            post = asyncio.create_task(call(dx, "POST", "/streams", json=src))
            await asyncio.wait_for(held.wait(), 10)  # a daemon took the lease and waits for the last seq
            await until(lambda: sid in dx.streams.fleet.cfgs and sid in dy.streams.fleet.cfgs, 10,
                        what="both daemons know the stream")
            assert await call(dy, "DELETE", f"/streams/{sid}") == 204
            await until(lambda: sid not in dx.streams.fleet.cfgs and sid not in dy.streams.fleet.cfgs, 10,
                        what="both daemons withdrew it")
            gate.set()
            assert await asyncio.wait_for(post, 10) in (201, 404)  # 404: it was gone once the POST was through
            await asyncio.sleep(3)
            running_on = [n for n, d in (("hx", dx), ("hy", dy)) if sid in d.streams.runners]
            assert running_on == [], running_on
            assert await call(dx, "GET", f"/streams/{sid}", READ) == 404
            assert await r.xlen(keys.results_key(sid)) == 0
            assert await r.get(lease_key(sid)) is None
            assert dx.streams.fleet._fence("nobody-here") == (lease_key("nobody-here"), "-")
    finally:
        web.stop()
        await r.delete(API_STREAMS_KEY)
        await r.aclose()


async def test_a_finished_file_is_not_played_again_when_its_lease_moves(redis_server, clip):
    """Four files (no loop) of the shared config play to their end on x; then y joins (a rebalance hands some over)
    and x stops (y takes the rest). The new owner shows each stream stopped at its end and plays none of them
    again (the old code played every file again from its start: each frame's result twice, by x and by y). A
    stream whose configuration changed is another stream: it plays."""
    import asyncio
    from collections import Counter

    import redis.asyncio as aioredis

    from conftest import make_config, results as recs, until
    from streamd.fleet import lease_key
    from streamd.testing.daemon import running

    ids = [f"done{i}" for i in range(4)]
    r = aioredis.Redis.from_url(redis_server.url)
    for sid in ids:
        await r.delete(keys.results_key(sid), keys.events_key(sid), lease_key(sid), lease_key(sid) + ":last",
                       f"streamd:{{{sid}}}:ended")  # keys.stream_ended_key

    def cfg(name, fps=2):
        return make_config(redis_server.url, [{"id": sid, "url": str(clip), "fps": fps} for sid in ids],
                           fleet={"enabled": True, "member_id": name, "lease_ttl_s": 3, "renew_s": 0.5,
                                  "settle_s": 0.5})

    def ended(d, sid):
        rn = d.streams.runners.get(sid)
        return rn is not None and rn.state.value == "stopped" and rn.reason_code == "ended"

    try:
        async with running(cfg("fx")) as dx:
            await until(lambda: all(ended(dx, sid) for sid in ids), 60, what="every file played to its end")
            await asyncio.sleep(1)
            before = {sid: len(await recs(r, sid)) for sid in ids}
            assert all(n == 12 for n in before.values()), before  # 6 s at 2 fps
            async with running(cfg("fy")) as dy:
                await until(lambda: any(sid in dy.streams.runners for sid in ids), 15, what="a stream handed to y")
                await asyncio.sleep(2)
            # x stopped (y's context ended first: y left too); run y alone: every lease comes to it
        async with running(cfg("fy")) as dy:
            await until(lambda: all(sid in dy.streams.runners for sid in ids), 15, what="y runs every stream")
            await asyncio.sleep(2)
            assert all(ended(dy, sid) for sid in ids), {s: dy.streams.runners[s].state for s in ids}
        after = {sid: await recs(r, sid) for sid in ids}
        dup = {sid: sum(1 for v in Counter(q["pts_s"] for q in rs).values() if v > 1) for sid, rs in after.items()}
        assert {sid: len(rs) for sid, rs in after.items()} == before and not any(dup.values()), (before, dup)
        assert {q["daemon"] for rs in after.values() for q in rs} == {"fx"}

        # another configuration of the same ids (another rate): a new stream, played from its start
        async with running(cfg("fy", fps=1)) as dy:
            await until(lambda: all(len(dy.streams.runners) == 4 and ended(dy, sid) for sid in ids), 60,
                        what="the changed streams played to their end")
        assert [len(await recs(r, sid)) for sid in ids] == [12 + 6] * 4
    finally:
        await r.aclose()


async def test_a_stream_deleted_through_another_daemon_is_forgotten_by_its_owner(redis_server, clip):
    """DELETE through the daemon that does not run the stream: its owner stops it and forgets it as a DELETE through
    its own API would (the old code kept its metric series, its snapshot frames and its result count)."""
    import asyncio

    import aiohttp
    import redis.asyncio as aioredis

    from conftest import OPER, h, until
    from streamd.fleet import lease_key
    from streamd.keys import API_STREAMS_KEY
    from streamd.testing.daemon import running
    from streamd.testing.servers import HttpDir

    sid = "forget-me"
    r = aioredis.Redis.from_url(redis_server.url)
    await r.delete(API_STREAMS_KEY, "streamd:{fleet}:members", keys.results_key(sid), lease_key(sid))
    web = HttpDir(clip.parent).start()
    src = {"id": sid, "url": web.url(clip.name), "pipeline": "frame_info", "loop": True, "playback": "realtime",
           "fps": 4}

    def series(d):
        return [s for m in d.streams.metrics.registry.collect() for s in m.samples if s.labels.get("stream") == sid]

    try:
        async with running(_fleet_api_cfg(redis_server.url, "fx")) as dx, \
                running(_fleet_api_cfg(redis_server.url, "fy")) as dy, aiohttp.ClientSession() as s:
            await asyncio.sleep(1.5)  # both heartbeats seen
            async with s.post(dx.api_url + "/api/v1/streams", headers=h(OPER), json=src) as resp:
                assert resp.status == 201, await resp.text()
            owner = await until(lambda: dx if sid in dx.streams.runners else dy if sid in dy.streams.runners else None,
                                10, what="an owner")
            other = dy if owner is dx else dx
            await until(lambda: owner.sink.results_by_stream.get(sid, 0) >= 2 and sid in owner.streams.frames.stream_ids(),
                        20, what="results and kept frames on the owner")
            assert series(owner)
            await until(lambda: sid in other.streams.fleet.cfgs, 10, what="the other daemon knows the stream")
            async with s.delete(other.api_url + f"/api/v1/streams/{sid}", headers=h(OPER)) as resp:
                assert resp.status == 204
            await until(lambda: sid not in owner.streams.runners and sid not in owner.streams.fleet.cfgs, 10,
                        what="the owner stopped it")
            await asyncio.sleep(0.5)
            assert sid not in owner.sink.results_by_stream, owner.sink.results_by_stream
            assert sid not in owner.streams.frames.stream_ids()
            assert series(owner) == []
    finally:
        web.stop()
        await r.delete(API_STREAMS_KEY)
        await r.aclose()

"""A job over a recorded file against Ultralytics' own `model.track` loop over the same file (same model, same
device, same frames), and the live streams' capture -> publish latency with and without a job running.

    .venv/bin/python benchmarks/jobs.py [--seconds 60] [--fps 2] [--every-frame-seconds 20] [--live 2]
        [--live-seconds 30] [--repeats 3]

Part 1 (wall time): a 1280x720 clip at 30 fps (a pan over `zidane.jpg`) analysed once by a streamd job (detect
with the person detector + ByteTrack, `sampling: fps` at --fps, then every frame of the first
--every-frame-seconds) and by Ultralytics' `model.track(source, stream=True, vid_stride=...)` on the .pt file: at
--fps the loop takes every (30 / fps)-th frame, the very frames streamd's sampler keeps. Neither side's set-up is
timed: streamd's pipeline and model are loaded by a warm-up job first, then the job is timed from POST to `done`
(decode, queueing, detection, tracking, records written to Redis, the summary); Ultralytics' loop is timed from
its first frame done to its last, and its time for all the frames is extrapolated from that rate (it never pays
for the first). Ratio = Ultralytics' time / streamd's (> 1: streamd faster).

Part 2 (latency): --live file streams played like cameras (`playback: realtime`, loop, 2 fps) through the same
pipeline; the p50/p99 of capture -> publish over --live-seconds without a job, then with an every-frame job running
over the clip (repeated while the window lasts). Target: p99 within 20 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import OtherLoad, cpu_model, revision  # noqa: E402
from streamd import keys  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.jobs.options import JobSpec  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.models import resolve_model_path  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from streamd.testing.daemon import running  # noqa: E402

PIPE = {"stages": [{"type": "detect", "model": "person", "imgsz": 640, "conf": 0.35},
                   {"type": "track", "tracker": "bytetrack"}]}


def ultralytics_track(path: str, weights: str, stride: int) -> tuple[int, float]:
    """Ultralytics' loop: (frames, seconds for all of them, extrapolated from the rate after the first)."""
    from ultralytics import YOLO

    model = YOLO(weights, task="detect")
    frames = model.track(source=path, stream=True, tracker="bytetrack.yaml", imgsz=640, conf=0.35, verbose=False,
                         vid_stride=stride)
    next(frames)
    t0, n = time.perf_counter(), 0
    for _ in frames:
        n += 1
    dt = time.perf_counter() - t0
    return n + 1, dt * (n + 1) / max(1, n)


def cfg(redis_url: str, streams: list[dict]) -> object:
    return parse_config({"redis": {"url": redis_url, "results_maxlen": 100_000}, "pipelines": {"dt": PIPE},
                         "jobs": {"max_running": 1}, "streams": streams}, environ={})


async def job(d, path: str, sampling: dict) -> tuple[int, float, dict]:
    spec = JobSpec.model_validate({"pipeline": "dt", "sampling": sampling})
    t0 = time.perf_counter()
    j = await d.jobs.submit(spec, upload=path, origin="config")
    await j.finished.wait()
    dt = time.perf_counter() - t0
    assert j.state == "done", j.document()
    return j.done_frames, dt, j.document()


async def streamd_jobs(redis_url: str, runs: list[tuple[str, dict]]) -> list[tuple[int, float]]:
    async with running(cfg(redis_url, [])) as d:
        await job(d, runs[-1][0], {"mode": "fps", "fps": 1})  # warm-up: the pipeline and its model loaded
        return [(n, dt) for n, dt, _ in [await job(d, p, s) for p, s in runs]]


async def latency(redis_url: str, clip: str, n_live: int, seconds: float, with_job: bool) -> dict:
    import redis.asyncio as aioredis

    streams = [{"id": f"live{i}", "url": clip, "playback": "realtime", "loop": True, "fps": 2.0, "pipeline": "dt"}
               for i in range(n_live)]
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    jobs = 0
    async with running(cfg(redis_url, streams)) as d:
        await d.pipelines["dt"].ready.wait()
        await asyncio.sleep(5)  # warm: trackers, lanes, the doorbell's rate
        start = time.time()
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            if with_job:
                spec = JobSpec.model_validate({"pipeline": "dt", "sampling": {"mode": "every_frame"}})
                j = await d.jobs.submit(spec, upload=clip, origin="config")
                jobs += 1
                await asyncio.wait({asyncio.ensure_future(j.finished.wait())}, timeout=stop - time.monotonic())
                j.cancel()
                await j.finished.wait()
            else:
                await asyncio.sleep(stop - time.monotonic())
        dropped = sum(r.drops.total for r in d.streams.runners.values())
    lat = []
    stages: dict[str, list[float]] = {}
    for i in range(n_live):
        for _, f in await client.xrange(keys.results_key(f"live{i}")):
            rec = json.loads(f[b"record"])
            if rec["capture_ts"] >= start:
                lat.append((rec["publish_ts"] - rec["capture_ts"]) * 1000)
                for k, v in (rec.get("timings_ms") or {}).items():
                    stages.setdefault(k, []).append(v)
    await client.aclose()
    lat.sort()
    return {"n": len(lat), "p50": statistics.median(lat), "p99": pct(lat, 0.99), "dropped": dropped, "jobs": jobs,
            "stages": {k: (statistics.median(v), pct(sorted(v), 0.99)) for k, v in stages.items()}}


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--fps", type=float, default=2)
    ap.add_argument("--every-frame-seconds", type=float, default=20)
    ap.add_argument("--live", type=int, default=2)
    ap.add_argument("--live-seconds", type=float, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="0: the latency part alone")
    a = ap.parse_args()
    setup_logging("warning", "console")
    home = Path(os.environ.get("STREAMD_HOME", ".streamd")) / "bench"
    home.mkdir(parents=True, exist_ok=True)
    long = home / f"pan-720p-{a.seconds:g}s.mp4"
    short = home / f"pan-720p-{a.every_frame_seconds:g}s.mp4"
    for p, s in ((long, a.seconds), (short, a.every_frame_seconds)):
        if not p.exists():
            make_pan_clip(p, seconds=s, fps=30, size=(1280, 720))
    weights = str(resolve_model_path("person"))
    redis = ManagedRedis(home / "redis").start()
    load = OtherLoad(redis.proc.pid if getattr(redis, "proc", None) else None)
    try:
        print(f"streamd {revision()}; {os.cpu_count()} cores ({cpu_model()}); 1280x720 at 30 fps")
        cases = [(f"{a.seconds:g} s at fps {a.fps:g}", str(long), {"mode": "fps", "fps": a.fps},
                  int(round(30 / a.fps))),
                 (f"{a.every_frame_seconds:g} s, every frame", str(short), {"mode": "every_frame"}, 1)]
        runs: list[list[tuple[int, float, int, float]]] = [[] for _ in cases]
        for rep in range(a.repeats):  # interleaved: the box's speed drifts with the other tenants' load
            got = asyncio.run(streamd_jobs(redis.url, [(path, samp) for _, path, samp, _ in cases]))
            for i, (_, path, _, stride) in enumerate(cases):
                runs[i].append((*got[i], *ultralytics_track(path, weights, stride)))
                print(f"  repeat {rep + 1}: {cases[i][0]}: streamd {got[i][1]:.1f} s, Ultralytics "
                      f"{runs[i][-1][3]:.1f} s", flush=True)
        if not a.repeats:
            cases = []
        print("| case | frames (streamd / Ultralytics) | streamd job wall, best (s) | Ultralytics model.track, best "
              "(s) | ratio best/best | median of paired ratios |")
        print("|---|--:|--:|--:|--:|--:|")
        for (name, *_), rs in zip(cases, runs):
            t, ut = min(r[1] for r in rs), min(r[3] for r in rs)
            med = statistics.median(r[3] / r[1] for r in rs)
            print(f"| {name} | {rs[0][0]} / {rs[0][2]} | {t:.1f} | {ut:.1f} | **{ut / t:.2f}** | {med:.2f} |")
        rpid = redis.proc.pid if getattr(redis, "proc", None) else None
        lat_runs = []
        for with_job in (False, True):
            window = OtherLoad(rpid)
            r = asyncio.run(latency(redis.url, str(long), a.live, a.live_seconds, with_job))
            r["cpu"], r["other"] = window.cpu() / (time.monotonic() - window.t0), window.cores()
            lat_runs.append(r)
        base, busy = lat_runs
        print(f"\nlive streams: {a.live} at 2 fps, {a.live_seconds:g} s each")
        print("| | results | p50 (ms) | p99 (ms) | dropped | jobs run |")
        print("|---|--:|--:|--:|--:|--:|")
        for name, r in (("no job", base), ("a job running", busy)):
            print(f"| {name} | {r['n']} | {r['p50']:.0f} | {r['p99']:.0f} | {r['dropped']} | {r['jobs']} |")
        for name, r in (("no job", base), ("a job running", busy)):  # where a live frame's time goes
            print(f"  {name}: per stage p50/p99 (ms): " + ", ".join(
                f"{k} {a:.0f}/{b:.0f}" for k, (a, b) in r["stages"].items()) +
                f"; streamd + redis used {r['cpu']:.2f} cores, other processes {r['other']:.2f}")
        print(f"p99 with a job / without: **{busy['p99'] / base['p99']:.2f}**")
        print(f"other load on the machine: {load.cores():.2f} cores on average")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()

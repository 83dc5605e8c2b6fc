"""Single-image predict latency (POST /api/v1/predict/{pipeline}, issue 14): p50/p99 with the pipeline to itself, and
with live streams running on the same pipeline (and so the same shared detector), on the real `person` detector.

    .venv/bin/python benchmarks/predict.py [--requests 60] [--streams 4] [--live-fps 0.5] [--repeats 2]

A real daemon runs in this process (`streamd.testing.daemon.running`) with the control API on loopback and one
pipeline: the person detector (imgsz 640). The client sends bus.jpg (810x1080 JPEG, 4 people) one request at a time
and times each from sending to the parsed answer (`client`); `server` is the answer's own `timings_ms.total` (queue
and stages, decoding not included). "live" runs `--streams` Redis-input streams on the same pipeline, each fed a
640x360 JPEG pan over zidane.jpg at `--live-fps` frames per second by a feeder in this process (XADD with `ts`),
started before and stopped after that phase's requests; their results per second, capture-to-publish latency and
whether their seq stayed gapless are printed beside; after a live phase the next waits until every frame fed has
its result. Phases alternate `--repeats` times (alone, live, alone, live ...) and the samples of each kind are
pooled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("STREAMD_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".streamd" / "cache"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from common import OtherLoad, cpu_model, revision  # noqa: E402
from streamd import keys  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import load_photo, pan_frames  # noqa: E402
from streamd.testing.daemon import running  # noqa: E402
from streamd.testing.media import encode_jpeg  # noqa: E402

PIPELINE = {"stages": [{"type": "detect", "model": "person", "labels": {"Normal": "person", "Fall": "person_fallen"},
                        "conf": 0.35, "imgsz": 640}]}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def predict(s: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    async with s.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as resp:
        answer = await resp.json()
    dt = (time.perf_counter() - t0) * 1000.0
    if resp.status != 200:
        raise RuntimeError(f"predict answered {resp.status}: {answer}")
    return dt, answer["timings_ms"]["total"]


async def feed(r: aioredis.Redis, key: str, frames: list[bytes], fps: float,
               stop: asyncio.Event) -> int:
    """XADD a frame every 1/fps seconds (on a fixed schedule) until `stop`; returns how many."""
    n, t0 = 0, time.monotonic()
    while not stop.is_set():
        await r.xadd(key, {"image": frames[n % len(frames)], "ts": repr(time.time())})
        n += 1
        delay = t0 + n / fps - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
    return n


async def drained(r: aioredis.Redis, fed: dict[str, int], timeout_s: float = 120.0) -> None:
    """Wait until every live stream has a result for each frame fed to it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        have = [await r.xlen(keys.results_key(sid)) for sid in fed]
        if all(h >= n for h, n in zip(have, fed.values())):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the live streams did not catch up within {timeout_s} s")


async def live_stats(r: aioredis.Redis, sids: list[str], since: float) -> tuple[int, float, float, bool]:
    """Results published since `since` (all streams), their capture-to-publish p50/p99 ms, and whether every stream's
    seq is gapless from 0."""
    import json

    n, lat, gapless = 0, [], True
    for sid in sids:
        recs = [json.loads(f[b"record"]) for _, f in await r.xrange(keys.results_key(sid))]
        gapless &= [x["seq"] for x in recs] == list(range(len(recs)))
        for x in recs:
            if x["publish_ts"] >= since:
                n += 1
                lat.append((x["publish_ts"] - x["capture_ts"]) * 1000.0)
    return n, pct(lat, 50), pct(lat, 99), gapless


async def main_async(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="streamd-predict-bench-"))
    srv = ManagedRedis(root / "redis").start()
    sids = [f"live{i}" for i in range(args.streams)]
    cfg = parse_config({
        "redis": {"url": srv.url}, "log": {"level": "warning"},
        "api": {"enabled": True, "port": 0, "rate_limit_per_s": 100_000, "rate_limit_burst": 100_000},
        "pipelines": {"p": PIPELINE},
        "streams": [{"id": sid, "url": f"redis:frames:{sid}", "pipeline": "p"} for sid in sids]}, environ={})
    body = encode_jpeg(load_photo("bus.jpg"), 90)
    live = [encode_jpeg(f, 85) for f in pan_frames(load_photo("zidane.jpg"), 50, 10.0, (640, 360))]
    print(f"# predict latency: person detector (imgsz 640), bus.jpg 810x1080 JPEG, one request at a time "
          f"({revision()}, {cpu_model()}, {os.cpu_count()} cores)")
    print(f"# {args.requests} requests per phase, {args.repeats} repeats (phases interleaved); live: {args.streams} "
          f"Redis-input streams at {args.live_fps:g} fps each, 640x360 JPEG")
    samples: dict[str, list[tuple[float, float]]] = {"alone": [], "live": []}
    live_rows = []
    fed = dict.fromkeys(sids, 0)
    r = aioredis.Redis.from_url(srv.url)
    other = OtherLoad(srv.proc.pid if srv.proc else None)
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            url = d.api_url + "/api/v1/predict/p"
            for _ in range(5):  # the model loads; its first passes warm up
                await predict(s, url, body)
            for rep in range(args.repeats):
                for kind in ("alone", "live"):
                    stop, feeders = asyncio.Event(), []
                    if kind == "live":
                        feeders = [asyncio.create_task(feed(r, f"frames:{sid}", live, args.live_fps, stop))
                                   for sid in sids]
                        await asyncio.sleep(2.0)  # the streams reach their steady state
                    t0 = time.time()
                    got = [await predict(s, url, body) for _ in range(args.requests)]
                    samples[kind] += got
                    stop.set()
                    counts = await asyncio.gather(*feeders)
                    if kind == "live":
                        wall = time.time() - t0
                        for sid, k in zip(sids, counts):
                            fed[sid] += k
                        await drained(r, fed)  # the live backlog is through before the next phase
                        n, p50, p99, gapless = await live_stats(r, sids, t0)
                        live_rows.append((n / wall, p50, p99, gapless, sum(counts)))
                    c = [g[0] for g in got]
                    print(f"repeat {rep + 1} {kind}: client p50 {pct(c, 50):.0f} ms, p99 {pct(c, 99):.0f} ms",
                          flush=True)
    finally:
        await r.aclose()
        srv.stop()
    print(f"# other processes used {other.cores():.2f} cores on average during the run")
    print("\n| phase | requests | client p50 ms | client p99 ms | server p50 ms | server p99 ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for kind, label in (("alone", "predict alone"), ("live", f"with {args.streams} live streams")):
        c, sv = [g[0] for g in samples[kind]], [g[1] for g in samples[kind]]
        print(f"| {label} | {len(c)} | {pct(c, 50):.0f} | {pct(c, 99):.0f} | {pct(sv, 50):.0f} | {pct(sv, 99):.0f} |")
    for i, (rate, p50, p99, gapless, fed) in enumerate(live_rows):
        print(f"live streams, repeat {i + 1}: {rate:.1f} results/s in all (fed {args.streams} x {args.live_fps:g} "
              f"fps), capture-to-publish p50 {p50:.0f} ms, p99 {p99:.0f} ms, seq gapless: {gapless}")
    ratio = statistics.median([g[0] for g in samples["live"]]) / statistics.median([g[0] for g in samples["alone"]])
    print(f"client p50 with live streams / alone: {ratio:.2f}")
    print("live results/s counts the results published while the phase's requests ran (its wall time); "
          "capture-to-publish counts the frames published from the phase's start until its backlog was through")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60, help="predict requests per phase")
    ap.add_argument("--streams", type=int, default=4, help="live Redis-input streams in the live phase")
    ap.add_argument("--live-fps", type=float, default=0.5, help="frames per second fed to each live stream")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    setup_logging("warning", "console")
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

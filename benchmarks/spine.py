"""Spine benchmark: the daemon's pass-through throughput against plain PyAV decoding, and live latency.

    .venv/bin/python benchmarks/spine.py            # full run (a few minutes on a 2-core box)
    .venv/bin/python benchmarks/spine.py --quick    # shorter clip, one repeat
    .venv/bin/python benchmarks/spine.py --write    # also rewrite the "Spine" section of benchmarks/RESULTS.md

1. Throughput. N streams (1, 4, 8) of the same 720p H.264 clip (one copy of the file per stream):
   - baseline: N threads, each decoding its own copy with PyAV (thread_type AUTO, like the daemon) to RGB numpy
     arrays (`to_ndarray(format="rgb24")`), all at once; frames/s = all frames / wall time;
   - daemon: N file streams, fps null (every frame), playback fast, a pass-through pipeline (one `frame_info`
     stage, defined inline), publishing to a real redis-server; wall time from `Daemon.run()` until every stream has
     stopped and every frame's result record has been published (the end is the newest record's publish_ts, so
     the 10 ms completion poll adds nothing); frames/s = result records / wall time (all N*frames are checked to
     be in Redis).
   Each figure is the best of `--repeats` runs (baseline and daemon interleaved); ratio = daemon / baseline.
2. Latency. 8 live-like streams (playback realtime, loop, fps 2) for `--latency-s` seconds:
   capture -> published latency (publish_ts - capture_ts of every result record read back from Redis, the first
   second skipped as warm-up) p50/p99, and the daemon's event-loop lag p99 (`Daemon.loop_lag_s`, sampled every
   100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamd import keys  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.daemon import Daemon  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402

TARGET_RATIO = 0.90
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Spine (issue 2)"


# -- footage ----------------------------------------------------------------------------------------------------
def clips(n: int, seconds: float, fps: int, cache: Path) -> tuple[list[Path], int]:
    """`n` copies of one 720p clip (made once, cached); returns the paths and the frame count of the clip."""
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"pan_1280x720_{fps}fps_{seconds:g}s.mp4"
    if not src.exists():
        print(f"making {src.name} ...", flush=True)
        make_pan_clip(src, seconds=seconds, fps=fps, size=(1280, 720), gop=30)
    paths = []
    for i in range(n):
        p = cache / f"{src.stem}.copy{i}.mp4"
        if not p.exists() or p.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, p)
        paths.append(p)
    with av.open(str(src)) as c:
        frames = sum(1 for _ in c.demux(c.streams.video[0]) if _.size)  # packets with data = frames (no B-frames)
    return paths, frames


# -- baseline: plain PyAV ---------------------------------------------------------------------------------------
def _decode_rgb(path: Path, out: list[int], i: int) -> None:
    n = 0
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        for vf in c.decode(st):
            vf.to_ndarray(format="rgb24")
            n += 1
    out[i] = n


def baseline(paths: list[Path]) -> tuple[int, float]:
    """All files decoded to RGB at once, one thread each. Returns (frames, seconds)."""
    out = [0] * len(paths)
    threads = [threading.Thread(target=_decode_rgb, args=(p, out, i)) for i, p in enumerate(paths)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out), time.perf_counter() - t0


# -- the daemon -------------------------------------------------------------------------------------------------
PIPELINE = "passthrough"  # defined inline, so the benchmark never depends on what `default` is today


def _config(redis_url: str, streams: list[dict[str, Any]]) -> Any:
    for s in streams:
        s["pipeline"] = PIPELINE
    return parse_config({"redis": {"url": redis_url}, "shutdown": {"grace_s": 30}, "streams": streams,
                         "pipelines": {PIPELINE: {"description": "pass-through",
                                                  "stages": [{"type": "frame_info"}]}}}, environ={})


def _processed(d: Daemon) -> int:
    """Result records published so far (the sink's counter; collecting only this one metric is cheap)."""
    return int(sum(s.value for m in d.metrics.frames_processed.collect() for s in m.samples
                   if s.name.endswith("_total")))


async def daemon_fast(redis_url: str, paths: list[Path], expect: int) -> tuple[int, float, list[float]]:
    """N file streams, every frame, as fast as possible. Returns (records published, seconds, loop lags)."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    ids = [f"bench{i}" for i in range(len(paths))]
    streams = [{"id": s, "url": str(p), "fps": None, "playback": "fast", "loop": False} for s, p in zip(ids, paths)]
    d = Daemon(_config(redis_url, streams))
    await d.startup()
    stop = asyncio.Event()
    t0, t0_epoch = time.perf_counter(), time.time()
    task = asyncio.create_task(d.run(stop))
    try:
        await d.started.wait()
        while True:
            done = _processed(d)
            if done >= expect and all(r.state.value in ("stopped", "failed") for r in d.runners.values()) \
                    and len(d.sink) == 0:
                break
            if task.done():
                raise RuntimeError(f"daemon stopped early: {d.status()}")
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"timed out: {done}/{expect} published; {d.status()}")
            await asyncio.sleep(0.01)  # the poll must cost the daemon next to nothing
        dt_poll = time.perf_counter() - t0
        lags = list(d.loop_lag_s)
    finally:
        stop.set()
        await task
        await d.shutdown()
    failed = [r for r in d.runners.values() if r.state.value == "failed"]
    if failed:
        raise RuntimeError(f"stream failed: {failed[0].reason}")
    stored, last_publish = 0, 0.0
    for s in ids:
        stored += await client.xlen(keys.results_key(s))
        for _, f in await client.xrevrange(keys.results_key(s), count=1):
            last_publish = max(last_publish, json.loads(f[b"record"])["publish_ts"])
    await client.aclose()
    if stored != expect:
        raise RuntimeError(f"{stored} result records in Redis, expected {expect}")
    # the end is when the last record was published (its publish_ts), not when the poll above noticed it
    dt = min(dt_poll, last_publish - t0_epoch)
    return stored, dt, lags


async def daemon_live(redis_url: str, path: Path, n: int, seconds: float, fps: float) -> dict[str, Any]:
    """`n` realtime looping streams sampled at `fps` for `seconds`: latency and loop lag."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    ids = [f"live{i}" for i in range(n)]
    streams = [{"id": s, "url": str(path), "fps": fps, "playback": "realtime", "loop": True} for s in ids]
    d = Daemon(_config(redis_url, streams))
    await d.startup()
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await d.started.wait()
    t_start = time.time()
    await asyncio.sleep(seconds)
    lags = list(d.loop_lag_s)
    stop.set()
    await task
    await d.shutdown()
    lat: list[float] = []
    records = 0
    for s in ids:
        for _, f in await client.xrange(keys.results_key(s)):
            rec = json.loads(f[b"record"])
            records += 1
            if rec["capture_ts"] >= t_start + 1.0:  # first second: warm-up (files opening)
                lat.append(rec["publish_ts"] - rec["capture_ts"])
    await client.aclose()
    a = np.array(lat) * 1000.0
    g = np.array(lags) * 1000.0
    return {"streams": n, "fps": fps, "seconds": seconds, "records": records, "measured": len(lat),
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "lag_p50_ms": float(np.percentile(g, 50)),
            "lag_p99_ms": float(np.percentile(g, 99)), "lag_max_ms": float(g.max()), "lag_samples": len(g)}


# -- report -----------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU; Python {platform.python_version()}, PyAV {av.__version__}"


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], live: dict[str, Any], frames: int,
             extra: str = "") -> str:
    cmd = ".venv/bin/python benchmarks/spine.py" + (" --quick" if args.quick else "")
    out = [SECTION, "",
           f"Command: `{cmd}` (`make bench`). Machine: {machine()}. Run {time.strftime('%Y-%m-%d')}.", "",
           f"### Throughput: pass-through pipeline, every frame, playback fast", "",
           f"720p H.264 clip ({frames} frames, {args.seconds:g} s at 30 fps, GOP 30, no B-frames), one copy per "
           f"stream. Baseline: plain PyAV decoding of the same files to RGB numpy arrays, one thread per file, "
           f"thread_type AUTO, in the same run. Best of {args.repeats} runs each. Target ratio >= {TARGET_RATIO:.2f}.",
           "",
           "| streams | PyAV decode → RGB (frames/s) | daemon (frames/s) | ratio | target met |",
           "|--:|--:|--:|--:|:-:|"]
    for r in rows:
        ok = "yes" if r["ratio"] >= TARGET_RATIO else "**no**"
        out.append(f"| {r['n']} | {r['base_fps']:.1f} | {r['daemon_fps']:.1f} | {r['ratio']:.2f} | {ok} |")
    out += ["", "Event-loop lag while the daemon ran flat out: "
            + ", ".join(f"N={r['n']} p99 {r['fast_lag_p99_ms']:.1f} ms" for r in rows) + ".", "",
            f"### Latency: {live['streams']} live streams at {live['fps']:g} FPS", "",
            f"Playback realtime, loop, {live['seconds']:g} s, {live['measured']} result records measured "
            f"(first second skipped). Capture = wall clock when the frame was decoded to RGB; published = when its "
            f"record was sent to Redis.", "",
            "| capture → published p50 | p99 | max | event-loop lag p99 | max |",
            "|--:|--:|--:|--:|--:|",
            f"| {live['p50_ms']:.1f} ms | {live['p99_ms']:.1f} ms | {live['max_ms']:.1f} ms | "
            f"{live['lag_p99_ms']:.1f} ms | {live['lag_max_ms']:.1f} ms |"]
    if extra:
        out += ["", extra.strip()]
    return "\n".join(out) + "\n"


def write_section(text: str, path: Path = RESULTS_MD) -> None:
    """Replace (or add) the Spine section of RESULTS.md, keeping every other section."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: text + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


# -- main -------------------------------------------------------------------------------------------------------
async def amain(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.streams.split(",")]
    cache = ROOT / ".streamd" / "bench"
    paths, frames = clips(max(counts), args.seconds, 30, cache)
    tmp = Path(tempfile.mkdtemp(prefix="streamd-bench-"))
    srv = await asyncio.to_thread(ManagedRedis(tmp / "redis").start)
    try:
        print(f"{machine()}\nclip: {frames} frames 1280x720, streams {counts}, best of {args.repeats}", flush=True)
        # warm-up: imports, page cache, decoder init
        baseline(paths[:1])
        await daemon_fast(srv.url, paths[:1], frames)
        runs: dict[int, dict[str, list[Any]]] = {n: {"base": [], "daemon": [], "lag": []} for n in counts}
        for rep in range(args.repeats):
            for n in counts:
                sub = paths[:n]
                order = ("base", "daemon") if rep % 2 == 0 else ("daemon", "base")
                for what in order:
                    if what == "base":
                        got, dt = baseline(sub)
                        if got != n * frames:
                            raise RuntimeError(f"baseline decoded {got} frames, expected {n * frames}")
                        runs[n]["base"].append(got / dt)
                    else:
                        got, dt, lags = await daemon_fast(srv.url, sub, n * frames)
                        runs[n]["daemon"].append(got / dt)
                        runs[n]["lag"].append(float(np.percentile(np.array(lags) * 1000, 99)) if lags else 0.0)
                print(f"  run {rep + 1} N={n}: baseline {runs[n]['base'][-1]:7.1f} f/s   "
                      f"daemon {runs[n]['daemon'][-1]:7.1f} f/s", flush=True)
        rows = []
        print(f"\n{'streams':>7} {'PyAV->RGB f/s':>14} {'daemon f/s':>11} {'ratio':>6}  (best of {args.repeats}; "
              f"median ratio)")
        for n in counts:
            b, dm = max(runs[n]["base"]), max(runs[n]["daemon"])
            med = statistics.median(runs[n]["daemon"]) / statistics.median(runs[n]["base"])
            rows.append({"n": n, "base_fps": b, "daemon_fps": dm, "ratio": dm / b, "median_ratio": med,
                         "fast_lag_p99_ms": statistics.median(runs[n]["lag"])})
            flag = "" if dm / b >= TARGET_RATIO else f"   below target {TARGET_RATIO:.2f}"
            print(f"{n:>7} {b:>14.1f} {dm:>11.1f} {dm / b:>6.2f}  ({med:.2f}){flag}", flush=True)

        print(f"\nlatency: 8 streams, realtime, loop, fps 2, {args.latency_s:g} s ...", flush=True)
        live = await daemon_live(srv.url, paths[0], 8, args.latency_s, 2.0)
        print(f"capture->published p50 {live['p50_ms']:.1f} ms  p99 {live['p99_ms']:.1f} ms  "
              f"max {live['max_ms']:.1f} ms  ({live['measured']} records)")
        print(f"event-loop lag p99 {live['lag_p99_ms']:.1f} ms  max {live['lag_max_ms']:.1f} ms  "
              f"({live['lag_samples']} samples)")
    finally:
        await asyncio.to_thread(srv.stop)
        shutil.rmtree(tmp, ignore_errors=True)

    md = markdown(args, rows, live, frames)
    print("\n----- markdown -----\n" + md + "--------------------")
    if args.write:
        write_section(md)
        print(f"wrote {RESULTS_MD.relative_to(ROOT)}")
    return 0 if all(r["ratio"] >= TARGET_RATIO for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 s clip, one repeat, 10 s of latency")
    ap.add_argument("--streams", default="1,4,8", help="stream counts (default 1,4,8)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 3)")
    ap.add_argument("--seconds", type=float, default=None, help="clip length in seconds (default 10)")
    ap.add_argument("--latency-s", type=float, default=None, help="latency run length (default 20)")
    ap.add_argument("--write", action="store_true", help=f"rewrite the '{SECTION[3:]}' section of RESULTS.md")
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.seconds = args.seconds or (5.0 if args.quick else 10.0)
    args.latency_s = args.latency_s or (10.0 if args.quick else 20.0)
    setup_logging("warning", "console")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

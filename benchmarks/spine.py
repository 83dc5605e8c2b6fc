"""Spine benchmark: the daemon's pass-through throughput against plain PyAV decoding, and live latency.

    .venv/bin/python benchmarks/spine.py            # full run (about 3 minutes on a 2-core box)
    .venv/bin/python benchmarks/spine.py --quick    # shorter clip, one repeat
    .venv/bin/python benchmarks/spine.py --write    # also rewrite the "Spine" section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/spine.py --threads  # also CPU per frame by thread group (loop, decoders, FFmpeg)

1. Throughput. N streams (1, 4, 8) of the same 720p H.264 clip (one copy of the file per stream):
   - baseline: N threads, each decoding its own copy with PyAV (thread_type AUTO, like the daemon) to RGB numpy
     arrays (`to_ndarray(format="rgb24")`), all at once; frames/s = all frames / wall time;
   - tuned baseline: the same, converting with one `VideoReformatter` per file (as the daemon's decoder threads
     do) instead of PyAV's new one per frame: what plain PyAV gets when it is told the trick; a second ratio;
   - daemon: N file streams, fps null (every frame), playback fast, a pass-through pipeline (one `frame_info`
     stage, defined inline), publishing to a real redis-server; wall time from `Daemon.run()` until every stream has
     stopped and every frame's result record has been published (the end is the newest record's publish_ts, so
     the 50 ms completion poll adds nothing); frames/s = result records / wall time (all N*frames are checked to
     be in Redis).
   `--repeats` repeats, default 5 (baseline and daemon interleaved). The box may be shared: a repeat during which other
   processes used more than QUIET_CORES is left out (unless all were); frames/s is the best kept run, ratio =
   daemon / baseline. CPU ms per frame (process CPU time, all threads, plus redis-server) is printed too: it is
   much less sensitive to other load than frames/s.
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

import contextlib  # noqa: E402

from common import OtherLoad, ThreadCpu, cpu_model, cpu_s, revision  # noqa: E402
from streamd import keys  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.daemon import Daemon  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.memory import MMAP_THRESHOLD_B, TRIM_THRESHOLD_B, tune_malloc  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from av.video.reformatter import VideoReformatter  # noqa: E402

TARGET_RATIO = 0.90
QUIET_CORES = 0.15  # a run during which other processes used more than this is ignored (unless all were)
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Spine (issue 2)"


def thread_group(name: str) -> str:
    """`--threads`: the event loop (the main thread), the Python decoder threads (the daemon's `decode-<id>`, the
    baseline's `Thread-<n>`), or FFmpeg's own threads (frame threads and swscale's; no Python name)."""
    if name == "MainThread":
        return "loop"
    if name.startswith(("decode-", "Thread-")):
        return "decoder"
    return "ffmpeg"


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
        frames = sum(1 for pkt in c.demux(c.streams.video[0]) if pkt.size)  # one packet per frame (no B-frames)
    return paths, frames


# -- baseline: plain PyAV ---------------------------------------------------------------------------------------
def _decode_rgb(path: Path, out: list[int], i: int, tuned: bool) -> None:
    n = 0
    rgb = VideoReformatter()
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        for vf in c.decode(st):
            if tuned:
                rgb.reformat(vf, format="rgb24").to_ndarray()
            else:
                vf.to_ndarray(format="rgb24")
            n += 1
    out[i] = n


def baseline(paths: list[Path], tuned: bool = False) -> tuple[int, float]:
    """All files decoded to RGB at once, one thread each (`tuned`: one converter per file, not one per frame).
    Returns (frames, seconds)."""
    out = [0] * len(paths)
    threads = [threading.Thread(target=_decode_rgb, args=(p, out, i, tuned)) for i, p in enumerate(paths)]
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
    """Result records published so far (the sink's `frames_processed` metric; collecting one metric is cheap)."""
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
            # `published` (results + events) is a plain attribute: the exact count is only read once it can be done
            done = _processed(d) if d.sink.published >= expect else 0
            if done >= expect and all(r.state.value in ("stopped", "failed") for r in d.streams.runners.values()) \
                    and len(d.sink) == 0:
                break
            if task.done():
                raise RuntimeError(f"daemon stopped early: {d.streams.status()}")
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"timed out: {done}/{expect} published; {d.streams.status()}")
            await asyncio.sleep(0.05)  # the poll must cost the daemon next to nothing (it sets no time: see below)
        dt_poll = time.perf_counter() - t0
        lags = list(d.loop_lag_s)
    finally:
        stop.set()
        await task
        await d.shutdown()
    failed = [r for r in d.streams.runners.values() if r.state.value == "failed"]
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
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU; Python {platform.python_version()}, PyAV {av.__version__}"


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], live: dict[str, Any], frames: int,
             other_cores: float) -> str:
    cmd = ".venv/bin/python benchmarks/spine.py" + (" --quick" if args.quick else "")
    make = "" if args.quick else " (or `make bench`)"
    out = [SECTION, "",
           f"Command: `{cmd}`{make}. streamd at {revision()}. Machine: {machine()}. "
           f"Other processes used {other_cores:.2f} cores on average while it ran. "
           f"Run {time.strftime('%Y-%m-%d')}.", "",
           "### Throughput: pass-through pipeline, every frame, playback fast", "",
           f"720p H.264 clip ({frames} frames, {args.seconds:g} s at 30 fps, GOP 30, no B-frames), one copy per "
           f"stream. Baseline: plain PyAV decoding of the same files to RGB numpy arrays, one thread per file, "
           f"thread_type AUTO, `frame.to_ndarray(format=\"rgb24\")`, in the same run. Tuned: the same, converting "
           f"with one `VideoReformatter` per file as the daemon does (PyAV's to_ndarray sets a new swscale "
           f"converter up for every frame). Daemon: N file streams, fps null, playback fast, one `frame_info` "
           f"stage, results published to a real redis-server (every record checked in Redis). {args.repeats} "
           f"repeats, baseline and daemon interleaved; a repeat during which other processes used more than "
           f"{QUIET_CORES:g} cores is left out (unless every one was; `quiet runs` says how many were kept). "
           f"frames/s: best of the kept runs; ratio = daemon / baseline of those (in brackets: the median of "
           f"the kept runs' paired ratios). CPU ms/frame: process CPU time (all threads, plus redis-server for the "
           f"daemon) per frame, median of the kept runs; it is less sensitive than frames/s to other load on the box. "
           f"Target ratio >= {TARGET_RATIO:.2f}.", "",
           "| streams | PyAV decode → RGB (frames/s) | daemon (frames/s) | ratio | target met | tuned PyAV "
           "(frames/s) | ratio to tuned | CPU ms/frame PyAV | tuned | daemon | loop lag p99 | quiet runs |",
           "|--:|--:|--:|--:|:-:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        ok = "yes" if r["ratio"] >= TARGET_RATIO else "**no**"
        out.append(f"| {r['n']} | {r['base_fps']:.1f} | {r['daemon_fps']:.1f} | {r['ratio']:.2f} "
                   f"({r['median_ratio']:.2f}) | {ok} | {r['tuned_fps']:.1f} | {r['tuned_ratio']:.2f} "
                   f"({r['tuned_median_ratio']:.2f}) | {r['base_cpu_ms']:.2f} | {r['tuned_cpu_ms']:.2f} | "
                   f"{r['daemon_cpu_ms']:.2f} | {r['fast_lag_p99_ms']:.1f} ms | {r['runs_used']} |")
    out += ["", "glibc malloc: " + (
        "the daemon sets its thresholds when it starts (`streamd.memory`: M_MMAP_THRESHOLD "
        f"{MMAP_THRESHOLD_B >> 20} MiB, M_TRIM_THRESHOLD {TRIM_THRESHOLD_B >> 20} MiB). They hold for the whole "
        "process, so the benchmark sets them before its first run and the baseline, in the same process, runs "
        "with them too (checked separately: they change the baseline by no more than run-to-run noise)."
        if args.malloc_tuned else
        "thresholds not tuned (not glibc, STREAMD_MALLOPT=0, or MALLOC_* set in the environment).")]
    out += ["", f"### Latency: {live['streams']} live streams at {live['fps']:g} FPS", "",
            f"Playback realtime, loop, {live['seconds']:g} s, same clip, same pass-through pipeline; "
            f"{live['measured']} result records measured (the first second skipped). Capture = wall clock when the "
            f"decoder thread had the RGB frame (`capture_ts`); published = when its record was sent to Redis "
            f"(`publish_ts`). Event-loop lag: `Daemon.loop_lag_s` ({live['lag_samples']} samples, every 100 ms).",
            "",
            "| capture → published p50 | p99 | max | event-loop lag p99 | max |",
            "|--:|--:|--:|--:|--:|",
            f"| {live['p50_ms']:.1f} ms | {live['p99_ms']:.1f} ms | {live['max_ms']:.1f} ms | "
            f"{live['lag_p99_ms']:.1f} ms | {live['lag_max_ms']:.1f} ms |"]
    return "\n".join(out) + "\n"


def write_section(text: str, path: Path = RESULTS_MD) -> None:
    """Replace (or add) this run's section of RESULTS.md (its first line is the heading), keeping the others."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    head = text.split("\n", 1)[0]
    pat = re.compile(rf"^{re.escape(head)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: text + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


# -- main -------------------------------------------------------------------------------------------------------
async def amain(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.streams.split(",")]
    cache = ROOT / ".streamd" / "bench"
    paths, frames = clips(max(counts), args.seconds, 30, cache)
    tmp = Path(tempfile.mkdtemp(prefix="streamd-bench-"))
    srv = await asyncio.to_thread(ManagedRedis(tmp / "redis").start)
    other = OtherLoad(srv.proc.pid if srv.proc else None)
    try:
        print(f"{machine()}\nclip: {frames} frames 1280x720, streams {counts}, repeats {args.repeats}", flush=True)
        # warm-up: imports, page cache, decoder init
        baseline(paths[:1])
        await daemon_fast(srv.url, paths[:1], frames)
        runs: dict[int, dict[str, list[Any]]] = {
            n: {"base": [], "tuned": [], "daemon": [], "lag": [], "base_cpu": [], "tuned_cpu": [], "daemon_cpu": [],
                "other": []} for n in counts}
        for rep in range(args.repeats):
            for n in counts:
                sub = paths[:n]
                order = ("base", "tuned", "daemon")[rep % 3:] + ("base", "tuned", "daemon")[:rep % 3]
                others = []

                async def measure(what: str, n: int = n, sub: list[Path] = sub) -> int:
                    """One side of the repeat; returns the frames it handled."""
                    c0, r0 = cpu_s(), cpu_s(srv.proc.pid if srv.proc else None)
                    if what in ("base", "tuned"):
                        got, dt = baseline(sub, tuned=what == "tuned")
                        if got != n * frames:
                            raise RuntimeError(f"baseline decoded {got} frames, expected {n * frames}")
                        runs[n][what].append(got / dt)
                        runs[n][f"{what}_cpu"].append((cpu_s() - c0) / got * 1000.0)
                    else:
                        got, dt, lags = await daemon_fast(srv.url, sub, n * frames)
                        r1 = cpu_s(srv.proc.pid if srv.proc else None)
                        runs[n]["daemon"].append(got / dt)
                        runs[n]["daemon_cpu"].append((cpu_s() - c0 + r1 - r0) / got * 1000.0)
                        runs[n]["lag"].append(float(np.percentile(np.array(lags) * 1000, 99)) if lags else 0.0)
                    return got

                for what in order:
                    ol = OtherLoad(srv.proc.pid if srv.proc else None)
                    tc_cm = ThreadCpu(thread_group) if args.threads else contextlib.nullcontext()
                    with tc_cm as tc:
                        got = await measure(what)
                    if tc is not None:
                        for g, sec in tc.groups().items():
                            runs[n].setdefault(f"{what}_thr_{g}", []).append(sec / got * 1e6)
                    others.append(ol.cores())
                runs[n]["other"].append(max(others))
                print(f"  run {rep + 1} N={n}: baseline {runs[n]['base'][-1]:7.1f} f/s "
                      f"({runs[n]['base_cpu'][-1]:.2f} CPU ms/frame)   tuned {runs[n]['tuned'][-1]:7.1f} f/s "
                      f"({runs[n]['tuned_cpu'][-1]:.2f})   daemon {runs[n]['daemon'][-1]:7.1f} f/s "
                      f"({runs[n]['daemon_cpu'][-1]:.2f} CPU ms/frame)   other load {max(others):.2f} cores",
                      flush=True)
                if args.threads:
                    print("        CPU us/frame by thread: " + "   ".join(
                        f"{what} " + " ".join(f"{g} {runs[n][f'{what}_thr_{g}'][-1]:.0f}"
                                              for g in ("loop", "decoder", "ffmpeg") if f"{what}_thr_{g}" in runs[n])
                        for what in ("tuned", "daemon")), flush=True)
        rows = []
        print(f"\n{'streams':>7} {'PyAV->RGB f/s':>14} {'daemon f/s':>11} {'ratio':>6} {'(median)':>8} "
              f"{'tuned f/s':>10} {'ratio':>6} {'CPU ms/frame PyAV':>18} {'tuned':>6} {'daemon':>7} "
              f"{'loop lag p99':>13} {'quiet runs':>11}")
        for n in counts:
            r = runs[n]
            # a repeat counts when other processes left the box alone during both its halves; when none did, all do
            quiet = [i for i, o in enumerate(r["other"]) if o <= QUIET_CORES]
            use = quiet or list(range(len(r["other"])))
            b, dm, tb = (max(r[k][i] for i in use) for k in ("base", "daemon", "tuned"))
            kept = f"{len(quiet)}/{len(r['other'])}" if quiet else f"none quiet, all {len(use)} kept"
            row = {"n": n, "base_fps": b, "daemon_fps": dm, "ratio": dm / b, "runs_used": kept,
                   "median_ratio": statistics.median(r["daemon"][i] / r["base"][i] for i in use),
                   "tuned_fps": tb, "tuned_ratio": dm / tb,
                   "tuned_median_ratio": statistics.median(r["daemon"][i] / r["tuned"][i] for i in use),
                   "tuned_cpu_ms": statistics.median(r["tuned_cpu"][i] for i in use),
                   "base_cpu_ms": statistics.median(r["base_cpu"][i] for i in use),
                   "daemon_cpu_ms": statistics.median(r["daemon_cpu"][i] for i in use),
                   "fast_lag_p99_ms": statistics.median(r["lag"][i] for i in use)}
            rows.append(row)
            flag = "" if row["ratio"] >= TARGET_RATIO else f"  below target {TARGET_RATIO:.2f}"
            print(f"{n:>7} {b:>14.1f} {dm:>11.1f} {row['ratio']:>6.2f} {row['median_ratio']:>8.2f} "
                  f"{tb:>10.1f} {row['tuned_ratio']:>6.2f} "
                  f"{row['base_cpu_ms']:>18.2f} {row['tuned_cpu_ms']:>6.2f} {row['daemon_cpu_ms']:>7.2f} "
                  f"{row['fast_lag_p99_ms']:>10.1f} ms "
                  f"{row['runs_used']:>6}{flag}",
                  flush=True)

        print(f"\nlatency: 8 streams, realtime, loop, fps 2, {args.latency_s:g} s ...", flush=True)
        live = await daemon_live(srv.url, paths[0], 8, args.latency_s, 2.0)
        print(f"capture->published p50 {live['p50_ms']:.1f} ms  p99 {live['p99_ms']:.1f} ms  "
              f"max {live['max_ms']:.1f} ms  ({live['measured']} records)")
        print(f"event-loop lag p99 {live['lag_p99_ms']:.1f} ms  max {live['lag_max_ms']:.1f} ms  "
              f"({live['lag_samples']} samples)")
        busy = other.cores()
    finally:
        await asyncio.to_thread(srv.stop)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"other processes used {busy:.2f} cores on average during the benchmark"
          + ("  (the box was not quiet: frames/s are noisy, CPU ms/frame much less so)" if busy > 0.15 else ""))
    md = markdown(args, rows, live, frames, busy)
    print("\n----- markdown -----\n" + md + "--------------------")
    if args.write:
        write_section(md)
        print(f"wrote {RESULTS_MD.relative_to(ROOT)}")
    met = all(r["ratio"] >= TARGET_RATIO for r in rows)
    print(f"target ratio >= {TARGET_RATIO:.2f}: {'met' if met else 'NOT met'}")
    return 1 if args.check and not met else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 s clip, one repeat, 10 s of latency")
    ap.add_argument("--streams", default="1,4,8", help="stream counts (default 1,4,8)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of each measurement (default 5)")
    ap.add_argument("--seconds", type=float, default=None, help="clip length in seconds (default 10)")
    ap.add_argument("--latency-s", type=float, default=None, help="latency run length (default 20)")
    ap.add_argument("--threads", action="store_true", help="also print CPU per frame by thread group (event loop, "
                    "Python decoder threads, FFmpeg's threads) for tuned PyAV and the daemon, each run")
    ap.add_argument("--check", action="store_true", help="exit 1 when a ratio is below the target")
    ap.add_argument("--write", action="store_true", help=f"rewrite the '{SECTION[3:]}' section of RESULTS.md")
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.seconds = args.seconds or (5.0 if args.quick else 10.0)
    args.latency_s = args.latency_s or (10.0 if args.quick else 20.0)
    setup_logging("warning", "console")
    args.malloc_tuned = tune_malloc()  # what every Daemon does at startup; process-wide, so set before anything runs
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

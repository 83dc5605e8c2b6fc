"""Density benchmark (issue 18): how many live 720p30 H.264 cameras one daemon sustains, decoding everything
(`decode: all`) against decoding what the sampler needs (`decode: auto`), in one run.

    .venv/bin/python benchmarks/density.py            # both scenarios, both modes, thread budget (~20 minutes)
    .venv/bin/python benchmarks/density.py --quick    # shorter steps
    .venv/bin/python benchmarks/density.py --write    # also rewrite the "Density" section of benchmarks/RESULTS.md

Cameras: a 10 s 720p30 H.264 clip (a pan over a real photo, no B-frames, a keyframe every `gop` frames exactly)
looped in real time (`playback: realtime, loop: true`), one stream per camera, a pass-through pipeline (one
`frame_info` stage) publishing to a real redis-server. Scenarios: fps 1 with a 1 s GOP (auto decodes keyframes),
fps 2 with a 2 s GOP (auto decodes each GOP up to its last due frame). For each (scenario, mode) the number of
streams grows (STEPS) until a step does not keep up, then the gap between the last step that did and the first that
did not is halved twice (bisection). A step (streamd/bench.py `run_step`, what `streamd bench` runs) keeps up when
no frame was dropped by a queue, capture -> publish p99 <= 1 s and every stream's PTS advanced at >= 90 % of the
wall clock between its first and last record of the window. CPU per sampled frame: CPU time of this process and the
redis-server over the window / records published, at the largest step kept up and at a common FIXED_N streams.
Thread budget: CPU and memory at THREADS_N keyframe-mode streams with 1, 2 and 3 FFmpeg threads per stream, and at
THREADS_N / 2 auto streams (fps 2, 2 s GOP) with 1 and 3, twice, alternating.
RTSP subset (where Debian's GStreamer RTSP server is installed): RTSP_N streams of one 720p30 RTSP camera stand-in
(videotestsrc, x264 ultrafast, a keyframe at most every 30 frames, one shared encoder on this same machine), fps 1,
both modes: whether they keep up and CPU per sampled frame (the server's own CPU not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import OtherLoad, cpu_model, revision  # noqa: E402
from spine import write_section  # noqa: E402
from streamd.bench import Step, run_step  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.memory import tune_malloc  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from streamd.testing.servers import RtspServer  # noqa: E402

SECTION = "## Density: decode only what the sampler needs (issue 18)"
STEPS = {"all": [4, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128],
         "auto": [8, 16, 32, 48, 64, 80, 96, 128, 160, 192, 256]}
SCENARIOS = [(1.0, 30), (2.0, 60)]  # (fps, GOP in frames at 30 fps)
FIXED_N = 16
THREADS_N = 48
RTSP_N = (16, 32)
P99_MS = 1000.0


def clip(gop: int, cache: Path) -> Path:
    p = cache / f"cam_1280x720_30fps_gop{gop}_10s.mp4"
    if not p.exists():
        print(f"making {p.name} ...", flush=True)
        make_pan_clip(p, seconds=10, fps=30, size=(1280, 720), gop=gop)
    return p


def config(redis_url: str, path: Path, n: int, fps: float, decode: str, threads: int = 0) -> Any:
    streams = [{"id": f"cam{i}", "url": str(path), "fps": fps, "playback": "realtime", "loop": True,
                "decode": decode, "decode_threads": threads, "pipeline": "passthrough"} for i in range(n)]
    return parse_config({"redis": {"url": redis_url}, "shutdown": {"grace_s": 5}, "streams": streams,
                         "pipelines": {"passthrough": {"stages": [{"type": "frame_info"}]}}}, environ={})


class Runner:
    async def rtsp(self, url: str, n: int, decode: str) -> Step:
        streams = [{"id": f"rtsp{i}", "url": url, "fps": 1.0, "decode": decode, "pipeline": "passthrough"}
                   for i in range(n)]
        cfg = parse_config({"redis": {"url": self.srv.url}, "shutdown": {"grace_s": 5}, "streams": streams,
                            "pipelines": {"passthrough": {"stages": [{"type": "frame_info"}]}}}, environ={})
        s = await run_step(cfg, self.srv.proc.pid if self.srv.proc else None, self.args.seconds, self.args.warmup,
                           P99_MS)
        print(f"    rtsp {decode:>9} N={n:>3}: {'keeps up' if s.keeps_up else 'NO':>8}  p99 {s.p99_ms} ms  pace "
              f"{s.min_rate:.2f}  CPU {s.cpu_cores:.2f} cores  {s.cpu_ms_per_frame} ms/frame  {s.why}", flush=True)
        return s

    def __init__(self, srv: ManagedRedis, args: argparse.Namespace):
        self.srv, self.args = srv, args

    async def step(self, path: Path, n: int, fps: float, decode: str, threads: int = 0) -> Step:
        cfg = config(self.srv.url, path, n, fps, decode, threads)
        other = OtherLoad(self.srv.proc.pid if self.srv.proc else None)
        s = await run_step(cfg, self.srv.proc.pid if self.srv.proc else None, self.args.seconds, self.args.warmup,
                           P99_MS)
        s.other_cores = other.cores()  # type: ignore[attr-defined]
        print(f"    {decode:>9} fps {fps:g} N={n:>3} threads {threads}: {'keeps up' if s.keeps_up else 'NO':>8}  "
              f"p99 {s.p99_ms} ms  pace {s.min_rate:.2f}  drops {s.dropped}  CPU {s.cpu_cores:.2f} cores  "
              f"{s.cpu_ms_per_frame} ms/frame  RSS {s.rss_mb_per_stream} MB/stream  other load "
              f"{s.other_cores:.2f} cores  {s.why}", flush=True)  # type: ignore[attr-defined]
        return s

    async def largest(self, path: Path, fps: float, decode: str) -> tuple[int, Step | None, list[Step]]:
        """Grow through STEPS until a step fails, then bisect twice between the last pass and the first fail."""
        tried: list[Step] = []
        good: Step | None = None
        bad: int | None = None
        for n in STEPS[decode]:
            s = await self.step(path, n, fps, decode)
            tried.append(s)
            if not s.keeps_up:
                bad = n
                break
            good = s
        lo = good.streams if good else 0
        for _ in range(2):
            if bad is None or bad - lo <= 2:
                break
            mid = (lo + bad) // 2
            s = await self.step(path, mid, fps, decode)
            tried.append(s)
            if s.keeps_up:
                good, lo = s, mid
            else:
                bad = mid
        return lo, good, tried


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU; Python {platform.python_version()}, PyAV {av.__version__}"


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], threads: list[tuple[str, int, Step]],
             rtsp: list[tuple[str, Step]], other: float, load: str) -> str:
    cmd = ".venv/bin/python benchmarks/density.py" + (" --quick" if args.quick else "")
    out = [SECTION, "",
           f"Command: `{cmd}`. streamd at {revision()}. Machine: {machine()}; the 2 cores were shared with other "
           f"agents' work while it ran: other processes used {other:.2f} cores on average ({load}). Run "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
           "Live 720p30 H.264 cameras (a 10 s clip looped in real time per stream, no B-frames, a keyframe every "
           "GOP exactly), pass-through pipeline (`frame_info`), results to a real redis-server. A step keeps up: "
           "no frame dropped by a queue, capture -> publish p99 <= 1 s, every stream's PTS advancing >= 90 % as "
           f"fast as the wall clock. Steps: {args.warmup:g} s warm-up, {args.seconds:g} s measured; streams grow "
           "until a step fails, then two bisections. CPU ms per sampled frame: CPU of the daemon process (all "
           "threads) and redis-server over the window / records published.", "",
           "| fps | GOP | decode | largest N kept up | mode auto chose | CPU ms / sampled frame at that N | "
           f"CPU ms / sampled frame at {FIXED_N} streams | CPU cores at {FIXED_N} | MB RSS / stream | first N "
           "that failed (why) |",
           "|--:|--:|:--|--:|:--|--:|--:|--:|--:|:--|"]
    for r in rows:
        out.append(f"| {r['fps']:g} | {r['gop_s']:g} s | {r['decode']} | **{r['n']}** | {r['chose']} | "
                   f"{_f(r['good_ms'])} | {_f(r['fixed'].cpu_ms_per_frame)} | {r['fixed'].cpu_cores:.2f} | "
                   f"{r['good_rss']} | {r['fail']} |")
    out += ["", "Thread budget: FFmpeg threads per stream (`decode_threads`; 3 is what FFmpeg picks by itself on "
            "2 cores), measured back to back:", "",
            "| streams, scenario | threads | keeps up | CPU cores | CPU ms / sampled frame | MB RSS / stream | p99 ms |",
            "|:--|--:|:-:|--:|--:|--:|--:|"]
    for what, t, s in threads:
        out.append(f"| {s.streams}, {what} | {t} | {'yes' if s.keeps_up else 'no'} | {s.cpu_cores:.2f} | "
                   f"{_f(s.cpu_ms_per_frame)} | {s.rss_mb_per_stream} | {s.p99_ms} |")
    if rtsp:
        out += ["", "RTSP subset: streams of one 720p30 RTSP camera stand-in (GStreamer, x264 ultrafast, a keyframe at "
                "most every 30 frames, its encoder on the same 2 cores), fps 1:", "",
                "| streams | decode | keeps up | p99 ms | CPU cores | CPU ms / sampled frame |", "|--:|:--|:-:|--:|--:|--:|"]
        for decode, s in rtsp:
            out.append(f"| {s.streams} | {decode} | {'yes' if s.keeps_up else 'no (' + s.why + ')'} | {s.p99_ms} | "
                       f"{s.cpu_cores:.2f} | {_f(s.cpu_ms_per_frame)} |")
    return "\n".join(out) + "\n"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


async def amain(args: argparse.Namespace) -> int:
    cache = ROOT / ".streamd" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="streamd-density-"))
    srv = await asyncio.to_thread(ManagedRedis(tmp / "redis").start)
    other = OtherLoad(srv.proc.pid if srv.proc else None)
    load0 = os.getloadavg()[0]
    run = Runner(srv, args)
    rows: list[dict[str, Any]] = []
    threads: list[tuple[str, int, Step]] = []
    rtsp: list[tuple[str, Step]] = []
    try:
        print(machine(), flush=True)
        for fps, gop in SCENARIOS:
            if args.only_fps and fps != args.only_fps:
                continue
            path = clip(gop, cache)
            for decode in ("all", "auto"):
                print(f"fps {fps:g}, GOP {gop / 30:g} s, decode {decode}:", flush=True)
                n, good, tried = await run.largest(path, fps, decode)
                fixed = next((s for s in tried if s.streams == FIXED_N), None) or await run.step(path, FIXED_N,
                                                                                              fps, decode)
                failed = [s for s in tried if not s.keeps_up]
                chose = "-" if decode == "all" else ("keyframes" if fps * gop / 30 <= 1 else "gop (mixed)")
                rows.append({"fps": fps, "gop_s": gop / 30, "decode": decode, "n": n, "chose": chose,
                             "good_ms": good.cpu_ms_per_frame if good else None,
                             "good_rss": good.rss_mb_per_stream if good else "-", "fixed": fixed,
                             "fail": f"{min(s.streams for s in failed)} ({failed[-1].why})" if failed else "none"})
        if not args.no_threads:
            print("thread budget:", flush=True)
            for t in (1, 2, 3):
                threads.append(("fps 1, GOP 1 s, keyframes", t,
                                await run.step(clip(30, cache), THREADS_N, 1.0, "keyframes", t)))
            for t in (1, 3, 1, 3):
                threads.append(("fps 2, GOP 2 s, auto", t, await run.step(clip(60, cache), THREADS_N // 2, 2.0, "auto",
                                                                           t)))
        if not args.no_rtsp and RtspServer.available():
            cam = RtspServer(size=(1280, 720)).start()
            try:
                print("RTSP subset:", flush=True)
                for n in RTSP_N:
                    for decode in ("all", "auto"):
                        rtsp.append((decode, await run.rtsp(cam.url, n, decode)))
            finally:
                cam.stop()
        busy = other.cores()
    finally:
        await asyncio.to_thread(srv.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    load = f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    md = markdown(args, rows, threads, rtsp, busy, load)
    print("\n----- markdown -----\n" + md + "--------------------")
    if args.write:
        write_section(md)
        print("wrote benchmarks/RESULTS.md")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 s measured per step, 3 s warm-up")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per step (default 12)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per step (default 4)")
    ap.add_argument("--only-fps", type=float, default=None, help="run one scenario (1 or 2)")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-budget measurement")
    ap.add_argument("--no-rtsp", action="store_true", help="skip the RTSP subset")
    ap.add_argument("--write", action="store_true", help=f"rewrite the '{SECTION[3:]}' section of RESULTS.md")
    args = ap.parse_args()
    args.seconds = args.seconds or (8.0 if args.quick else 12.0)
    args.warmup = args.warmup or (3.0 if args.quick else 4.0)
    setup_logging("warning", "console")
    tune_malloc()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

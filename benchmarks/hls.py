"""HLS: streamd's own HLS follower (streamd/sources/hls.py: playlists parsed by streamd, every fetch through the
egress policy, segment bytes handed to PyAV) against FFmpeg's HLS demuxer (PyAV `av.open(url)`) on the same
playlist served over HTTP on loopback. Both decode every frame to RGB (one converter per stream on both sides),
N streams at once; the ratio is streamd's frames/s over FFmpeg's (target >= 0.95), CPU per frame side by side.
streamd's side runs as in the daemon: glibc's malloc thresholds set (streamd.memory, process-wide, so the FFmpeg
side has them too) and one ticking Doorbell shared by the streams' queues. `--threads` adds CPU per frame by thread.
The test server answers HTTP/1.1 with keep-alive, as HLS origins and CDNs do, so both sides may reuse connections
(FFmpeg's demuxer: `http_persistent`; streamd: its egress session's pool); `--no-keep-alive` serves HTTP/1.0, one
connection per request, on both sides.

    .venv/bin/python benchmarks/hls.py --streams 1,8 --repeats 3 [--threads] [--no-keep-alive] [--hold N] [--sws-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import OtherLoad, ThreadCpu, cpu_model, revision  # noqa: E402

from streamd.batching import FRAME_BUSY_RATE, FRAME_TICK_S, Doorbell, FrameQueue  # noqa: E402
from streamd.config import DropPolicy, StreamConfig  # noqa: E402
from streamd.egress import EgressRules, StreamEgress  # noqa: E402
from streamd.memory import tune_malloc  # noqa: E402
from streamd.sampling import FpsSampler  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from streamd.sources import parse_reference  # noqa: E402
from streamd.sources.hls import HlsSource  # noqa: E402
from streamd.testing.servers import HttpDir  # noqa: E402

TARGET = 0.95
QUEUE = 8  # the stream queue (StreamConfig.queue_size default)


def make_playlist(root: Path, seconds: int) -> int:
    clip = root / "pan.mp4"
    make_pan_clip(clip, seconds=seconds, fps=30, size=(1280, 720), gop=30)
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip),
                    "-an", "-c", "copy", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0",
                    "-hls_playlist_type", "vod", str(root / "index.m3u8")], check=True)
    with av.open(str(clip)) as c:
        return sum(1 for _ in c.demux(c.streams.video[0]) if _.size)


def thread_group(name: str) -> str:
    """`--threads`: which part of the work a thread of this process does."""
    if name.startswith("hls-") or name.endswith("(one)"):
        return "decoder threads (Python: demux, decode, convert, hand-off)"
    if name == "MainThread":
        return "event loop (streamd: fetching, hand-off, taking frames)"
    if name.startswith("av:"):
        return "FFmpeg's frame threads"
    if "serve_forever" in name or "process_request" in name or name.startswith("Thread-"):
        return "the test HTTP server (both sides)"
    return "other native threads (swscale's, ...)"


def ffmpeg_side(url: str, n: int, hold: int = 0, sws_threads: int | None = None) -> tuple[int, float]:
    out = [0] * n

    def one(i: int) -> None:
        rgb = VideoReformatter()
        held: collections.deque = collections.deque(maxlen=max(hold, 1))
        with av.open(url, timeout=10) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            for vf in c.decode(st):
                image = rgb.reformat(vf, format="rgb24", threads=sws_threads).to_ndarray()
                if hold:  # `--hold`: the last frames stay alive, as in a stream queue
                    held.append(image)
                out[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out), time.perf_counter() - t0


async def streamd_side(url: str, n: int) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    rules = EgressRules(deny_non_global=False, requests_per_s=1000, request_burst=1000)
    counts = [0] * n
    doorbell = Doorbell(loop, FRAME_TICK_S, FRAME_BUSY_RATE)  # one for all streams, as the daemon has

    async def one(i: int) -> None:
        cfg = StreamConfig(id=f"b{i}", url=url, fps=None, drop_policy=DropPolicy.WAIT)
        q: FrameQueue = FrameQueue(QUEUE, DropPolicy.WAIT, loop, doorbell=doorbell)
        eg = StreamEgress(rules, cfg.id)
        src = HlsSource(cfg, parse_reference(url), FpsSampler(None), itertools.count(), q, loop, eg, {},
                        lambda *a: None)
        arrived = asyncio.Event()  # read as the pipeline's ingress reads a stream queue: woken on arrival
        q.add_listener(arrived)
        src.ended.add_done_callback(lambda _: arrived.set())
        while not (src.ended.done() and len(q) == 0):
            if q.get_nowait() is not None:
                counts[i] += 1
                continue
            arrived.clear()
            await arrived.wait()
        await src.aclose()
        await eg.aclose()
        src.ended.result()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return sum(counts), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--seconds", type=int, default=20, help="length of the served recording")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-keep-alive", action="store_true", help="serve HTTP/1.0: a new connection per request, "
                    "on both sides")
    ap.add_argument("--hold", type=int, default=0, help="diagnostic: FFmpeg's side keeps its last N RGB frames "
                    "alive, as streamd's stream queue does (the target is measured with 0)")
    ap.add_argument("--sws-threads", type=int, default=None, help="diagnostic: swscale threads of FFmpeg's side's "
                    "conversion (streamd converts with 1, streamd.sources.hls.SWS_THREADS; the target is measured "
                    "with PyAV's default, one per core)")
    ap.add_argument("--threads", action="store_true", help="also print CPU per frame by thread group (each side; "
                    "reading the threads costs a little CPU of its own)")
    args = ap.parse_args()
    # what every Daemon does at startup (streamd.memory); process-wide, so the FFmpeg side runs with it too
    tuned = tune_malloc()
    root = Path(tempfile.mkdtemp(prefix="streamd-hls-bench-"))
    frames = make_playlist(root, args.seconds)
    http = HttpDir(root, keep_alive=not args.no_keep_alive).start()
    url = http.url("index.m3u8")
    print(f"# HLS follower vs FFmpeg's HLS demuxer ({revision()}, {cpu_model()})")
    print(f"# recording: {args.seconds} s 1280x720 30 fps H.264, 1 s segments, {frames} frames, served on loopback "
          f"({'HTTP/1.0, a connection per request' if args.no_keep_alive else 'HTTP/1.1 keep-alive'}, both sides)")
    if args.hold:
        print(f"# diagnostic --hold {args.hold}: FFmpeg's side keeps its last {args.hold} frames alive per stream")
    if args.sws_threads is not None:
        print(f"# diagnostic --sws-threads {args.sws_threads}: FFmpeg's side converts with {args.sws_threads} swscale "
              "threads")
    print(f"# glibc malloc thresholds {'set as the daemon sets them' if tuned else 'not tuned'}; one Doorbell "
          f"(tick {FRAME_TICK_S * 1000:g} ms above {FRAME_BUSY_RATE:g} frames/s) for all streams, as in the daemon")
    print("| streams | FFmpeg HLS fps | streamd HLS fps | ratio | FFmpeg CPU ms/frame | streamd CPU ms/frame "
          "| other load (cores) |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    ok = True
    try:
        for n in [int(x) for x in args.streams.split(",")]:
            best: dict[str, tuple[float, float]] = {}
            ratios = []
            by_thread: dict[str, dict[str, float]] = {"ffmpeg": {}, "streamd": {}}
            for _ in range(args.repeats):
                pair = {}
                for side in ("ffmpeg", "streamd"):
                    load = OtherLoad()
                    with ThreadCpu(thread_group) if args.threads else contextlib.nullcontext() as tc:
                        got, secs = ffmpeg_side(url, n, args.hold, args.sws_threads) if side == "ffmpeg" else asyncio.run(streamd_side(url, n))
                    for g, cpu in (tc.groups() if tc is not None else {}).items():
                        by_thread[side][g] = by_thread[side].get(g, 0.0) + cpu / got / args.repeats
                    if got != frames * n:
                        raise SystemExit(f"{side}: {got} frames, expected {frames * n}")
                    pair[side] = (got / secs, load.cpu() / got * 1000, load.cores())
                    if side not in best or pair[side][0] > best[side][0]:
                        best[side] = pair[side]
                ratios.append(pair["streamd"][0] / pair["ffmpeg"][0])
            ratio = best["streamd"][0] / best["ffmpeg"][0]
            ok = ok and ratio >= TARGET
            ratios.sort()
            print(f"| {n} | {best['ffmpeg'][0]:.0f} | {best['streamd'][0]:.0f} | **{ratio:.2f}** (paired median "
                  f"{ratios[len(ratios) // 2]:.2f}) | {best['ffmpeg'][1]:.2f} | {best['streamd'][1]:.2f} | "
                  f"{max(best['ffmpeg'][2], best['streamd'][2]):.2f} |", flush=True)
            if args.threads:
                groups = sorted(set(by_thread["ffmpeg"]) | set(by_thread["streamd"]))
                print(f"#   {n} streams, CPU us/frame by thread (mean of the repeats), FFmpeg / streamd: " + "; ".join(
                    f"{g} {by_thread['ffmpeg'].get(g, 0) * 1e6:.0f} / {by_thread['streamd'].get(g, 0) * 1e6:.0f}"
                    for g in groups), flush=True)
    finally:
        http.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"# target >= {TARGET}: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""streamd detect+track vs Ultralytics' own `model.track(source, stream=True)` loop: same clip, same model,
same device, same run. Prints frames/s of each and the ratio, for 1 and N streams.

    .venv/bin/python benchmarks/detect_track.py [--streams 1,4] [--seconds 6] [--fps 10] [--imgsz 640]
        [--runtimes auto,torch] [--ultralytics-formats pt,onnx]

Every frame of the clip is processed on both sides (streamd: `fps: null`, `playback: fast`). For several
streams, Ultralytics' best of (a) one loop per stream in turn and (b) one loop per stream in parallel threads
(each with its own model instance, as its trackers need) is the baseline.

On the CPU, Ultralytics sets torch's intra-op threads to the cores less one (it leaves one to data loading): on
2 cores its loop runs single-threaded inference. streamd's detector runs that many concurrent forward passes as
fit the cores; Ultralytics' baseline (b) uses them through its threads.

The model is the same .pt file on both sides. streamd runs it with each detect-stage `runtime` asked for: `auto`
(its default: ONNX Runtime on the CPU where installed, the weights exported once) and `torch` (PyTorch lanes).
Ultralytics runs the .pt file (the headline ratio) and, with `onnx` in --ultralytics-formats, the very ONNX file
streamd exported (a second ratio, both sides in ONNX Runtime).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamd.config import parse_config  # noqa: E402
from streamd.daemon import Daemon  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.models import resolve_model_path  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402


def ultralytics_loop(path: str, weights: str, imgsz: int, conf: float) -> int:
    from ultralytics import YOLO

    model = YOLO(weights, task="detect")
    n = 0
    for _ in model.track(source=path, stream=True, tracker="bytetrack.yaml", imgsz=imgsz, conf=conf, verbose=False):
        n += 1
    return n


def bench_ultralytics(paths: list[str], weights: str, imgsz: int, conf: float) -> tuple[float, str]:
    t0 = time.perf_counter()
    total = sum(ultralytics_loop(p, weights, imgsz, conf) for p in paths)
    seq = total / (time.perf_counter() - t0)
    if len(paths) == 1:
        return seq, "one loop"
    counts = [0] * len(paths)

    def run(i: int) -> None:
        counts[i] = ultralytics_loop(paths[i], weights, imgsz, conf)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    par = sum(counts) / (time.perf_counter() - t0)
    return (par, "a loop per stream, in parallel threads") if par > seq else (seq, "one loop per stream, in turn")


async def bench_streamd(paths: list[str], imgsz: int, conf: float, max_batch: int, redis_url: str,
                        runtime: str) -> tuple[float, str]:
    cfg = parse_config({
        "redis": {"url": redis_url, "results_maxlen": 100_000},
        "pipelines": {"dt": {"stages": [
            {"type": "detect", "model": "person", "imgsz": imgsz, "conf": conf, "max_batch": max_batch,
             "max_wait_ms": 5, "runtime": runtime},
            {"type": "track", "tracker": "bytetrack"}]}},
        "streams": [{"id": f"s{i}", "url": p, "fps": None, "pipeline": "dt", "queue_size": 8}
                    for i, p in enumerate(paths)],
    }, environ={})
    d = Daemon(cfg)
    await d.startup()
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await d.started.wait()
    p = d.pipelines["dt"]
    await p.ready.wait()
    t0 = time.perf_counter()
    while not all(r.state.value in ("stopped", "failed") for r in d.runners.values()):
        await asyncio.sleep(0.02)
    while sum(d.sink.results_by_stream.values()) < sum(r.frames for r in d.runners.values()) or len(d.sink):
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - t0
    frames = sum(d.sink.results_by_stream.values())
    assert all(r.state.value == "stopped" for r in d.runners.values()), d.status()
    (info,) = d.models.loaded()
    stop.set()
    await task
    await d.shutdown()
    return frames / wall, f"{info['runtime']}, {info['lanes']} lanes"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--conf", type=float, default=0.35)
    ap.add_argument("--max-batch", type=int, default=8, help="the detect stage's max_batch (its default)")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--runtimes", default="auto,torch", help="the detect stage's runtime values to run")
    ap.add_argument("--ultralytics-formats", default="pt,onnx",
                    help="pt: Ultralytics on the .pt file (the headline); onnx: on the ONNX file streamd exported")
    a = ap.parse_args()
    setup_logging("warning")
    import torch

    w, h = (int(x) for x in a.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="streamd-bench-"))
    clip = make_pan_clip(tmp / "pan.mp4", "zidane.jpg", seconds=a.seconds, fps=a.fps, size=(w, h))
    weights = resolve_model_path("person")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    print(f"clip: {w}x{h}, {a.seconds:g} s at {a.fps} fps ({int(a.seconds * a.fps)} frames); model: person "
          f"(YOLOv8, {weights}); imgsz {a.imgsz}; device {device}; torch threads {torch.get_num_threads()}")
    ultralytics_loop(str(clip), weights, a.imgsz, a.conf)  # warm caches on both sides
    formats = {"pt": weights}
    if "onnx" in a.ultralytics_formats.split(","):
        from streamd.stages.onnx_runtime import exported

        formats["onnx"] = str(exported(Path(weights), a.imgsz))  # the file streamd's auto runtime runs
        print(f"ONNX export (streamd's cache): {formats['onnx']}")
    formats = {f: formats[f] for f in a.ultralytics_formats.split(",")}
    runtimes = a.runtimes.split(",")
    rows = []
    with ManagedRedis(tmp / "redis") as redis:
        for n in (int(x) for x in a.streams.split(",")):
            paths = []
            for i in range(n):
                p = tmp / f"pan{i}.mp4"
                shutil.copy(clip, p)
                paths.append(str(p))
            base = {f: bench_ultralytics(paths, w_, a.imgsz, a.conf) for f, w_ in formats.items()}
            for f, (fps, how) in base.items():
                print(f"{n} stream(s): ultralytics on .{f}: {fps:.2f} fps ({how})", flush=True)
            for rt in runtimes:
                ours, what = asyncio.run(bench_streamd(paths, a.imgsz, a.conf, a.max_batch, redis.url, rt))
                print(f"{n} stream(s): streamd runtime {rt} ({what}): {ours:.2f} fps, ratios "
                      + ", ".join(f"{ours / fps:.2f} vs .{f}" for f, (fps, _) in base.items()), flush=True)
                rows.append((n, rt, what, ours, base))
    head = " | ".join(f"Ultralytics on .{f} (frames/s) | ratio" for f in formats)
    print(f"\n| streams | streamd runtime | streamd detect+track (frames/s) | {head} |")
    print("|---|---|--:|" + "--:|--:|" * len(formats))
    for n, rt, what, ours, base in rows:
        cells = " | ".join(f"{fps:.2f} ({how}) | **{ours / fps:.2f}**" for fps, how in base.values())
        print(f"| {n} | {rt} ({what}) | {ours:.2f} | {cells} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

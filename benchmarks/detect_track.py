"""streamd detect+track vs Ultralytics' own `model.track(source, stream=True)` loop: same clip, same model,
same device, same run. Prints frames/s of each and the ratio, for 1 and N streams.

    .venv/bin/python benchmarks/detect_track.py [--streams 1,4] [--seconds 6] [--fps 10] [--imgsz 640]
        [--runtimes auto,torch] [--ultralytics-formats pt,onnx]

Neither side's set-up is measured: Ultralytics' clock starts once every loop has loaded its model, set its
predictor up and tracked its first frame; streamd's once every stream has its first result published; frames/s
counts the frames after that.

Each is measured `--repeats` times, interleaved (this box's speed drifts with other tenants' load); the table
gives the best of the repeats and the median of the paired ratios. Every frame of the clip is processed on both sides (streamd: `fps: null`, `playback: fast`). For several
streams, Ultralytics' best of (a) one loop per stream in turn and (b) one loop per stream in parallel threads
(each with its own model instance, as its trackers need) is the baseline (both tried in the first repeat, the
winner in the others).

On the CPU, Ultralytics sets torch's intra-op threads to the cores less one (it leaves one to data loading): on
2 cores its loop runs single-threaded inference. streamd's detector runs that many concurrent forward passes as
fit the cores; Ultralytics' baseline (b) uses them through its threads.

The model is the same .pt file on both sides. streamd runs it with each detect-stage `runtime` asked for: `auto`
(its default: ONNX Runtime on the CPU where installed, the weights exported once) and `torch` (PyTorch lanes).
Ultralytics runs the .pt file (the headline ratio) and, with `onnx` in --ultralytics-formats, the very ONNX file
streamd exported (a second ratio, both sides in ONNX Runtime).

The bare forward rate (`--bare-s`, per streamd runtime, interleaved with the rest) is the ceiling: the model's
forward passes alone, flat out, on the clip's first frame already letterboxed, with no decode, NMS, tracking or
publishing. On the CPU: streamd's own lanes for that runtime, each in a thread, one frame per pass. On CUDA:
batches of `--max-batch` frames through Ultralytics' backend (fp16 with RUNTIME:half). streamd's frames/s against
it says how much of the device the rest of the pipeline leaves to detection; the bare rate against Ultralytics'
says what ratio the forward pass alone allows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import OtherLoad, cpu_model, revision  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.models import resolve_model_path  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from streamd.stages.detector import Params, SharedDetector  # noqa: E402
from streamd.testing.daemon import running  # noqa: E402
from ultralytics.data.augment import LetterBox  # noqa: E402
from ultralytics.utils.checks import check_imgsz  # noqa: E402


def ultralytics_loop(path: str, weights: str, imgsz: int, conf: float,
                     started: threading.Barrier | None = None) -> tuple[int, float, float]:
    """Ultralytics' own loop over one clip. Returns (frames after the first, when the first one was done, when the
    last one was): the model load, the predictor's set-up and the first frame are not measured (as streamd's are
    not: its clock starts once every stream has its first result). With `started`, the measured part starts when
    every loop sharing the barrier (and the caller) is set up."""
    from ultralytics import YOLO

    with _SETUP:  # one loop at a time sets its predictor up (Python 3.11's ast.parse, which Ultralytics' ONNX
        # backend calls on the model's metadata, can fail with "AST constructor recursion depth mismatch" when
        # two threads parse at once); the first frame is predicted inside the lock, the rest run in parallel
        model = YOLO(weights, task="detect")
        frames = model.track(source=path, stream=True, tracker="bytetrack.yaml", imgsz=imgsz, conf=conf,
                             verbose=False)
        next(frames)
    t_first = time.perf_counter()
    if started is not None:
        started.wait()
    n = 0
    for _ in frames:
        n += 1
    return n, t_first, time.perf_counter()


_SETUP = threading.Lock()
SEQ, PAR = "one loop per stream, in turn", "a loop per stream, in parallel threads"


def bench_ultralytics(paths: list[str], weights: str, imgsz: int, conf: float,
                      modes: tuple[str, ...] = (SEQ, PAR)) -> tuple[float, str]:
    """Ultralytics' frames/s over all streams: the better of `modes` (one stream: one loop)."""
    if len(paths) == 1:
        modes = (SEQ,)
    best = (0.0, "")
    if SEQ in modes:
        runs = [ultralytics_loop(p, weights, imgsz, conf) for p in paths]
        best = (sum(n for n, _, _ in runs) / sum(end - first for _, first, end in runs),
                SEQ if len(paths) > 1 else "one loop")
    if PAR in modes:
        results: list[tuple[int, float, float]] = [(0, 0.0, 0.0)] * len(paths)
        started = threading.Barrier(len(paths) + 1, timeout=600)  # a loop that fails breaks it

        def run(i: int) -> None:
            results[i] = ultralytics_loop(paths[i], weights, imgsz, conf, started)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
        for t in threads:
            t.start()
        started.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        best = max(best, (sum(n for n, _, _ in results) / (max(end for _, _, end in results) - t0), PAR))
    return best


async def bench_streamd(paths: list[str], imgsz: int, conf: float, max_batch: int, redis_url: str,
                        runtime: str, lanes: int | None = None) -> tuple[float, str]:
    cfg = parse_config({
        "redis": {"url": redis_url, "results_maxlen": 100_000},
        "pipelines": {"dt": {"stages": [
            {"type": "detect", "model": "person", "imgsz": imgsz, "conf": conf, "max_batch": max_batch,
             "forward_batch": max_batch,
             "max_wait_ms": 5, "runtime": runtime.split(":")[0], "lanes": lanes,
             "half": runtime.endswith(":half")},
            {"type": "track", "tracker": "bytetrack"}]}},
        "streams": [{"id": f"s{i}", "url": p, "fps": None, "pipeline": "dt", "queue_size": 8}
                    for i, p in enumerate(paths)],
    }, environ={})
    async with running(cfg) as d:
        await d.pipelines["dt"].ready.wait()  # the model loaded (and, the first time, exported)
        # the clock starts once every stream has its first result (Ultralytics' loops: once every one has its first
        # frame), so neither side's set-up is measured
        while len(d.sink.results_by_stream) < len(paths) or not all(d.sink.results_by_stream.values()):
            if any(r.state.value == "failed" for r in d.streams.runners.values()):
                raise RuntimeError(f"a stream failed: {d.streams.status()}")
            await asyncio.sleep(0.005)
        t0, n0 = time.perf_counter(), sum(d.sink.results_by_stream.values())
        while not all(r.state.value in ("stopped", "failed") for r in d.streams.runners.values()):
            await asyncio.sleep(0.02)
        while sum(d.sink.results_by_stream.values()) < sum(r.frames for r in d.streams.runners.values()) or len(d.sink):
            await asyncio.sleep(0.01)
        wall = time.perf_counter() - t0
        frames = sum(d.sink.results_by_stream.values()) - n0
        assert all(r.state.value == "stopped" for r in d.streams.runners.values()), d.streams.status()
        (info,) = d.models.loaded()
    return frames / wall, f"{info['runtime']}, {info['lanes']} lanes, {info['precision']}"


def bare_forward(frame: np.ndarray, imgsz: int, conf: float, runtime: str, max_batch: int,
                 seconds: float) -> tuple[float, str]:
    """Frames/s of the model's forward passes alone, flat out (see the module docstring), and what ran them: the
    CPU lanes, or (CUDA, or a model without CPU lanes) batches of `max_batch` through Ultralytics' backend."""
    import torch

    from streamd.models import load_yolo

    half = runtime.endswith(":half")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    det = SharedDetector(load_yolo("person"), "person", device, max_batch, runtime.split(":")[0])
    p = Params(conf, 0.7, imgsz, 300, half, None, None, False)
    lanes = det._cpu_lanes(p) if device == "cpu" else []  # noqa: SLF001 - the very lanes the detect stage runs
    if lanes:
        x = np.stack([LetterBox(check_imgsz(imgsz, stride=lanes[0].stride, min_dim=2), auto=True,
                                stride=lanes[0].stride)(image=frame)])
        counts = [0] * len(lanes)
        stop = [0.0]

        def loop(i: int) -> None:
            with torch.inference_mode():
                while time.perf_counter() < stop[0]:
                    lanes[i]._forward(x)  # noqa: SLF001
                    counts[i] += 1

        for lane in lanes:
            lane._forward(x)  # noqa: SLF001 - warm
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(lanes))]
        t0 = time.perf_counter()
        stop[0] = t0 + seconds
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - t0), f"{det.runtime}, {len(lanes)} lanes, {det.precision}"
    det.model.predict(np.ascontiguousarray(frame[..., ::-1]), **det._predict_args(p))  # noqa: SLF001 - builds it
    backend = det.model.predictor.model
    h, w = LetterBox(check_imgsz(imgsz, stride=backend.stride, min_dim=2), auto=True,
                     stride=backend.stride)(image=frame).shape[:2]
    im = torch.rand(max_batch, 3, h, w, device=backend.device, dtype=torch.float16 if half else torch.float32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            backend(im)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() < t0 + seconds:
            backend(im)
            n += max_batch
        sync()
    return n / (time.perf_counter() - t0), f"Ultralytics backend, batch {max_batch}, {'fp16' if half else 'fp32'}"


def first_frame(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--conf", type=float, default=0.35)
    ap.add_argument("--max-batch", type=int, default=8, help="the detect stage's max_batch (its default)")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--runtimes", default="auto,torch", help="the detect stage's runtime values to run; "
                    "RUNTIME:half also sets half (bfloat16 on a CPU that has it)")
    ap.add_argument("--ultralytics-formats", default="pt,onnx",
                    help="pt: Ultralytics on the .pt file (the headline); onnx: on the ONNX file streamd exported")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each, interleaved")
    ap.add_argument("--bare-s", type=float, default=10.0, help="seconds of each bare forward-rate measurement "
                    "(0: none)")
    a = ap.parse_args()
    setup_logging("warning")
    import torch

    w, h = (int(x) for x in a.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="streamd-bench-"))
    clip = make_pan_clip(tmp / "pan.mp4", "zidane.jpg", seconds=a.seconds, fps=a.fps, size=(w, h))
    weights = resolve_model_path("person")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    print(f"streamd {revision()}; {os.cpu_count()} cores ({cpu_model()}); clip: {w}x{h}, {a.seconds:g} s at "
          f"{a.fps} fps ({int(a.seconds * a.fps)} frames); model: person (YOLOv8, {weights}); imgsz {a.imgsz}; "
          f"device {device}; {a.repeats} repeats, interleaved")
    ultralytics_loop(str(clip), weights, a.imgsz, a.conf)  # warm caches on both sides
    formats = {"pt": weights}
    if "onnx" in a.ultralytics_formats.split(","):
        from streamd.stages.onnx_runtime import exported

        formats["onnx"] = str(exported(Path(weights), a.imgsz))  # the file streamd's auto runtime runs
        print(f"ONNX export (streamd's cache): {formats['onnx']}")
    formats = {f: formats[f] for f in a.ultralytics_formats.split(",")}
    runtimes = a.runtimes.split(",")
    frame = first_frame(clip)
    table = []
    with ManagedRedis(tmp / "redis") as redis:
        for n in (int(x) for x in a.streams.split(",")):
            paths = []
            for i in range(n):
                p = tmp / f"pan{i}.mp4"
                shutil.copy(clip, p)
                paths.append(str(p))
            runs: dict[str, list[tuple[float, str, float]]] = {}  # what -> [(frames/s, how, other cores)]
            for rep in range(a.repeats):
                for f, wf in formats.items():
                    load = OtherLoad(redis.proc.pid if redis.proc else None)
                    # both ways of running several streams the first time, then the one that won
                    won = {runs[f"ul:{f}"][0][1]} if rep else {SEQ, PAR}
                    fps, how = bench_ultralytics(paths, wf, a.imgsz, a.conf, tuple(won))
                    runs.setdefault(f"ul:{f}", []).append((fps, how, load.cores()))
                    print(f"[{rep + 1}/{a.repeats}] {n} stream(s): ultralytics on .{f}: {fps:.2f} fps ({how}); "
                          f"other load {load.cores():.2f} cores", flush=True)
                for rt in runtimes:
                    load = OtherLoad(redis.proc.pid if redis.proc else None)
                    fps, how = asyncio.run(bench_streamd(paths, a.imgsz, a.conf, a.max_batch, redis.url, rt))
                    runs.setdefault(f"sd:{rt}", []).append((fps, how, load.cores()))
                    print(f"[{rep + 1}/{a.repeats}] {n} stream(s): streamd runtime {rt} ({how}): {fps:.2f} fps; "
                          f"other load {load.cores():.2f} cores", flush=True)
                    if a.bare_s > 0:
                        load = OtherLoad(redis.proc.pid if redis.proc else None)
                        fps, how = bare_forward(frame, a.imgsz, a.conf, rt, a.max_batch, a.bare_s)
                        runs.setdefault(f"bare:{rt}", []).append((fps, how, load.cores()))
                        print(f"[{rep + 1}/{a.repeats}] bare forward passes, runtime {rt} ({how}): {fps:.2f} fps; "
                              f"other load {load.cores():.2f} cores", flush=True)
            for rt in runtimes:
                ours = runs[f"sd:{rt}"]
                best = max(ours)
                cells = []
                for f in formats:
                    base = runs[f"ul:{f}"]
                    b = max(base)
                    paired = statistics.median(o[0] / x[0] for o, x in zip(ours, base))
                    cells.append(f"{b[0]:.2f} ({b[1]}) | **{best[0] / b[0]:.2f}** ({paired:.2f})")
                if a.bare_s > 0:
                    bare = max(runs[f"bare:{rt}"])
                    base = max(runs[f"ul:{next(iter(formats))}"])
                    cells.append(f"{bare[0]:.2f} | {best[0] / bare[0]:.2f} | {bare[0] / base[0]:.2f}")
                other = max(x[2] for v in runs.values() for x in v)
                table.append(f"| {n} | {rt} ({best[1]}) | {best[0]:.2f} | " + " | ".join(cells) + f" | {other:.2f} |")
    head = " | ".join(f"Ultralytics on .{f} (frames/s) | ratio (median)" for f in formats)
    cols = len(formats) * 2
    if a.bare_s > 0:
        head += f" | bare forward (frames/s) | streamd / bare | bare / Ultralytics .{next(iter(formats))}"
        cols += 3
    print("\nframes/s: best of the repeats; ratio: best / best (in brackets: the median of the repeats' paired "
          "ratios); bare forward: the model's forward passes alone, flat out (the ceiling); other load: the most "
          "CPU other processes used during any repeat (cores)")
    print(f"\n| streams | streamd runtime | streamd detect+track (frames/s) | {head} | other load |")
    print("|---|---|--:|" + "--:|" * cols + "--:|")
    print("\n".join(table))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

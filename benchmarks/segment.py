"""The segment stage (SAM 2 online) against the sam2 package's own video predictor, frame by frame: same frames,
same objects (boxes on the first frame), same model config and image size, same device, same run.

    .venv/bin/python benchmarks/segment.py [--streams 1,4] [--objects 2] [--frames 20] [--image-size 256]
        [--repeats 2] [--rss-minutes 10] [--rss-streams 2] [--device cpu] [--isolate]

Frames: a pan over `zidane.jpg` (640x360, 10 fps), each stream starting elsewhere in the pan, written as JPEGs
(the predictor reads a folder of JPEGs) and read back, so both sides get the same pixels. Weights: random (no hub
here), seed 0; speed does not depend on the values.

- Baseline: `SAM2VideoPredictor` as its README shows it: `init_state(folder)` per stream (not timed: it loads and
  preprocesses every frame up front, which a live stream cannot do), `add_new_points_or_box` for each object on
  frame 0 and `propagate_in_video`, stepped one frame at a time (`next()`), the streams in turn; each frame's masks
  taken as boolean arrays (`masks > 0`, on the CPU).
- streamd: one `Segment` stage (checkpoint: random, track_source: null), the boxes given as API prompts, then per
  frame one stage batch holding that frame of every stream (as the pipeline's fan-in hands it over), records built
  whole: masks at the frame's size, COCO RLE, box, area, score, state.
- engine (with `--isolate`): streamd's SAM 2 engine alone (`Sam2Engine.step`, the model work of the stage, one frame
  of every stream per pass, memories pruned as the stage prunes them, masks at the frame's size), called in a plain
  loop: no stage, records, event loop or threads. It tells the model work from the stage's own cost.
Both after a warm-up of 3 frames. `--isolate` runs every side of every repeat in a fresh process (the sides in turn):
in one process the predictor's first repeat ran about 1.5x faster than its repeats after streamd's had run. `--repeats` runs, interleaved; frames/s is the best repeat, ratio best / best,
in brackets the median of the paired ratios; CPU ms per frame is process CPU time (all threads), median.

Memory: the stage's memory bank bytes and the predictor's inference state bytes after the timed frames, and with
`--rss-minutes` the process RSS while the stage follows `--objects` objects on `--rss-streams` streams for that
long (frames cycled; SAM 2's memory only sees new frame indices): growth from the first minute to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import OtherLoad, cpu_model, cpu_s, revision  # noqa: E402
from streamd.config import StageConfig  # noqa: E402
from streamd.frames import Frame, Work  # noqa: E402
from streamd.models import ModelManager  # noqa: E402
from streamd.models.memory import rss_bytes, trim_heap  # noqa: E402
from streamd.samples import load_photo, pan_frames  # noqa: E402
from streamd.stages import StageContext, build_stage  # noqa: E402

W, H = 640, 360
BOXES = [[300, 40, 460, 360], [60, 100, 200, 300], [470, 80, 620, 350], [200, 150, 300, 300]]
WARMUP = 3


def stream_frames(folder: Path, k: int, n: int) -> list[np.ndarray]:
    """Stream k's n frames, written to `folder` as JPEGs (the predictor's input) and read back."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pan = list(pan_frames(load_photo(), 37 * k + n, 10, (W, H)))[37 * k:]
    out = []
    for i, img in enumerate(pan):
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=95)
        out.append(np.asarray(Image.open(p).convert("RGB")))
    return out


def state_bytes(x: Any) -> int:
    import torch

    seen: set[int] = set()
    total, todo = 0, [x]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
        elif isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            total += v.numel() * v.element_size()
    return total


def baseline(model: Any, folders: list[Path], objects: int, n: int) -> dict[str, float]:
    """The predictor frame by frame, streams in turn. Returns frames/s, CPU ms per frame, state bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        states = [model.init_state(str(f)) for f in folders]  # not timed (loads every frame up front)
        gens = []
        for st in states:
            for k in range(objects):
                model.add_new_points_or_box(st, 0, k + 1, box=BOXES[k])
            gens.append(model.propagate_in_video(st))
        timed_from = None
        for i in range(n):
            if i == WARMUP:
                timed_from = (time.perf_counter(), cpu_s())
            for g in gens:
                _, _, masks = next(g)
                (masks[:, 0] > 0).cpu().numpy()
        t1, c1 = time.perf_counter(), cpu_s()
    assert timed_from is not None
    frames = (n - WARMUP) * len(folders)
    return {"fps": frames / (t1 - timed_from[0]), "cpu_ms": 1000 * (c1 - timed_from[1]) / frames,
            "state_bytes": sum(state_bytes(st["output_dict_per_obj"]) for st in states) / len(states)}


async def make_stage(models: ModelManager, image_size: int, device: str, objects: int) -> Any:
    # visible_score 0: every object stays followed for the whole run, whatever these random weights score
    cfg = StageConfig(type="segment", checkpoint="random", image_size=image_size, device=device, track_source=None,
                      max_objects=max(objects, 1), max_batch=64, visible_score=0.0)
    st = build_stage(cfg, "pipelines.bench.stages.0")
    st.bind(StageContext(models=models))
    await st.setup()
    return st


async def streamd_run(models: ModelManager, frames: list[list[np.ndarray]], objects: int, n: int,
                      image_size: int, device: str) -> dict[str, float]:
    st = await make_stage(models, image_size, device, objects)
    sids = [f"s{k}" for k in range(len(frames))]
    for sid in sids:
        for k in range(objects):
            st.add_prompt(sid, {"box": BOXES[k]})
    timed_from = None
    for i in range(n):
        if i == WARMUP:
            timed_from = (time.perf_counter(), cpu_s())
        batch = [Work(Frame(sid, i, i / 10, time.time(), fr[i])) for sid, fr in zip(sids, frames)]
        await st.process(batch)
        assert all(len(w.outputs["segment"]["objects"]) == objects for w in batch), batch[0].outputs
    t1, c1 = time.perf_counter(), cpu_s()
    assert timed_from is not None
    out = {"fps": (n - WARMUP) * len(sids) / (t1 - timed_from[0]),
           "cpu_ms": 1000 * (c1 - timed_from[1]) / ((n - WARMUP) * len(sids)),
           "state_bytes": statistics.mean(st.memory(s)["bytes"] for s in sids)}
    for sid in sids:
        st.forget_stream(sid)
    await st.teardown()
    return out


async def rss_run(models: ModelManager, frames: list[list[np.ndarray]], objects: int, minutes: float,
                  image_size: int, device: str) -> dict[str, Any]:
    st = await make_stage(models, image_size, device, objects)
    sids = [f"r{k}" for k in range(len(frames))]
    for sid in sids:
        for k in range(objects):
            st.add_prompt(sid, {"box": BOXES[k]})
    t0 = time.monotonic()
    samples: list[tuple[float, int, int]] = []
    i, next_sample = 0, 0.0
    while time.monotonic() - t0 < minutes * 60:
        batch = [Work(Frame(sid, i, i / 10, time.time(), fr[i % len(fr)])) for sid, fr in zip(sids, frames)]
        await st.process(batch)
        assert all(len(w.outputs["segment"]["objects"]) == objects for w in batch), batch[0].outputs
        i += 1
        el = time.monotonic() - t0
        if el >= next_sample:
            trim_heap()
            samples.append((el, rss_bytes(), sum(st.memory(s)["bytes"] for s in sids)))
            next_sample += 15.0
    after_1min = next((s for s in samples if s[0] >= min(60.0, minutes * 30)), samples[0])
    last = samples[-1]
    await st.teardown()
    return {"frames_per_stream": i, "rss_first_min": after_1min[1], "rss_end": last[1],
            "growth": (last[1] - after_1min[1]) / after_1min[1], "bank_first_min": after_1min[2],
            "bank_end": last[2], "samples": samples}


def engine_run(model: Any, frames: list[list[np.ndarray]], objects: int, n: int, device: str) -> dict[str, float]:
    """Sam2Engine.step in a plain loop, as the stage drives it (defaults of SegmentOptions), one frame per stream
    per pass; each frame's masks at the frame's size (what the stage's masks thread does, without RLE)."""
    from streamd.stages.segment.engine import FrameJob, ObjectStep, Sam2Engine
    from streamd.stages.segment.memory import Prompt, TrackedObject
    from streamd.stages.segment.stage import SegmentOptions
    from streamd.stages.segment.visibility import Visibility

    o = SegmentOptions()
    eng = Sam2Engine(model, "bench", device)
    objs = [[TrackedObject(k + 1, Visibility(0.0, o.lost_after_s)) for k in range(objects)] for _ in frames]
    timed_from = None
    for i in range(n):
        if i == WARMUP:
            timed_from = (time.perf_counter(), cpu_s())
        jobs = [FrameJob(i + 1, fr[i], [ObjectStep(ob, Prompt.from_box(BOXES[k]) if i == 0 else None)
                                        for k, ob in enumerate(obs)]) for fr, obs in zip(frames, objs)]
        outs = eng.step(jobs, o.memory_frames)
        spatial_from, pointers_from = eng.window(i + 2, o.memory_frames)
        for obs, fo in zip(objs, outs):
            for ob in obs:
                ob.prune(spatial_from, pointers_from, o.max_cond_frames)
            eng.frame_masks([x.low_res for x in fo.objects], H, W)
    t1, c1 = time.perf_counter(), cpu_s()
    assert timed_from is not None
    done = (n - WARMUP) * len(frames)
    return {"fps": done / (t1 - timed_from[0]), "cpu_ms": 1000 * (c1 - timed_from[1]) / done, "state_bytes": 0.0}


async def pipeline_run(a: argparse.Namespace) -> dict[str, Any]:
    """`--pipeline`: a real daemon (Redis, file streams, playback fast, every frame) running detect (the real
    person detector, runtime auto) + track (ByteTrack) + segment (SAM 2, prompted by the tracks) on `--streams`
    copies of a 1280x720 pan over zidane.jpg. frames/s over all streams once every stream has its first result;
    the torch threads of the device's executor (SAM 2's passes) at the end."""
    from streamd.config import parse_config
    from streamd.models.executors import device_executor
    from streamd.redis_server import ManagedRedis
    from streamd.samples import make_pan_clip
    from streamd.testing.daemon import running

    s = int(a.streams)
    tmp = Path(tempfile.mkdtemp(prefix="segpipe-"))
    clip = make_pan_clip(tmp / "pan.mp4", "zidane.jpg", seconds=a.seconds, fps=10, size=(1280, 720))
    with ManagedRedis(tmp / "redis") as redis:
        cfg = parse_config({
            "redis": {"url": redis.url, "results_maxlen": 100_000},
            "pipelines": {"ds": {"stages": [
                {"type": "detect", "model": "person", "imgsz": 640, "conf": 0.35, "max_batch": 8, "max_wait_ms": 5},
                {"type": "track", "tracker": "bytetrack"},
                {"type": "segment", "checkpoint": "random", "image_size": a.image_size, "device": a.device,
                 "visible_score": 0.0, "max_objects": a.objects}]}},
            "streams": [{"id": f"s{i}", "url": str(clip), "fps": None, "pipeline": "ds", "queue_size": 8}
                        for i in range(s)],
        }, environ={})
        async with running(cfg) as d:
            await d.pipelines["ds"].ready.wait()
            while len(d.sink.results_by_stream) < s or not all(d.sink.results_by_stream.values()):
                if any(r.state.value == "failed" for r in d.streams.runners.values()):
                    raise RuntimeError(f"a stream failed: {d.streams.status()}")
                await asyncio.sleep(0.005)
            t0, c0, n0 = time.perf_counter(), cpu_s(), sum(d.sink.results_by_stream.values())
            while not all(r.state.value in ("stopped", "failed") for r in d.streams.runners.values()):
                await asyncio.sleep(0.02)
            while sum(d.sink.results_by_stream.values()) < sum(r.frames for r in d.streams.runners.values()) \
                    or len(d.sink):
                await asyncio.sleep(0.01)
            wall, cpu = time.perf_counter() - t0, cpu_s() - c0
            frames = sum(d.sink.results_by_stream.values()) - n0
            assert all(r.state.value == "stopped" for r in d.streams.runners.values()), d.streams.status()
            import redis.asyncio as aioredis
            import torch

            from streamd import keys

            client = aioredis.from_url(redis.url)
            recs = [json.loads(f[b"record"]) for i in range(s) for _, f in await client.xrange(keys.results_key(f"s{i}"))]
            await client.aclose()
            objects = sum(len((r["outputs"].get("segment") or {}).get("objects", [])) for r in recs) / max(1, len(recs))

            threads = await asyncio.get_running_loop().run_in_executor(device_executor("cpu"), torch.get_num_threads)
    return {"fps": frames / wall, "cpu_ms": 1000 * cpu / frames, "objects_per_frame": objects,
            "executor_threads": threads}


async def one_side(a: argparse.Namespace) -> None:
    """`--only SIDE`: one repeat of one side in this process; prints its result as JSON."""
    import torch

    from streamd.stages.segment.model import build

    if a.only == "pipeline":
        print("RESULT " + json.dumps(await pipeline_run(a)), flush=True)
        return
    s = int(a.streams)
    tmp = Path(tempfile.mkdtemp(prefix="segbench-"))
    frames = [stream_frames(tmp / f"s{k}", k, a.frames) for k in range(s)]
    torch.manual_seed(0)
    if a.only == "streamd":
        models = ModelManager()
        out = await streamd_run(models, frames, a.objects, a.frames, a.image_size, a.device)
        await models.aclose()
    else:
        model = build("sam2.1-hiera-tiny", "random", a.device, a.image_size)
        out = (baseline(model, [tmp / f"s{k}" for k in range(s)], a.objects, a.frames) if a.only == "predictor"
               else engine_run(model, frames, a.objects, a.frames, a.device))
    print("RESULT " + json.dumps(out), flush=True)


def isolated(a: argparse.Namespace, side: str, s: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--only", side, "--streams", str(s), "--objects", str(a.objects), "--frames",
           str(a.frames), "--image-size", str(a.image_size), "--device", a.device]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_isolated(a: argparse.Namespace, counts: list[int]) -> None:
    print("| streams | predictor (frames/s) | streamd (frames/s) | ratio (median) | engine alone (frames/s) | "
          "engine / predictor | CPU ms/frame predictor | streamd | engine | other load (cores) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for s in counts:
        res: dict[str, list[dict[str, float]]] = {"predictor": [], "streamd": [], "engine": []}
        ol = OtherLoad(children=True)
        for _ in range(a.repeats):
            for side in res:
                res[side].append(isolated(a, side, s))
        best = {k: max(x["fps"] for x in v) for k, v in res.items()}
        paired = statistics.median(m["fps"] / b["fps"] for b, m in zip(res["predictor"], res["streamd"]))
        cpu = {k: statistics.median(x["cpu_ms"] for x in v) for k, v in res.items()}
        print(f"| {s} | {best['predictor']:.2f} | {best['streamd']:.2f} | **{best['streamd'] / best['predictor']:.2f}**"
              f" ({paired:.2f}) | {best['engine']:.2f} | {best['engine'] / best['predictor']:.2f} | "
              f"{cpu['predictor']:.0f} | {cpu['streamd']:.0f} | {cpu['engine']:.0f} | {ol.cores():.2f} |", flush=True)
        print(f"<!-- {s} streams, each repeat (predictor/streamd/engine frames/s): " + ", ".join(
            "/".join(f"{res[k][i]['fps']:.2f}" for k in res) for i in range(a.repeats)) + " -->", flush=True)


def run_pipeline(a: argparse.Namespace, counts: list[int]) -> None:
    print(f"# streamd {revision()}; {cpu_model()}, {os.cpu_count()} cores; detect (person, auto) + track + segment "
          f"(sam2.1-hiera-tiny, random, {a.image_size}); {a.seconds:g} s clip at 10 fps per stream")
    print("| streams | frames/s (each repeat) | best | CPU ms/frame (median) | SAM 2 objects per frame | executor torch "
          "threads | other load (cores) |")
    print("|--:|--|--:|--:|--:|--:|--:|")
    for s in counts:
        ol = OtherLoad(children=True)
        runs = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--only", "pipeline", "--streams", str(s), "--objects", str(a.objects),
                   "--seconds", str(a.seconds), "--image-size", str(a.image_size), "--device", a.device]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
            runs.append(json.loads(line[len("RESULT "):]))
        print(f"| {s} | {', '.join(format(x['fps'], '.2f') for x in runs)} | {max(x['fps'] for x in runs):.2f} | "
              f"{statistics.median(x['cpu_ms'] for x in runs):.0f} | {runs[-1]['objects_per_frame']:.2f} | "
              f"{runs[-1]['executor_threads']} | {ol.cores():.2f} |", flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-minutes", type=float, default=0.0)
    ap.add_argument("--rss-streams", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--isolate", action="store_true", help="each side of each repeat in a fresh process")
    ap.add_argument("--pipeline", action="store_true", help="detect + track + segment in a real daemon, each "
                    "repeat in a fresh process (frames/s of the pipeline)")
    ap.add_argument("--seconds", type=float, default=4.0, help="--pipeline: the clip's length (10 fps)")
    ap.add_argument("--only", choices=["predictor", "streamd", "engine", "pipeline"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only:
        return await one_side(a)
    import torch

    from streamd.stages.segment.model import build

    counts = [int(x) for x in a.streams.split(",")]
    if a.pipeline:
        return run_pipeline(a, counts)
    if a.isolate:
        return run_isolated(a, counts)
    tmp = Path(tempfile.mkdtemp(prefix="segbench-"))
    frames = [stream_frames(tmp / f"s{k}", k, a.frames) for k in range(max(counts + [a.rss_streams]))]
    torch.manual_seed(0)
    model = build("sam2.1-hiera-tiny", "random", a.device, a.image_size)
    models = ModelManager()
    print(f"# streamd {revision()}; {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); device {a.device}; sam2.1-hiera-tiny at {a.image_size}; "
          f"{a.objects} objects per stream; {a.frames} frames per stream ({WARMUP} warm-up)")
    print("| streams | predictor (frames/s) | streamd (frames/s) | ratio (median) | CPU ms/frame predictor | streamd "
          "| state per stream: predictor | streamd | other load (cores) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for s in counts:
        base, mine, load = [], [], []
        for _ in range(a.repeats):
            ol = OtherLoad()
            base.append(baseline(model, [tmp / f"s{k}" for k in range(s)], a.objects, a.frames))
            mine.append(await streamd_run(models, frames[:s], a.objects, a.frames, a.image_size, a.device))
            load.append(ol.cores())
        bf, mf = max(x["fps"] for x in base), max(x["fps"] for x in mine)
        paired = statistics.median(m["fps"] / b["fps"] for b, m in zip(base, mine))
        print(f"| {s} | {bf:.2f} | {mf:.2f} | **{mf / bf:.2f}** ({paired:.2f}) | "
              f"{statistics.median(x['cpu_ms'] for x in base):.0f} | {statistics.median(x['cpu_ms'] for x in mine):.0f}"
              f" | {mb(base[-1]['state_bytes'])} after {a.frames} frames | {mb(mine[-1]['state_bytes'])} | "
              f"{max(load):.2f} |", flush=True)
        print(f"<!-- {s} streams, each repeat (predictor, streamd frames/s): "
              + ", ".join(f"{b['fps']:.2f}/{m['fps']:.2f}" for b, m in zip(base, mine)) + " -->", flush=True)
    if a.rss_minutes > 0:
        ol = OtherLoad()
        r = await rss_run(models, frames[:a.rss_streams], a.objects, a.rss_minutes, a.image_size, a.device)
        print(f"\nRSS over {a.rss_minutes:g} min, {a.rss_streams} streams x {a.objects} objects, "
              f"{r['frames_per_stream']} frames per stream: {mb(r['rss_first_min'])} after the first minute, "
              f"{mb(r['rss_end'])} at the end: growth **{100 * r['growth']:+.2f} %**; memory bank "
              f"{mb(r['bank_first_min'])} -> {mb(r['bank_end'])}; other load {ol.cores():.2f} cores")
        print("samples (s, RSS MB, bank MB): " + ", ".join(f"{t:.0f}:{rss / 1e6:.0f}:{bank / 1e6:.1f}"
                                                            for t, rss, bank in r["samples"]))
    await models.aclose()


if __name__ == "__main__":
    asyncio.run(main())

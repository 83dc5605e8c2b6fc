"""Live model switch (issue 14): the largest gap between two consecutive results of a stream while a pipeline's
detect stage switches model, against the frame period; and the process's RSS after 20 load/unload cycles of the
same model.

    .venv/bin/python benchmarks/model_switch.py [--streams 3] [--fps 5] [--switches 6] [--imgsz 320]
        [--cycles 20] [--cycle-model yolo11m.yaml]

1. Gap. One daemon in this process (real redis-server, its control API), `--streams` looping 640x360 files
   played as live cameras at `--fps` (`drop_policy: wait`: nothing dropped), one pipeline: detect
   (yolo11n.yaml, declared as v11, PyTorch lanes) then frame_info. After a warm-up, the largest gap between consecutive results of
   a stream is measured over a quiet window (the baseline: what sampling, batching and publishing give without a
   switch), then `--switches` times the stage switches model through PATCH /api/v1/pipelines/sw, alternating
   v8 (yolov8n.yaml) and v11 (each a fresh load: the one switched away from unloads after keep_alive_s 1):
   the gap is measured over [PATCH sent - 0.5 s, PATCH answered + 1.5 s] on every stream. Every result is then
   checked: no seq missing, and per stream the model changes only at the switches. Target: no gap longer than 2
   frame periods.
2. RSS. A model manager of its own loads and unloads `--cycle-model` (80 MB of fp32 weights) `--cycles` times
   through POST/DELETE's own calls (`load`, `unload`); RSS after the first unload against after the last. Target:
   growth < 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from common import OtherLoad, cpu_model, revision  # noqa: E402

from streamd import keys  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from streamd.testing.daemon import running  # noqa: E402

MODELS = ("v11", "v8")  # declared (the API switches to declared models): yolo11n.yaml, yolov8n.yaml
CATALOG = {"v11": {"source": "yolo11n.yaml", "device": "cpu", "options": {"runtime": "torch"}},
           "v8": {"source": "yolov8n.yaml", "device": "cpu", "options": {"runtime": "torch"}}}


class FullCollections:
    """The interpreter's full (generation 2) garbage collections while it runs: (start, seconds). A full collection
    holds the GIL for the whole heap's traversal (0.2-0.3 s with torch loaded): every stream stalls meanwhile."""

    def __init__(self) -> None:
        self.done: list[tuple[float, float]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif info["generation"] == 2:
            dt = time.perf_counter() - self._t0
            self.done.append((time.time() - dt, dt))

    def within(self, t0: float, t1: float) -> float:
        return sum(dt for t, dt in self.done if t0 <= t <= t1)


async def records(r: aioredis.Redis, sid: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"record"]) for _, f in await r.xrange(keys.results_key(sid))]


def largest_gap(recs: list[dict[str, Any]], t0: float, t1: float) -> float:
    ts = [x["publish_ts"] for x in recs if t0 <= x["publish_ts"] <= t1]
    return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


async def gaps(args: argparse.Namespace, root: Path, srv: ManagedRedis) -> dict[str, Any]:
    clip = make_pan_clip(root / "pan.mp4", seconds=6, fps=30, size=(640, 360))
    ids = [f"cam-{i}" for i in range(args.streams)]
    pipe = {"stages": [{"type": "detect", "model": MODELS[0], "conf": 0.0, "imgsz": args.imgsz, "max_det": 10},
                       {"type": "frame_info"}]}
    cfg = parse_config({
        "redis": {"url": srv.url}, "api": {"enabled": True, "port": 0}, "models": {"keep_alive_s": 1.0, "catalog": CATALOG},
        "pipelines": {"sw": pipe},
        "streams": [{"id": i, "url": str(clip), "playback": "realtime", "loop": True, "fps": args.fps,
                     "drop_policy": "wait", "pipeline": "sw"} for i in ids]}, environ={})
    r = aioredis.Redis.from_url(srv.url)
    await r.flushall()
    windows: list[tuple[float, float, float, str]] = []  # (sent, answered, answer s, model)
    full = FullCollections()
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        while min([await r.xlen(keys.results_key(i)) for i in ids]) < 5:
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.warmup_s)
        base0 = time.time()
        await asyncio.sleep(args.baseline_s)
        base1 = time.time()
        load = OtherLoad(srv.proc.pid if getattr(srv, "proc", None) else None)
        for k in range(args.switches):
            model = MODELS[(k + 1) % 2]
            t0 = time.time()
            async with s.patch(d.api_url + "/api/v1/pipelines/sw", json={"stages": [{"stage": "detect",
                                                                                      "model": model}]}) as resp:
                body = await resp.json()
                assert resp.status == 200 and body["status"] == "switched", body
            t1 = time.time()
            windows.append((t0, t1, t1 - t0, model))
            await asyncio.sleep(args.between_s)
        other = load.cores()
    out: dict[str, Any] = {"baseline": 0.0, "switch": [], "missing": 0, "out_of_order": 0, "other_cores": other}
    by_stream = {sid: await records(r, sid) for sid in ids}
    for sid, recs in by_stream.items():
        seqs = [x["seq"] for x in recs]
        out["missing"] += len(set(range(seqs[-1] + 1)) - set(seqs))
        models = [x["outputs"]["detect"]["model"] for x in recs]
        changes = sum(1 for a, b in zip(models, models[1:]) if a != b)
        out["out_of_order"] += abs(changes - args.switches)  # the model changes once per switch, never back
        out["baseline"] = max(out["baseline"], largest_gap(recs, base0, base1))
    for t0, t1, took, model in windows:
        worst = max(largest_gap(recs, t0 - 0.5, t1 + 1.5) for recs in by_stream.values())
        out["switch"].append((model, took, worst, full.within(t0 - 0.5, t1 + 1.5)))
    out["baseline_gc"] = full.within(base0, base1)
    await r.aclose()
    return out


async def cycles(args: argparse.Namespace) -> tuple[list[int], dict[str, Any]]:
    from streamd.models import memory
    from streamd.models.manager import ModelManager
    from streamd.models.spec import ModelsConfig

    m = ModelManager(ModelsConfig.model_validate({"catalog": {"m": {"source": args.cycle_model,
                                                                    "device": "cpu"}}}))
    rss = []
    info: dict[str, Any] = {}
    try:
        for _ in range(args.cycles):
            e = await m.load("m")
            info = {"held": e.memory_bytes, "version": e.version}
            await m.unload("m")
            rss.append(memory.rss_bytes())
        info["loads"] = m.get_entry("m").loads
    finally:
        await m.aclose()
    return rss, info


async def main_async(args: argparse.Namespace) -> int:
    setup_logging("warning", "console")
    root = Path(tempfile.mkdtemp(prefix="streamd-switch-bench-"))
    srv = ManagedRedis(root / "redis").start()
    period_ms = 1000 / args.fps
    print(f"# model switch ({revision()}, {cpu_model()}, {os.cpu_count()} cores)")
    try:
        g = await gaps(args, root, srv)
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"## gap between consecutive results of a stream: {args.streams} streams at {args.fps:g} fps (period "
          f"{period_ms:.0f} ms), detect imgsz {args.imgsz}; other processes used {g['other_cores']:.2f} cores")
    print(f"baseline (no switch, {args.baseline_s:g} s): largest gap {g['baseline'] * 1000:.0f} ms "
          f"({g['baseline'] * 1000 / period_ms:.2f} periods); full garbage collections in it: "
          f"{g['baseline_gc'] * 1000:.0f} ms")
    print("| switch | to | PATCH answered in | largest gap | periods | full GC in the window |\n"
          "|--:|---|--:|--:|--:|--:|")
    for k, (model, took, worst, fgc) in enumerate(g["switch"], 1):
        print(f"| {k} | {model} | {took:.2f} s | {worst * 1000:.0f} ms | {worst * 1000 / period_ms:.2f} | "
              f"{fgc * 1000:.0f} ms |")
    worst = max(w for _, _, w, _ in g["switch"])
    print(f"largest gap during a switch: {worst * 1000:.0f} ms = {worst * 1000 / period_ms:.2f} periods; target <= "
          f"2: {'met' if worst * 1000 <= 2 * period_ms else 'NOT met'}; seq missing: {g['missing']}; model changes "
          f"other than the switches: {g['out_of_order']}")
    rss, info = await cycles(args)
    growth = (rss[-1] - rss[0]) / rss[0]
    print(f"## RSS after load/unload cycles of {args.cycle_model} ({info['loads']} loads; {info['held'] / 1e6:.1f} "
          "MB held while loaded)")
    print(f"after cycle 1: {rss[0] / 1e6:.1f} MB; after cycle {len(rss)}: {rss[-1] / 1e6:.1f} MB; growth "
          f"{growth * 100:+.2f} % (target < 5 %: {'met' if growth < 0.05 else 'NOT met'}); every cycle (MB): "
          + " ".join(f"{x / 1e6:.0f}" for x in rss))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--baseline-s", type=float, default=10.0)
    ap.add_argument("--between-s", type=float, default=4.0)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--cycle-model", default="yolo11m.yaml")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())

"""SSE fan-out (issue 16): what 50 clients of GET /api/v1/streams/{id}/results/live cost the daemon.

    .venv/bin/python benchmarks/sse.py [--clients 50] [--fps 5] [--seconds 20] [--repeats 2] [--pipeline default]

The daemon runs as its own process (`streamd run`, so its CPU time is its own: the clients run in this process),
with one stream: a 1280x720 pan over zidane.jpg played as a live camera (realtime, loop) at `--fps` through
`--pipeline` (default: the person detector and a tracker), the control API on loopback without tokens, a real
redis-server. Phases alternate `--repeats` times: no clients, then `--clients` SSE clients connected (all
connected before the window starts). Per phase: the daemon's CPU (user + system over the window, in cores), the
capture -> publish latency of the records published in the window (the daemon's own `publish_ts - capture_ts`: a
delay the clients cause shows up here), and with clients the delivery delay (a client's receive time minus the
record's `publish_ts`) over every client and record, and whether every client got every record once, in order.
Targets: clients add at most 10 % to the daemon's CPU, and the capture -> publish p99 with clients is at most 50 ms
above the one without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import yaml  # noqa: E402

from common import OtherLoad, cpu_model, cpu_s, revision  # noqa: E402
from streamd import keys  # noqa: E402
from streamd.api.results import id_key  # noqa: E402
from streamd.redis_server import ManagedRedis, free_port  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def client(url: str, got: list[tuple[str, float, float]], ready: asyncio.Event, stop: asyncio.Event,
                 n_ready: list[int], n: int) -> None:
    """One SSE client: every event's (id, publish_ts, receive time)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        async with s.get(url) as resp:
            assert resp.status == 200, resp.status
            n_ready[0] += 1
            if n_ready[0] == n:
                ready.set()
            eid = None
            while not stop.is_set():
                line = await resp.content.readline()
                if not line:
                    break
                if line.startswith(b"id: "):
                    eid = line[4:].strip().decode()
                elif line.startswith(b"data: "):
                    rec = json.loads(line[6:])
                    got.append((eid, rec["publish_ts"], time.time()))


async def phase(api: str, r: aioredis.Redis, pid: int, clients: int, seconds: float) -> dict:
    stop, ready = asyncio.Event(), asyncio.Event()
    gots: list[list[tuple[str, float, float]]] = [[] for _ in range(clients)]
    n_ready = [0]
    url = f"{api}/api/v1/streams/cam/results/live"
    tasks = [asyncio.create_task(client(url, gots[i], ready, stop, n_ready, clients)) for i in range(clients)]
    if clients:
        await asyncio.wait_for(ready.wait(), 30)
        await asyncio.sleep(1.0)  # each got its first (newest) record
    other = OtherLoad()
    c0, t0, w0 = cpu_s(pid), time.monotonic(), time.time()
    await asyncio.sleep(seconds)
    c1, t1, w1 = cpu_s(pid), time.monotonic(), time.time()
    await asyncio.sleep(1.0)  # the last records of the window reach the clients
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    entries = await r.xrange(keys.results_key("cam"), f"{int(w0 * 1000)}-0", f"{int(w1 * 1000)}-0")
    recs = [(e.decode(), json.loads(f[b"record"])) for e, f in entries]
    lat = [(rec["publish_ts"] - rec["capture_ts"]) * 1000 for _, rec in recs]
    window_ids = [eid for eid, _ in recs]
    # a client's events of the same entries (by entry id, as Redis chose them: a record published within a
    # millisecond of the window's edge gets an id on the other side of it)
    lo, hi = (id_key(window_ids[0]), id_key(window_ids[-1])) if window_ids else ((1, 0), (0, 0))
    delivery, complete = [], 0
    for got in gots:
        in_window = [g for g in got if g[0] is not None and lo <= id_key(g[0]) <= hi]
        delivery += [(recv - pub) * 1000 for _, pub, recv in in_window]
        complete += [g[0] for g in in_window] == window_ids
    cores = (c1 - c0) / (t1 - t0)
    return {"clients": clients, "cores": cores, "records": len(recs),
            "lat_p50": pct(lat, 50), "lat_p99": pct(lat, 99), "lat_max": max(lat, default=float("nan")),
            "delivery_p50": pct(delivery, 50), "delivery_p99": pct(delivery, 99),
            "delivery_max": max(delivery, default=float("nan")), "complete": complete,
            "other_cores": max(0.0, other.cores() - cores)}  # the daemon is a process of its own: not "other"


async def run(a: argparse.Namespace, tmp: Path) -> list[dict]:
    clip = make_pan_clip(tmp / "pan.mp4", "zidane.jpg", seconds=10, fps=30, size=(1280, 720))
    port = free_port()
    out: list[dict] = []
    with ManagedRedis(tmp / "redis") as redis:
        cfg = {"redis": {"url": redis.url},  # the clients connect at once: past the default burst of 100, 429s
               "api": {"enabled": True, "port": port, "rate_limit_burst": max(100, 2 * a.clients)},
               "log": {"level": "warning"},
               "streams": [{"id": "cam", "url": str(clip), "fps": a.fps, "playback": "realtime", "loop": True,
                            "pipeline": a.pipeline}]}
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "YOLO_OFFLINE": "1",
               "STREAMD_CACHE_DIR": os.environ.get("STREAMD_CACHE_DIR", str(ROOT / ".streamd" / "cache"))}
        proc = subprocess.Popen([sys.executable, "-m", "streamd", "run", "-c", str(tmp / "cfg.yaml")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = aioredis.Redis.from_url(redis.url)
        api = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while len(await r.xrange(keys.results_key("cam"), count=20)) < 20:  # models loaded, frames flowing
                assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            for _ in range(a.repeats):
                for n in (0, a.clients):
                    res = await phase(api, r, proc.pid, n, a.seconds)
                    print(f"  {n:>3} clients: {res['cores']:.3f} cores, {res['records']} records, capture->publish "
                          f"p99 {res['lat_p99']:.1f} ms, delivery p99 {res['delivery_p99']:.1f} ms, "
                          f"complete {res['complete']}/{n}, other load {res['other_cores']:.2f} cores", flush=True)
                    out.append(res)
        finally:
            proc.terminate()
            proc.wait(30)
            await r.aclose()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pipeline", default="default")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = asyncio.run(run(a, Path(d)))
    base = [x for x in res if x["clients"] == 0]
    fan = [x for x in res if x["clients"] == a.clients]

    # paired: each repeat's phase with clients against the phase without just before it (the box's other load drifts)
    d_cpu = [f["cores"] - b["cores"] for b, f in zip(base, fan)]
    d_p99 = [f["lat_p99"] - b["lat_p99"] for b, f in zip(base, fan)]
    cpu0, added_cores = float(np.median([x["cores"] for x in base])), float(np.median(d_cpu))
    added = added_cores / cpu0 * 100 if cpu0 else float("nan")
    per_event_us = added_cores / (a.fps * a.clients) * 1e6
    print(f"\nSSE fan-out, {a.clients} clients on one stream at {a.fps} fps, pipeline {a.pipeline}, "
          f"{a.seconds:.0f} s windows x {a.repeats}; {revision()}; {os.cpu_count()} cores ({cpu_model()})")
    print("| clients | daemon CPU (cores) | capture->publish p50 / p99 / max (ms) | delivery p50 / p99 / max (ms) | "
          "every record to every client | other load (cores) |")
    print("|--:|--:|--:|--:|:-:|--:|")
    for x in res:
        deliv = "-" if not x["clients"] else \
            f"{x['delivery_p50']:.1f} / {x['delivery_p99']:.1f} / {x['delivery_max']:.1f}"
        comp = "-" if not x["clients"] else f"{x['complete']}/{x['clients']}"
        print(f"| {x['clients']} | {x['cores']:.3f} | {x['lat_p50']:.1f} / {x['lat_p99']:.1f} / {x['lat_max']:.1f} | "
              f"{deliv} | {comp} | {x['other_cores']:.2f} |")
    print(f"\nCPU added by the clients (median of the paired differences): {added_cores:+.4f} cores = {added:+.1f} % "
          f"of the daemon's without them (target <= 10 %: {'met' if added <= 10 else 'missed'}); "
          f"{per_event_us:.0f} us of CPU per record delivered to one client")
    med = float(np.median(d_p99))
    print(f"capture->publish p99 with clients minus without (median of the paired differences): {med:+.1f} ms "
          f"(target <= 50 ms: {'met' if med <= 50 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fleet: Redis frame input through a pass-through pipeline, one daemon against two daemons sharing the input
through its consumer group, each daemon a `streamd run` process pinned to its own core (`taskset`). frames/s =
entries / (last result's publish_ts - first result's publish_ts): start-up is not timed. Target: two daemons >= 1.7x
one on a 2-core machine.

    .venv/bin/python benchmarks/fleet.py --frames 3000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import cpu_model, revision  # noqa: E402

from streamd import keys  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.testing.media import encode_jpeg  # noqa: E402

TARGET = 1.7


def push(r: redis.Redis, key: str, n: int) -> None:
    rng = np.random.default_rng(0)
    frames = [encode_jpeg(rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)) for _ in range(16)]
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, {"image": frames[i % 16], "ts": repr(time.time())})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def run(url: str, root: Path, daemons: int, n: int, tag: str) -> float:
    r = redis.Redis.from_url(url)
    key, sid = f"frames:bench:{tag}", f"bench-{tag}"
    r.delete(key, keys.results_key(sid), keys.events_key(sid))
    push(r, key, n)
    procs = []
    for i in range(daemons):
        cfg = {"redis": {"url": url, "consumer": f"bench-{i}"}, "log": {"level": "warning"},
               "streams": [{"id": sid, "url": f"redis:{key}", "pipeline": "frame_info",
                            "redis_input": {"read_count": 64}}]}
        f = root / f"{tag}-{i}.json"
        f.write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", "streamd", "run", "-c", str(f)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(i % (os.cpu_count() or 1)), *cmd]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 600
        while r.xlen(keys.results_key(sid)) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        recs = r.xrange(keys.results_key(sid))
        if len(recs) < n:
            raise SystemExit(f"{daemons} daemon(s): {len(recs)} results of {n}")
        ts = sorted(json.loads(f[b"record"])["publish_ts"] for _, f in recs)
        return (n - 1) / (ts[-1] - ts[0])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        r.delete(key, keys.results_key(sid), keys.events_key(sid))
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="streamd-fleet-bench-"))
    srv = ManagedRedis(root / "redis").start()
    print(f"# fleet: Redis frame input, pass-through pipeline ({revision()}, {cpu_model()}, {os.cpu_count()} cores)")
    print(f"# {args.frames} JPEG entries of 640x360 per run; each daemon pinned to its own core")
    best: dict[int, float] = {}
    ratios = []
    try:
        for rep in range(args.repeats):
            pair = {}
            for n in (1, 2):
                pair[n] = run(srv.url, root, n, args.frames, f"{rep}-{n}")
                best[n] = max(best.get(n, 0.0), pair[n])
                print(f"repeat {rep + 1}: {n} daemon(s) {pair[n]:.0f} frames/s", flush=True)
            ratios.append(pair[2] / pair[1])
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    ratio = best[2] / best[1]
    ratios.sort()
    print("| daemons | frames/s (best) |\n|--:|--:|")
    for n in (1, 2):
        print(f"| {n} | {best[n]:.0f} |")
    print(f"ratio 2 / 1: {ratio:.2f} (paired median {ratios[len(ratios) // 2]:.2f}); target >= {TARGET}: "
          f"{'met' if ratio >= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Loop CPU per result record in the Redis sink (issue 18, "the daemon's own cost per frame").

    .venv/bin/python benchmarks/sink_record.py [--batch 12] [--no-store]

Synthetic works (720p frames, 4 streams, a `frame_info`-like output) go through `RedisSink.publish_results` (the
record, the frame store's add) and the sink's own send (JSON, packing, the round trip to a real redis-server, the
replies, metrics), `--batch` works per call; the figure is the event-loop thread's CPU time per record (median of
9 rounds of 6,000 records), warm and without decoders beside it. It is for A/B runs between two commits (run each
copy's own script alternately under the benchmark lock); the spine benchmark is what the daemon's ratio is.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamd.config import RedisConfig  # noqa: E402
from streamd.frame_store import FrameStore  # noqa: E402
from streamd.frames import Frame, Work  # noqa: E402
from streamd.metrics import Metrics  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.sinks.redis import RedisSink  # noqa: E402


async def amain(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="streamd-sinkbench-"))
    srv = await asyncio.to_thread(ManagedRedis(tmp / "redis").start)
    client = aioredis.Redis.from_url(srv.url)
    sink = RedisSink(client, RedisConfig(url=srv.url), Metrics())
    if not args.no_store:
        sink.frames = FrameStore()
    task = asyncio.create_task(sink.run())
    images = [np.zeros((720, 1280, 3), np.uint8) for _ in range(12)]
    seq, rounds = 0, []
    try:
        for _ in range(args.rounds):
            n, c0 = 0, time.thread_time()
            while n < args.records:
                works = []
                for _ in range(args.batch):
                    seq += 1
                    f = Frame(f"s{seq % 4}", seq, seq / 30, time.time(), images[seq % 12])
                    works.append(Work(f, outputs={"frame_info": {"width": 1280, "height": 720,
                                                                 "mean_brightness": 12.345}},
                                      timings_ms={"queue": 1.234, "frame_info": 0.123}))
                await sink.publish_results(works)
                n += args.batch
                await asyncio.sleep(0)
            await sink.wait_idle()
            rounds.append((time.thread_time() - c0) / n * 1e6)
    finally:
        task.cancel()
        await client.aclose()
        await sink.aclose()
        await asyncio.to_thread(srv.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"batch {args.batch}, frame store {'off' if args.no_store else 'on'}: loop CPU "
          f"{statistics.median(rounds):.1f} us/record (rounds: {', '.join(f'{x:.1f}' for x in rounds)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=12, help="works per publish_results call (default 12)")
    ap.add_argument("--records", type=int, default=6000, help="records per round (default 6000)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    ap.add_argument("--no-store", action="store_true", help="no frame store")
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    main()

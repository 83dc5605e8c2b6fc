"""`streamd bench`: how many copies of one stream this machine carries with a pipeline.

The stream (a config's stream, or a URL and a pipeline) is replicated N times in growing steps. Each copy plays a
short recording made of the source (its video packets copied, not re-encoded), looped in real time like a camera;
a file is played as it is; `direct` opens the source itself N times (where it allows several readers). Each step
runs a real daemon (an embedded redis-server) for `warmup_s + seconds` and measures, over the last `seconds`:
result records against what the sampling rate asks for, frames dropped by the queues, capture -> publish latency,
CPU (this process and the redis-server), memory and, where `nvidia-smi` answers, GPU use. A step keeps up when no
frame was dropped, p99 latency is within `p99_ms` and every copy kept pace with its source (its records' PTS advance
at least `MIN_RATE` as fast as the wall clock: a decoder that falls behind a real-time source shows there first).
The largest N that keeps up is the answer; the steps stop at the first one that does not.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from streamd import keys
from streamd.config import Config, StreamConfig, parse_config
from streamd.errors import ConfigError
from streamd.memory import trim_heap
from streamd.sources import parse_reference

MIN_RATE = 0.9  # a copy whose source time advances slower than this share of the wall clock does not keep up
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Step:
    streams: int
    keeps_up: bool
    why: str  # what failed ("" when it keeps up)
    records: int
    due: float  # records the sampling rate asks for in the window (all copies)
    min_rate: float  # the slowest copy: source time advanced / wall time, between its first and last record
    dropped: int
    p50_ms: float | None
    p99_ms: float | None
    cpu_cores: float  # CPU used (this process + redis-server) / window
    cpu_per_stream: float  # cores per copy
    cpu_ms_per_frame: float | None
    rss_mb: float
    rss_mb_per_stream: float
    gpu_util_pct: float | None
    gpu_mem_mb: float | None


def template(cfg: Config, stream_id: str | None) -> StreamConfig:
    """The stream to replicate: `stream_id`, or the config's only (first) stream."""
    if not cfg.streams:
        raise ConfigError("streams", "the config has no stream to replicate (or give --url)")
    if stream_id is None:
        return cfg.streams[0]
    for s in cfg.streams:
        if s.id == stream_id:
            return s
    raise ConfigError("streams", f"no stream {stream_id!r} in the config")


def record(url: str, dst: Path, seconds: float, options: dict[str, str], timeout_s: float = 10.0) -> Path:
    """Copy `seconds` of the source's video packets (no re-encoding) into an MPEG-TS file, from a keyframe."""
    import av

    dst.parent.mkdir(parents=True, exist_ok=True)
    with av.open(url, options=options, timeout=timeout_s) as src, av.open(str(dst), "w", format="mpegts") as out:
        if not src.streams.video:
            raise ConfigError("url", "the source has no video stream")
        ins = src.streams.video[0]
        outs = out.add_stream_from_template(ins)
        start = None
        for p in src.demux(ins):
            if p.dts is None or (start is None and not p.is_keyframe):
                continue
            t = float(p.dts * ins.time_base)
            start = t if start is None else start
            if t - start >= seconds:
                break
            p.stream = outs
            out.mux(p)
    return dst


def copies(cfg: Config, tpl: StreamConfig, url: str, n: int, direct: bool, redis_url: str) -> Config:
    """The config of one step: `n` copies of `tpl` reading `url` (a recording looped in real time unless
    `direct`), the daemon's Redis at `redis_url`, no API, no fleet."""
    data = cfg.model_dump(mode="json", exclude={"streams", "api", "fleet"})
    data["redis"] = {**data["redis"], "url": redis_url, "cluster": False}
    one = tpl.model_dump(mode="json")
    if not direct:
        one.update(url=url, playback="realtime", loop=True)
    data["streams"] = [{**one, "id": f"bench-{i}"} for i in range(n)]
    return parse_config(data, environ={})


def _cpu_s(pid: int | None = None) -> float:
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _gpu() -> tuple[float | None, float | None]:
    """GPU utilisation (%) and memory used (MiB) of the first GPU, where nvidia-smi answers."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None
    try:
        out = subprocess.run([exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.splitlines()[0]
        util, mem = (float(x) for x in out.split(","))
        return util, mem
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None, None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


async def run_step(cfg: Config, redis_pid: int | None, seconds: float, warmup_s: float, p99_ms: float,
                   tick: Callable[[], None] | None = None) -> Step:
    """Run the daemon of one step (a config from `copies`) and measure it. Memory: the process's RSS at the end of
    the window over its RSS before the step, the heap's free memory given back first (what earlier steps left)."""
    import redis.asyncio as aioredis

    from streamd.daemon import Daemon

    n = len(cfg.streams)
    client = aioredis.Redis.from_url(cfg.redis.url or "")
    await client.flushall()
    trim_heap()
    rss0 = rss_mb()
    d = Daemon(cfg)
    await d.startup()
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await d.started.wait()
        for _ in range(int(warmup_s)):
            await asyncio.sleep(1)
            tick and tick()
        t0, c0, r0 = time.time(), _cpu_s(), _cpu_s(redis_pid)
        drops0 = sum(r.drops.total for r in d.streams.runners.values())
        for _ in range(int(seconds)):
            await asyncio.sleep(1)
            tick and tick()
        t1, c1, r1 = time.time(), _cpu_s(), _cpu_s(redis_pid)
        dropped = sum(r.drops.total for r in d.streams.runners.values()) - drops0
        rss = rss_mb() - rss0
        gpu_util, gpu_mem = _gpu()
    finally:
        stop.set()
        await task
        await d.shutdown()
    window = t1 - t0
    lat: list[float] = []
    rates: list[float] = []
    records = 0
    fps = cfg.streams[0].fps
    for s in cfg.streams:
        got: list[tuple[float, float]] = []
        for _, f in await client.xrange(keys.results_key(s.id), min=f"{int(t0 * 1000)}-0", max=f"{int(t1 * 1000)}-0"):
            rec = json.loads(f[b"record"])
            got.append((rec["pts_s"], rec["capture_ts"]))
            lat.append((rec["publish_ts"] - rec["capture_ts"]) * 1000.0)
        records += len(got)
        # keeping up with the source: its timestamps advance as fast as the wall clock between the first and the
        # last record (a decoder that falls behind a real-time source publishes frames further and further apart)
        wall = got[-1][1] - got[0][1] if len(got) > 1 else 0.0
        rates.append(min(1.0, (got[-1][0] - got[0][0]) / wall) if wall > 0 else 1.0 if got else 0.0)
    await client.aclose()
    cpu = (c1 - c0 + r1 - r0) / window
    p99 = _pct(lat, 99)
    min_rate = min(rates) if rates else 1.0
    why = ("frames dropped by the queues" if dropped else
           f"p99 latency {p99:.0f} ms over {p99_ms:g} ms" if p99 is not None and p99 > p99_ms else
           f"a copy fell behind its source ({min_rate:.0%} of real time)" if min_rate < MIN_RATE else
           "no result published" if not records else "")
    return Step(streams=n, keeps_up=not why, why=why, records=records, due=(fps or 0) * window * n,
                min_rate=round(min_rate, 3), dropped=dropped, p50_ms=_round(_pct(lat, 50)), p99_ms=_round(p99),
                cpu_cores=round(cpu, 3), cpu_per_stream=round(cpu / n, 4),
                cpu_ms_per_frame=_round(cpu * window * 1000 / records if records else None, 3),
                rss_mb=round(rss, 1), rss_mb_per_stream=round(rss / n, 2), gpu_util_pct=gpu_util,
                gpu_mem_mb=gpu_mem)


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


async def bench(cfg: Config, tpl: StreamConfig, steps: list[int], *, seconds: float = 20, warmup_s: float = 5,
                p99_ms: float = 1000, direct: bool = False, record_s: float = 10,
                progress: bool = True) -> dict[str, Any]:
    """Replicate `tpl` N times for each N of `steps` (growing) until a step does not keep up."""
    from streamd.redis_server import ManagedRedis

    ref = parse_reference(tpl.url)
    if ref.kind == "redis":
        raise ConfigError("url", "streamd bench replicates PyAV sources (cameras, HLS, files), not Redis inputs")
    tmp = Path(tempfile.mkdtemp(prefix="streamd-bench-"))
    url = ref.url
    if ref.kind != "file" and not direct:
        if ref.kind == "hls":
            raise ConfigError("url", "an HLS source is not recorded: use --direct (it allows many readers)")
        url = str(await asyncio.to_thread(record, ref.url, tmp / "recording.ts", record_s,
                                          {"rtsp_transport": "tcp"} if ref.kind == "rtsp" else {},
                                          tpl.open_timeout_s))
    srv = await asyncio.to_thread(ManagedRedis(tmp / "redis").start)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps) * int(seconds + warmup_s), unit="s", desc="bench", leave=False)
    done: list[Step] = []
    try:
        for n in sorted(set(steps)):
            if bar is not None:
                bar.set_description(f"{n} streams")
            step_cfg = copies(cfg, tpl, url, n, direct, srv.url)
            step = await run_step(step_cfg, srv.proc.pid if srv.proc else None, seconds, warmup_s, p99_ms,
                                  bar.update if bar is not None else None)
            done.append(step)
            if not step.keeps_up:
                break
    finally:
        if bar is not None:
            bar.close()
        await asyncio.to_thread(srv.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    best = max((s.streams for s in done if s.keeps_up), default=0)
    return {"stream": tpl.id, "url_kind": ref.kind, "replicated": "source" if direct or ref.kind == "file"
            else "recording", "pipeline": tpl.pipeline, "fps": tpl.fps, "decode": tpl.decode.value,
            "seconds": seconds, "p99_bound_ms": p99_ms, "max_streams": best, "steps": [asdict(s) for s in done]}


def table(report: dict[str, Any]) -> str:
    head = (f"{'streams':>7} {'keeps up':>8} {'records':>8} {'pace':>8} {'dropped':>7} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'CPU cores':>9} {'CPU/stream':>10} {'ms/frame':>8} {'MB/stream':>9} {'GPU %':>6}")
    lines = [head]
    for s in report["steps"]:
        lines.append(f"{s['streams']:>7} {'yes' if s['keeps_up'] else 'no':>8} {s['records']:>8} "
                     f"{s['min_rate']:>8.2f} {s['dropped']:>7} {_f(s['p50_ms']):>7} {_f(s['p99_ms']):>7} "
                     f"{s['cpu_cores']:>9.2f} {s['cpu_per_stream']:>10.3f} {_f(s['cpu_ms_per_frame'], 2):>8} "
                     f"{s['rss_mb_per_stream']:>9.1f} {_f(s['gpu_util_pct']):>6}" + (f"  ({s['why']})" if s['why']
                                                                                      else ""))
    lines.append(f"largest number of copies that keeps up: {report['max_streams']} "
                 f"(pipeline {report['pipeline']}, fps {report['fps']}, decode {report['decode']}, "
                 f"p99 <= {report['p99_bound_ms']:g} ms)")
    return "\n".join(lines)


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}"

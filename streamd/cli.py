"""`streamd run | validate | tail | demo | analyze | bench`. Exit codes: 0 ok, 1 fatal error, 2 invalid config or usage."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from streamd import __version__
from streamd.config import Config, DecodeMode, check_tokens, load_config, parse_config
from streamd.errors import ConfigError, StreamdError, UsageError
from streamd.log import get_logger, setup_logging

log = get_logger("streamd.cli")
SET_UP_S = 120.0  # `demo --duration`: the longest wait for a first result before the duration counts anyway


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamd", description="Real-time video analytics daemon")
    p.add_argument("--version", action="version", version=f"streamd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the daemon with a config file")
    r.add_argument("-c", "--config", required=True, help="YAML config (see config/streamd.yaml)")

    v = sub.add_parser("validate", help="check a config file; exits non-zero naming the bad key")
    v.add_argument("config", nargs="?", help="YAML config")
    v.add_argument("-c", "--config", dest="config_opt")

    t = sub.add_parser("tail", help="follow result (or event) streams")
    t.add_argument("streams", nargs="*", help="stream ids (default: every stream found)")
    t.add_argument("--redis", help="Redis URL (default: the config's redis.url, else $STREAMD_REDIS_URL, else "
                   "redis://127.0.0.1:6379/0)")
    t.add_argument("-c", "--config", help="a daemon's YAML config: tail its Redis (redis.url, redis.cluster)")
    t.add_argument("--cluster", action="store_true", help="the Redis URL names one master of a Redis Cluster")
    t.add_argument("--events", action="store_true", help="events instead of results")
    t.add_argument("--both", action="store_true", help="results and events")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument("--from-start", action="store_true", help="from the oldest kept entry instead of new ones")
    t.add_argument("-n", "--count", type=int, help="stop after this many entries")

    d = sub.add_parser("demo", help="the embedded default: a sample clip as a live stream, results on screen")
    d.add_argument("--duration", type=float, default=None,
                   help="seconds to run, counted from the first result (the model's set-up is not counted; at most "
                        f"{SET_UP_S:g} s of it); default: until Ctrl-C")
    d.add_argument("--pipeline", default="default", help="pipeline to run (default: default)")
    d.add_argument("--json", action="store_true", help="print records as JSON lines")
    d.add_argument("--streams", type=int, default=1, help="how many copies of the sample stream")
    d.add_argument("--port", type=int, default=8080, help="the page's and API's port on 127.0.0.1 (default 8080; "
                   "a free one when it is taken; 0: any free port)")

    an = sub.add_parser("analyze", help="analyse a recorded video once (a job) and print its summary")
    an.add_argument("video", help="a video file, or an http(s) URL")
    an.add_argument("-p", "--pipeline", default="default", help="pipeline to run (default: default)")
    an.add_argument("--prompt", help="the VLM prompt for this job (instead of the pipeline's)")
    an.add_argument("--json", action="store_true", help="print the job's document as JSON")
    an.add_argument("-c", "--config", help="a YAML config: its Redis, pipelines and jobs section (else embedded)")
    g = an.add_mutually_exclusive_group()
    g.add_argument("--fps", type=_number(0, 240), default=2.0, help="frames per second of media time (default 2)")
    g.add_argument("--every-frame", action="store_true", help="every frame")
    g.add_argument("--scene", type=_number(0, 1), metavar="THRESHOLD", help="scene sampling at this threshold (0-1)")
    an.add_argument("--max-duration", type=_number(0, 7 * 86_400), metavar="SECONDS",
                    help="analyse at most this much media time from the first frame (the job's max_duration_s; "
                         "needed for a live source)")

    b = sub.add_parser("bench", help="how many copies of a stream this machine carries with a pipeline")
    b.add_argument("-c", "--config", help="a YAML config: its stream (--stream, default the first) is replicated")
    b.add_argument("--stream", help="the config's stream to replicate")
    b.add_argument("--url", help="a stream URL or file to replicate (instead of a config's stream)")
    b.add_argument("--pipeline", default=None, help="with --url: the pipeline (default: default)")
    b.add_argument("--fps", type=float, default=None, help="with --url: the sampling rate (default 2)")
    b.add_argument("--decode", choices=["auto", "all", "keyframes"], default=None, help="override decode:")
    b.add_argument("--steps", default="1,2,4,8,16,32,48,64,96,128,192,256",
                   help="numbers of copies, tried in order until one does not keep up")
    b.add_argument("--seconds", type=float, default=20, help="measured seconds per step (default 20)")
    b.add_argument("--warmup", type=float, default=5, help="seconds per step before measuring (default 5)")
    b.add_argument("--p99-ms", type=float, default=1000, help="capture -> publish p99 bound (default 1000)")
    b.add_argument("--record-s", type=float, default=10, help="seconds of the source recorded (default 10)")
    b.add_argument("--direct", action="store_true", help="open the source itself N times (no recording)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _number(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in (low, high]; else a usage error naming the option (exit 2)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(x) or not low < x <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: give a finite number above {low:g} and at most {high:g}")
        return x
    return parse


async def _stop_after(daemon: Any, stop: asyncio.Event, duration_s: float) -> None:
    """Sets `stop` `duration_s` after the daemon's first published result (its models' set-up, which takes seconds
    on a CPU, is not counted), or after `SET_UP_S` + `duration_s` when no result comes."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + SET_UP_S
    while loop.time() < give_up and not (daemon.sink is not None and daemon.sink.published):
        await asyncio.sleep(0.1)
    if not (daemon.sink is not None and daemon.sink.published):
        log.warning("no result yet: stopping after --duration anyway", waited_s=SET_UP_S)
    await asyncio.sleep(duration_s)
    stop.set()


async def serve(cfg: Config, extra: Callable[..., Awaitable[None]] | None = None,
                duration_s: float | None = None) -> int:
    """Run a daemon until SIGINT/SIGTERM (or `duration_s` after its first result); a second SIGINT forces exit."""
    from streamd.daemon import Daemon

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    interrupts = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal interrupts
        if sig == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                print("streamd: second interrupt, exiting now", file=sys.stderr)
                os._exit(130)
        log.info("signal received, shutting down", signal=sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    daemon = Daemon(cfg)
    async with daemon:
        runner = asyncio.create_task(daemon.run(stop))
        timer = asyncio.create_task(_stop_after(daemon, stop, duration_s)) if duration_s is not None else None
        helper = None
        if extra is not None:
            started = asyncio.ensure_future(daemon.started.wait())
            await asyncio.wait({started, runner}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if daemon.started.is_set() and not runner.done():
                helper = asyncio.create_task(extra(daemon))
        await runner
        if helper is not None:
            # a Redis client cancelled in the middle of a blocking read may never finish cancelling (seen with
            # redis-py): wait a little, then leave it
            helper.cancel()
            await asyncio.wait({helper}, timeout=2.0)
        if timer is not None:
            timer.cancel()
    return 0


def _validate(path: str | None) -> int:
    from streamd.streams.pipelines import check_config

    if not path:
        print("streamd validate: give a config file", file=sys.stderr)
        return 2
    cfg = load_config(path)
    check_tokens(cfg, dict(os.environ))
    check_config(cfg)
    print(f"{path}: ok ({len(cfg.streams)} streams)")
    return 0


async def _tail(a: argparse.Namespace) -> int:
    from streamd.redis_clients import redis_client
    from streamd.tail import follow

    kinds = ("results", "events") if a.both else ("events",) if a.events else ("results",)
    cfg = load_config(a.config) if a.config else None
    url = a.redis or (cfg.redis.url if cfg else None) or os.environ.get("STREAMD_REDIS_URL",
                                                                        "redis://127.0.0.1:6379/0")
    client = redis_client(url, cluster=a.cluster or (cfg is not None and cfg.redis.cluster))
    try:
        await follow(client, a.streams, kinds, a.json, a.from_start, a.count)
    finally:
        await client.aclose()
    return 0


def demo_config(clip: Path, pipeline: str, streams: int, data_dir: str, port: int = 0) -> Config:
    return parse_config({
        "redis": {"data_dir": data_dir},
        "api": {"enabled": True, "bind": "127.0.0.1", "port": port},  # the page at http://127.0.0.1:<port>/
        "streams": [
            {"id": f"demo-{i}" if streams > 1 else "demo", "url": str(clip), "pipeline": pipeline,
             "playback": "realtime", "loop": True, "fps": 2.0}
            for i in range(streams)
        ],
    })


async def _demo(a: argparse.Namespace) -> int:
    from streamd.samples import make_pan_clip
    from streamd.tail import follow

    home = Path(os.environ.get("STREAMD_HOME", ".streamd"))
    clip = home / "samples" / "pan-zidane-720p.mp4"
    if not clip.exists():
        print(f"streamd demo: making a sample clip (a pan over a real photo) at {clip}", file=sys.stderr)
        await asyncio.to_thread(make_pan_clip, clip)
    cfg = demo_config(clip, a.pipeline, a.streams, str(home / "redis"), _free_or_any(a.port))

    async def show(daemon: object) -> None:
        from streamd.daemon import Daemon

        assert isinstance(daemon, Daemon)
        print(f"streamd demo: the page: {daemon.api_url}/ (streams, live view, prompts)", file=sys.stderr)
        print(f"streamd demo: redis at {daemon.redis_url}; results below (Ctrl-C to stop)", file=sys.stderr)
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(daemon.redis_url)  # its own connections, never the daemon's
        try:
            await follow(client, [], ("results", "events"), a.json, from_start=True)
        finally:
            await client.aclose()

    return await serve(cfg, show, a.duration)


def _free_or_any(port: int) -> int:
    """`port` if it can be bound on 127.0.0.1 now, else 0 (any free port)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def _bench(a: argparse.Namespace) -> int:
    import json

    from streamd.bench import bench, table, template

    if bool(a.config) == bool(a.url):
        raise ConfigError("bench", "give a config (-c) or a stream URL (--url)")
    cfg = load_config(a.config) if a.config else parse_config({}, environ={})
    tpl = template(cfg, a.stream) if a.config else parse_config(
        {"streams": [{"id": "bench", "url": a.url, "pipeline": a.pipeline or "default",
                      **({"fps": a.fps} if a.fps else {})}]}, environ={}).streams[0]
    if a.decode:
        tpl = tpl.model_copy(update={"decode": DecodeMode(a.decode)})
    try:
        steps = [int(x) for x in a.steps.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--steps", "a comma-separated list of positive integers") from None
    if not steps or min(steps) < 1:
        raise ConfigError("--steps", "a comma-separated list of positive integers")
    report = await bench(cfg, tpl, steps, seconds=a.seconds, warmup_s=a.warmup, p99_ms=a.p99_ms, direct=a.direct,
                         record_s=a.record_s, progress=sys.stderr.isatty() or not a.json)
    print(json.dumps(report) if a.json else table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    from streamd.aiocompat import fix_wait_for

    fix_wait_for()
    a = _parser().parse_args(argv)
    level = os.environ.get("STREAMD_LOG_LEVEL", "info")
    fmt = os.environ.get("STREAMD_LOG_FORMAT", "console")
    setup_logging(level if level in ("debug", "info", "warning", "error") else "info",
                  fmt if fmt in ("json", "console") else "console")
    try:
        if a.cmd == "validate":
            return _validate(a.config or a.config_opt)
        if a.cmd == "tail":
            return asyncio.run(_tail(a))
        if a.cmd == "demo":
            return asyncio.run(_demo(a))
        if a.cmd == "analyze":
            from streamd.analyze import run

            setup_logging("warning", fmt if fmt in ("json", "console") else "console")
            sampling = {"mode": "every_frame"} if a.every_frame else \
                {"mode": "scene", "scene_threshold": a.scene} if a.scene is not None else {"mode": "fps", "fps": a.fps}
            return run(a.video, a.pipeline, a.prompt, a.json, a.config, sampling, a.max_duration)
        if a.cmd == "bench":
            setup_logging("warning", fmt if fmt in ("json", "console") else "console")
            return asyncio.run(_bench(a))
        cfg = load_config(a.config)
        plain = check_tokens(cfg, dict(os.environ))
        setup_logging(cfg.log.level, cfg.log.format)
        for name in plain:
            log.warning("an API token is written in plain text in the config: prefer token_env", token=name)
        return asyncio.run(serve(cfg))
    except UsageError as e:  # a command-line option (streamd analyze), not the config
        print(f"streamd: invalid option {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"streamd: invalid config: {e}", file=sys.stderr)
        return 2
    except StreamdError as e:
        print(f"streamd: error: {e}", file=sys.stderr)
        return 1
    except ExceptionGroup as eg:  # raised inside the daemon's task group: one clear line all the same
        leaves = _leaves(eg)
        if not all(isinstance(x, StreamdError) for x in leaves):
            raise
        config = [x for x in leaves if isinstance(x, ConfigError)]
        if config:
            print(f"streamd: invalid config: {config[0]}", file=sys.stderr)
            return 2
        print(f"streamd: error: {leaves[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    return [x for e in eg.exceptions for x in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]

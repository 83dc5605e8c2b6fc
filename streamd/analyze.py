"""`streamd analyze VIDEO -p PIPELINE`: one job on the command line, through the same engine as POST /api/v1/jobs:
a daemon in this process (an embedded redis-server when the config names no Redis; no API, no streams), the job's
progress on a terminal (tqdm), the summary document printed (pretty, or JSON with --json). Exit 0 when the job is
done, 1 when it failed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from streamd.config import Config, load_config, parse_config
from streamd.errors import StreamdError, UsageError
from streamd.jobs.options import JobSpec


def analyze_config(path: str | None) -> Config:
    """The config file's (its Redis, its pipelines, its jobs section), or the embedded defaults; never its streams
    or its API."""
    if path:
        cfg = load_config(path)
    else:
        home = os.environ.get("STREAMD_HOME", ".streamd")
        cfg = parse_config({"redis": {"data_dir": os.path.join(home, "redis")}})
    return cfg.model_copy(update={"streams": [], "api": cfg.api.model_copy(update={"enabled": False}),
                                  "fleet": cfg.fleet.model_copy(update={"enabled": False})})


_OPTION = {"sampling": "--fps / --scene", "max_duration_s": "--max-duration", "prompts": "--prompt",
           "pipeline": "-p/--pipeline", "source": "VIDEO"}


def job_spec(video: str, pipeline: str, prompt: str | None, sampling: dict[str, Any],
             max_duration_s: float | None = None) -> tuple[JobSpec, str | None]:
    """The job for VIDEO: an http(s) URL, or a local file (returned as the upload path). A bad option: UsageError
    naming it (exit 2)."""
    from pydantic import ValidationError

    body: dict[str, Any] = {"pipeline": pipeline, "sampling": sampling}
    if prompt:
        body["prompts"] = {"vlm": {"text": prompt}}
    if max_duration_s is not None:
        body["max_duration_s"] = max_duration_s
    url = video.startswith(("http://", "https://"))
    if url:
        body["source"] = {"url": video}
    try:
        spec = JobSpec.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = str(err["loc"][0]) if err["loc"] else ""
        raise UsageError(_OPTION.get(where, where or "analyze"), err["msg"]) from None
    return spec, None if url else os.path.abspath(video)


async def analyze(cfg: Config, spec: JobSpec, local: str | None, progress: bool) -> dict[str, Any]:
    """Run the job in a daemon of this process; its final document."""
    from streamd.daemon import Daemon

    stop = asyncio.Event()
    async with Daemon(cfg) as daemon:
        runner = asyncio.create_task(daemon.run(stop))
        try:
            started = asyncio.ensure_future(daemon.started.wait())
            await asyncio.wait({started, runner}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if runner.done():
                await runner  # its error
            job = await daemon.jobs.submit(spec, upload=local, origin="config",
                                           filename=os.path.basename(local) if local else None)
            await _follow(job, progress, runner)
            if runner.done() and not job.finished.is_set():
                await runner  # the daemon ended under the job: its error
                raise StreamdError("the daemon stopped before the job ended")
            return job.document()
        finally:
            stop.set()
            await asyncio.gather(runner, return_exceptions=True)


async def _follow(job: Any, progress: bool, runner: asyncio.Task[Any]) -> None:
    """Until the job ends, or the daemon running it does."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")
    try:
        while not job.finished.is_set() and not runner.done():
            try:
                await asyncio.wait_for(job.finished.wait(), 0.25)
            except TimeoutError:
                pass
            if bar is not None:
                p = job.progress()
                bar.n = round(p["fraction"] * 100, 1)
                bar.set_postfix_str(f"{p['frames_done']} frames, {p['media_s_done']:.1f}"
                                    f"/{p['media_s_total'] or 0:.1f} s of media, {job.state}")
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()


def pretty(doc: dict[str, Any]) -> str:
    """The document for people: state, progress, what was seen."""
    p = doc["progress"]
    wall = (doc["ended_ts"] or time.time()) - (doc["started_ts"] or doc["created_ts"])
    lines = [f"job {doc['id']}: {doc['state']}" + (f" ({doc['reason_code']}: {doc['reason']})" if doc["reason"]
                                                  else ""),
             f"  {p['frames_done']} frames, {p['media_s_done']:.1f} s of media in {wall:.1f} s, pipeline "
             f"{doc['pipeline']}"]
    s = doc.get("summary")
    if not s:
        return "\n".join(lines)
    if s["labels"]:
        lines.append("  detections: " + ", ".join(f"{k} {v}" for k, v in s["labels"].items()))
    if s["tracks"]:
        lines.append(f"  tracks ({len(s['tracks'])}):")
        lines += [f"    #{t['track_id']} {t['label']}: {t['first_seen_pts_s']:.1f}-{t['last_seen_pts_s']:.1f} s, "
                  f"{t['frames']} frames" for t in s["tracks"][:20]]
        if len(s["tracks"]) > 20:
            lines.append(f"    ... {len(s['tracks']) - 20} more")
    for stage, v in (s.get("vlm") or {}).items():
        for t in v.get("tags", []):
            lines.append(f"  {stage} tag {t['tag']}: {t['start_pts_s']:.1f}-{t['end_pts_s']:.1f} s "
                         f"(max {t['max_confidence']:.2f})")
        for c in v["captions"][:10]:
            lines.append(f"  {stage} @{c['pts_s']:.1f} s: {c['text']}")
        for sm in v["summaries"]:
            lines.append(f"  {stage} summary: {sm['text']}")
    for c in s.get("scene_cuts", []):
        lines.append(f"  scene cut @{c['pts_s']:.2f} s (change {c['change']:.2f})")
    if s["timings_ms"]:
        lines.append("  stage timings (mean ms): " + ", ".join(f"{k} {v['mean']:.1f}"
                                                               for k, v in s["timings_ms"].items()))
    return "\n".join(lines)


def run(video: str, pipeline: str, prompt: str | None, as_json: bool, config: str | None,
        sampling: dict[str, Any], max_duration_s: float | None = None) -> int:
    spec, local = job_spec(video, pipeline, prompt, sampling, max_duration_s)
    cfg = analyze_config(config)
    doc = asyncio.run(analyze(cfg, spec, local, progress=sys.stderr.isatty()))
    print(json.dumps(doc) if as_json else pretty(doc))
    return 0 if doc["state"] == "done" else 1

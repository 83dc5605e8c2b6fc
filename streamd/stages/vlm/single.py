"""A predict request's image through the VLM stage (POST /api/v1/predict/{pipeline}).

A live frame's question is a branch: the stage returns at once and the answer is published later to
``streamd:{<stream>}:vlm``. A predict image has no stream to publish to, and its caller waits for one answer: the
stage always asks about it (trigger ``predict``; no timer, no staleness skip), and hands the pipeline a task
(`Work.carry[AWAITING]`) that puts the answer into the frame's outputs (``outputs.<stage>``: text, parsed JSON or
tags as the stage's mode gives them, the prompt version, the model, latency and tokens). The predict queue awaits
those tasks before it answers the request, so live frames in the same stage batch never wait for the answer, and
the image still counts against the predict bound until it is answered. Nothing about it is published (no tag
ranges, no summary window, no events).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from streamd.frames import AWAITING, Work
from streamd.stages.vlm.prompting import parse_tags
from streamd.stages.vlm.triggers import Ask

__all__ = ["ask_for_predict"]

_KEEP = ("trigger", "mode", "prompt", "model", "model_version", "endpoint", "text", "latency_ms", "tokens", "error")


def ask_for_predict(stage: Any, w: Work) -> None:
    """Start the question about predict image `w` (stage: streamd.stages.vlm.Vlm); its task joins
    `w.carry[AWAITING]`."""
    w.outputs[stage.name] = {"asked": True, "trigger": "predict"}
    task = asyncio.create_task(_answer(stage, w, stage.serving), name=f"vlm:{w.frame.stream_id}:predict")
    stage._inflight.add(task)
    task.add_done_callback(stage._inflight.discard)
    w.carry.setdefault(AWAITING, []).append(task)


async def _answer(stage: Any, w: Work, sv: Any) -> None:
    """Ask with `sv` (streamd.stages.vlm.live.Serving): the model serving when the image reached the stage."""
    f = w.frame
    ask = Ask("predict", [f])
    async with stage._slots:  # the stage's bound on questions in flight holds for predict images too
        stage.asked += 1
        req, version = await asyncio.to_thread(stage._request, w, ask)
        rec = stage._record(f, ask, version, sv)
        await stage._answer(req, rec, sv.backend)  # a failed question is recorded (rec["error"]), never raised
    out = {k: rec[k] for k in _KEEP if k in rec}
    if "text" in rec:
        o = stage.opts
        if o.mode in ("tags", "safety"):
            try:
                out["tags"] = [{"tag": t, "confidence": round(c, 4)}
                               for t, c in sorted(parse_tags(rec["text"], o.tags).items())]
            except (ValueError, TypeError) as e:
                out["parse_error"] = str(e)[:200]
        elif req.schema is not None:
            try:
                out["parsed"] = json.loads(rec["text"])
            except ValueError as e:
                out["parse_error"] = str(e)[:200]
    w.outputs[stage.name].update(out)

"""/api/v1/streams/{id}/segment: prompt SAM 2 by hand (points and/or a box) on a stream whose pipeline has a
segment stage, list the objects it follows, stop following one. The handlers reach the stage through the stream
manager (the running pipeline of the stream), never the daemon; a prompt applies to the stream's next frame."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, model_validator

from streamd.api.body import json_body
from streamd.api.context import streams as _streams
from streamd.api.errors import ApiError, json_response
from streamd.api.schemas import Body
from streamd.errors import StageError

class SegmentPrompt(Body):
    """A prompt for a new object: a box, points, or both (the box first, as SAM 2 was trained)."""

    box: list[float] | None = Field(None, min_length=4, max_length=4, description="[x1, y1, x2, y2], x2 > x1, "
                                    "y2 > y1; clipped to the frame")
    points: list[list[float]] | None = Field(None, min_length=1, max_length=16, description="[[x, y], ...]")
    labels: list[int] | None = Field(None, description="per point: 1 on the object, 0 off it; default all 1")
    normalized: bool = Field(False, description="coordinates in 0..1 of the frame's width and height (else pixels)")

    @model_validator(mode="after")
    def _check(self) -> "SegmentPrompt":
        if self.box is None and self.points is None:
            raise ValueError("give a box, points, or both")
        top = 1.0 if self.normalized else 100_000.0
        coords = list(self.box or []) + [c for p in self.points or [] for c in p]
        if any(not 0 <= c <= top for c in coords):
            raise ValueError(f"coordinates are in 0..{top:g}" + (" (normalized)" if self.normalized else " pixels"))
        if self.box is not None and not (self.box[2] > self.box[0] and self.box[3] > self.box[1]):
            raise ValueError("box: x2 > x1 and y2 > y1")
        if self.points is not None:
            if any(len(p) != 2 for p in self.points):
                raise ValueError("points: each [x, y]")
            if self.labels is not None and (len(self.labels) != len(self.points) or set(self.labels) - {0, 1}):
                raise ValueError("labels: one per point, each 0 or 1")
        elif self.labels is not None:
            raise ValueError("labels go with points")
        return self


class SegmentCreated(BaseModel):
    stream_id: str
    object_id: int = Field(..., description="the new object's id in the stream (outputs.segment.objects[].object_id)")
    state: str = Field(..., description="pending: it starts on the stream's next frame")


class SegmentObject(BaseModel):
    object_id: int
    track_id: int | None = Field(None, description="the track that prompted it; null for API prompts")
    label: str | None = None
    state: str = Field(..., description="pending, visible or occluded (lost objects are gone)")
    score: float | None = Field(None, description="SAM 2's object score on the last frame (0..1)")
    box: list[float] | None = Field(None, description="its mask's box on the last frame, pixels (coarse)")


class SegmentObjects(BaseModel):
    stream_id: str
    stage: str = Field(..., description="the segment stage's name (its key in outputs)")
    objects: list[SegmentObject]
    memory: dict[str, int] = Field(..., description="the stream's memory bank: objects, cond_frames, "
                                   "memory_frames, pointer_frames, bytes")


def _stage(request: web.Request) -> tuple[str, Any]:
    """The stream id and the segment stage of the pipeline it runs in on this daemon."""
    sid = request.match_info["id"]
    d = _streams(request)
    if not d.has_stream(sid) and d.elsewhere(sid) is None:
        raise ApiError(404, "stream_not_found", f"no stream {sid!r}")
    if sid not in d.runners:
        raise ApiError(409, "segment_unavailable", f"stream {sid!r} runs on another daemon of the fleet: ask its "
                       "owner's API (GET /api/v1/cluster)")
    name = d.stream_config(sid).pipeline
    pipeline = d.pipelines.get(name)
    if pipeline is None or not pipeline.ready.is_set():
        raise ApiError(409, "segment_unavailable", f"stream {sid!r}: its pipeline {name!r} is not running yet",
                       {"pipeline": name})
    for st in pipeline.stages:
        if st.kind == "segment":
            return sid, st
    raise ApiError(409, "segment_unavailable", f"stream {sid!r}: its pipeline {name!r} has no segment stage",
                   {"pipeline": name})


async def segment_prompt(request: web.Request) -> web.Response:
    sid, stage = _stage(request)
    body = await json_body(request, SegmentPrompt)
    raw = body.model_dump()
    if raw["points"] is not None and raw["labels"] is None:
        raw["labels"] = [1] * len(raw["points"])
    try:
        oid = stage.add_prompt(sid, raw)
    except StageError as e:  # the stage's ObjectLimit (not imported: the control API stays light)
        if getattr(e, "code", None) != "segment_object_limit":
            raise
        raise ApiError(409, "segment_object_limit", str(e), {"max_objects": stage.opts.max_objects}) from None
    return json_response({"stream_id": sid, "object_id": oid, "state": "pending"}, status=201)


async def segment_objects(request: web.Request) -> web.Response:
    sid, stage = _stage(request)
    return json_response({"stream_id": sid, "stage": stage.name, "objects": stage.objects(sid),
                          "memory": stage.memory(sid)})


async def segment_delete(request: web.Request) -> web.Response:
    sid, stage = _stage(request)
    raw = request.match_info["object_id"]
    try:
        stage.remove_object(sid, int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else -1)
    except StageError as e:
        if getattr(e, "code", None) != "segment_object_not_found":
            raise
        raise ApiError(404, "segment_object_not_found", str(e)) from None
    return web.Response(status=204)

"""The `segment` stage (backend `sam2`): objects' masks followed from frame to frame by SAM 2's memory, online.

Each new track of the track stage (`track_source`) prompts an object with the track's box; SAM 2 then follows the
object's mask from its own memory, also through frames where the detector misses it. An object is prompted again
from its track's box when the tracker re-associates the track (it was missing on the frame before) or when the
mask's box drifts from the track's box (IoU below `reprompt_iou`, at most once per `reprompt_cooldown_frames`).
Objects can also be prompted through the API (points or a box: `add_prompt`) and removed (`remove_object`).

Per object and frame, `outputs.<name>.objects[]`: object id, the track it came from, its mask (COCO RLE, as
detection masks), the mask's box and area, SAM 2's object score, and its visibility (visible / occluded / lost:
`streamd.stages.segment.visibility`; events mask_occluded, mask_reappeared, mask_lost). A lost object is published
once as lost, then no longer followed.

State is per stream (`StreamMemory`, bounded: `max_objects`, `memory_frames`, `max_cond_frames`), reset on a
discontinuity, freed when the stream goes. Streams share the loaded model through the model manager; one stage
batch holds frames of several streams, run as rounds (the k-th frame of each stream), each round submitted to the
model's one batcher (`Sam2Engine.run`), which puts rounds of every segment stage using the model (every pipeline)
into shared passes of the image encoder and batched passes over the objects of all of them (`Sam2Engine.step`,
at most the model's `forward_batch` frames); the masks of a round are sized and encoded after its pass.

Where the masks are sized: on the CPU, on the device's executor thread, the thread of the forward passes, after the
pass (so every parallel torch call of the stage runs on that one thread; on 2 cores the half passes of
`Sam2Engine.passes` run on threads of their own at one torch thread, which makes no OpenMP pool). Each thread that runs a parallel torch operation
gets its own OpenMP pool of worker threads, and once a process has more OpenMP threads than cores, libgomp's
workers stop spinning between parallel regions and sleep: every region then waits for them to wake. A second
thread sizing masks on the CPU made the whole forward pass ~20 % slower on 2 cores (benchmarks/RESULTS.md, issue
15), far more than the overlap gained. On a GPU the masks (CPU work) go to a thread of their own, overlapping the
next round's pass on the GPU.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import streamd.stages.segment.boxes as boxes
from streamd.config import StageConfig
from streamd.errors import StageError
from streamd.frames import Work
from streamd.log import get_logger
from streamd.stages import Stage, parse_options
from streamd.stages.masks import mask_rle
from streamd.stages.segment.memory import Prompt, StreamMemory, TrackedObject
from streamd.stages.segment.model import DEFAULT_MODEL
from streamd.stages.segment.visibility import State, Visibility

log = get_logger("streamd.stage.segment")


class SegmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["segment"] = "segment"
    name: str | None = None
    backend: Literal["sam2"] = Field("sam2", description="the mask tracker: SAM 2 (the sam2 package)")
    model: str = Field(DEFAULT_MODEL, description="a sam2 model declared in models.catalog (its name), or a SAM 2.1 "
                       "model: sam2.1-hiera-tiny, sam2.1-hiera-small, sam2.1-hiera-base-plus, sam2.1-hiera-large "
                       "(also facebook/<name>)")
    checkpoint: str = Field("hub", min_length=1, description="the weights: a local checkpoint file (.pt); hub: "
                            "downloaded from the Hugging Face hub on first use (needs internet once); random: "
                            "untrained (tests, benchmarks)")
    image_size: int | None = Field(None, ge=128, le=2048, multiple_of=32, description="the model's square input "
                                   "size; null: the model config's (1024)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bfloat16 autocast on CUDA, fp32 on the CPU; fp16 is CUDA only")
    track_source: str | None = Field("track", description="the track stage (its name) whose new tracks prompt "
                                     "objects with their boxes; null: objects come only from the API")
    classes: list[str] | None = Field(None, description="prompt only tracks with these labels; null: every track")
    max_objects: int = Field(16, ge=1, le=256, description="most objects followed per stream: a new track beyond "
                             "it is not prompted (event mask_refused), an API prompt is refused")
    memory_frames: int = Field(6, ge=0, le=64, description="recent frames whose spatial memory each object keeps "
                               "besides its prompted frames (at most SAM 2's num_maskmem - 1: 6); older ones are "
                               "dropped")
    max_cond_frames: int = Field(4, ge=1, le=64, description="prompted frames kept per object (its first prompt and "
                                 "re-prompts), the oldest dropped first")
    visible_score: float = Field(0.5, ge=0, le=1, description="object score (0..1) at or above which an object is "
                                 "visible; below it, occluded")
    lost_after_s: float = Field(3.0, gt=0, description="occluded this long (source time): lost, no longer followed")
    reprompt_iou: float = Field(0.3, ge=0, le=1, description="prompt an object again with its track's box when its "
                                "mask's box overlaps the track's box less than this (IoU); 0: never for drift")
    reprompt_cooldown_frames: int = Field(15, ge=1, description="frames between two re-prompts of one object for "
                                          "drift")
    max_batch: int = Field(8, ge=1, description="most frames in one stage batch (frames of several streams share "
                           "forward passes)")
    max_wait_ms: float = Field(5.0, ge=0, description="wait this long for a fuller batch")


class SegmentError(StageError):
    """A prompt or removal the stage refuses; `code` is the API's error code."""

    code = "segment_error"


class ObjectLimit(SegmentError):
    code = "segment_object_limit"


class ObjectNotFound(SegmentError):
    code = "segment_object_not_found"


class Segment(Stage):
    kind = "segment"

    def __init__(self, cfg: StageConfig, opts: SegmentOptions):
        super().__init__(cfg)
        self.opts = opts
        self.max_batch = opts.max_batch
        self.max_wait_ms = opts.max_wait_ms
        self.model: Any = None  # streamd.models.ModelRef to the shared SAM 2 engine
        self.source = opts.model
        self._streams: dict[str, StreamMemory] = {}
        self._masks: Executor | None = None  # sizes and encodes masks (see the module's docstring)
        self._own_masks: ThreadPoolExecutor | None = None  # a GPU model's masks thread (the stage's own)

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Segment":
        return cls(cfg, parse_options(SegmentOptions, cfg, where))

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Take a handle on the SAM 2 model from the model manager and load it (a clear error where its weights
        cannot be had: offline, no such file)."""
        from streamd.models.executors import device_executor
        from streamd.models.sources import resolve_device
        from streamd.models.spec import ModelSpec

        o = self.opts
        self.ctx.models.check_stage(self.cfg.model_dump(exclude_unset=True), self.where or f"stage {self.name}")
        implicit = ModelSpec(source=o.model, kind="sam2", device=resolve_device(o.device), precision=o.precision,
                             options={"checkpoint": o.checkpoint, "image_size": o.image_size})
        self.model = self.ctx.models.ref(o.model, implicit, self.label(), self.ctx.fail_stream)
        async with self.model.use() as engine:
            self.device, self.source = engine.device, engine.name
            if engine.device == "cpu":  # the forward passes' thread: one OpenMP pool in the process
                self._masks = device_executor(engine.device)
            else:
                self._own_masks = ThreadPoolExecutor(1, thread_name_prefix=f"segment-masks-{self.name}")
                self._masks = self._own_masks
            if o.memory_frames > engine.max_memory_frames():
                raise StageError(f"memory_frames {o.memory_frames} is more than model {engine.name} reads "
                                 f"({engine.max_memory_frames()}: its num_maskmem - 1)")

    async def teardown(self) -> None:
        if self.model is not None:
            self.model.close()
        if self._own_masks is not None:
            self._own_masks.shutdown(wait=False)

    def reset_stream(self, stream_id: str) -> None:
        st = self._streams.get(stream_id)
        if st is not None:
            self._end_all(stream_id, st, "reset")
            st.t = -1
            st.refused_tracks.clear()

    def forget_stream(self, stream_id: str) -> None:
        st = self._streams.pop(stream_id, None)
        if st is not None:
            self._end_all(stream_id, st, "stream removed")
        if self.model is not None:
            self.model.drop_stream(stream_id)

    def _end_all(self, stream_id: str, st: StreamMemory, reason: str) -> None:
        for obj in st.objects.values():
            self._event(stream_id, "mask_lost", obj, {"reason": reason})
        st.objects.clear()

    # -- the API's side: prompts and removals, applied to the stream's next frame --------------------------------
    def add_prompt(self, stream_id: str, prompt: dict[str, Any]) -> int:
        """Queue a prompt (`points` [[x, y]...] with `labels`, and/or `box` [x1, y1, x2, y2]; `normalized`: 0..1
        coordinates) for the stream's next frame. Returns the new object's id. Raises ObjectLimit."""
        st = self._streams.setdefault(stream_id, StreamMemory())
        queued = sum(1 for kind, _ in st.commands if kind == "prompt")
        if len(st.objects) + queued >= self.opts.max_objects:
            raise ObjectLimit(f"stream {stream_id!r} already follows {len(st.objects)} objects "
                              f"({queued} more queued); max_objects is {self.opts.max_objects}")
        oid = st.new_id()
        st.commands.append(("prompt", (oid, prompt)))
        return oid

    def remove_object(self, stream_id: str, object_id: int) -> None:
        """Stop following an object (from the stream's next frame). Raises ObjectNotFound."""
        st = self._streams.get(stream_id)
        queued = st is not None and any(k == "prompt" and a[0] == object_id for k, a in st.commands)
        if st is None or (object_id not in st.objects and not queued):
            raise ObjectNotFound(f"stream {stream_id!r} follows no object {object_id}")
        st.commands.append(("remove", object_id))

    def objects(self, stream_id: str) -> list[dict[str, Any]]:
        """The objects a stream follows now (and the prompts waiting for its next frame)."""
        st = self._streams.get(stream_id)
        if st is None:
            return []
        out = [boxes.describe(o) for o in st.objects.values()]
        out += [{"object_id": a[0], "track_id": None, "label": None, "state": "pending", "score": None,
                 "box": None} for k, a in st.commands if k == "prompt"]
        return out

    def memory(self, stream_id: str) -> dict[str, int]:
        """What a stream's memory bank holds: objects, conditioning / spatial / pointer frames, bytes."""
        st = self._streams.get(stream_id)
        return StreamMemory().counts() if st is None else st.counts()

    # -- frames --------------------------------------------------------------------------------------------------
    async def process(self, batch: list[Work]) -> list[Work]:
        assert self.model is not None
        todo = self.model.serviceable(batch)
        if not todo:
            return batch
        async with self.model.use({w.frame.stream_id for w in todo}) as engine:
            masks: list[asyncio.Future[None]] = []
            try:
                for rnd in _rounds(todo):
                    await self._round(engine, rnd, masks)
            finally:  # every mask job ends before the frames leave (also when a pass failed)
                done = await asyncio.gather(*masks, return_exceptions=True)
            for d in done:
                if isinstance(d, BaseException):
                    raise d
        return batch

    async def _round(self, engine: Any, rnd: list[Work], masks: list[asyncio.Future[None]]) -> None:
        """One frame of each stream in `rnd`: the forward pass on the device's thread, then scores and memory on
        the loop; then the masks: on the device's thread on the CPU, on the masks thread on a GPU (there they overlap
        the next round's pass)."""
        jobs = [(w, self._job(engine, w)) for w in rnd]
        classes: dict[bool, list[tuple[Work, Any]]] = {}  # live streams' frames, jobs' (the batcher's lower class)
        for w, j in jobs:
            if j.steps:
                classes.setdefault(w.frame.job, []).append((w, j))
        outs = await asyncio.gather(*(
            engine.run([j for _, j in c], self.opts.memory_frames, low,
                       () if low else {w.frame.stream_id for w, _ in c})
            for low, c in classes.items()))
        by_work = {id(w): fo for c, fos in zip(classes.values(), outs) for (w, _), fo in zip(c, fos)}
        loop = asyncio.get_running_loop()
        for w, _ in jobs:
            fo = by_work.get(id(w))
            results = self._after(engine, w, fo.objects if fo is not None else [])
            masks.append(loop.run_in_executor(self._masks, self._publish, engine, w, results))

    def _job(self, engine: Any, w: Work) -> Any:
        """This frame's work for the stream: API commands, prompts from new or re-associated or drifting tracks,
        and every other object followed from memory."""
        from streamd.stages.segment.engine import FrameJob, ObjectStep

        f = w.frame
        st = self._streams.setdefault(f.stream_id, StreamMemory())
        st.t += 1
        steps: dict[int, ObjectStep] = {}
        self._commands(f.stream_id, st, f.width, f.height, steps)
        if self.opts.track_source is not None:
            self._from_tracks(f, st, w.outputs.get(self.opts.track_source) or {}, steps)
        for obj in st.objects.values():
            steps.setdefault(obj.object_id, ObjectStep(obj))
        return FrameJob(st.t, f.image, list(steps.values()))

    def _new_object(self, st: StreamMemory, oid: int | None = None, **kw: Any) -> TrackedObject:
        o = self.opts
        obj = TrackedObject(st.new_id() if oid is None else oid, Visibility(o.visible_score, o.lost_after_s), **kw)
        st.objects[obj.object_id] = obj
        return obj

    def _commands(self, stream_id: str, st: StreamMemory, width: int, height: int, steps: dict[int, Any]) -> None:
        from streamd.stages.segment.engine import ObjectStep

        while st.commands:
            kind, arg = st.commands.popleft()
            if kind == "remove":
                obj = st.objects.pop(arg, None)
                steps.pop(arg, None)
                if obj is not None:
                    self._event(stream_id, "mask_lost", obj, {"reason": "removed through the API"})
                continue
            oid, raw = arg
            obj = self._new_object(st, oid)
            steps[oid] = ObjectStep(obj, boxes.to_prompt(raw, width, height))

    def _from_tracks(self, f: Any, st: StreamMemory, out: dict[str, Any], steps: dict[int, Any]) -> None:
        from streamd.stages.segment.engine import ObjectStep

        o, t = self.opts, st.t
        by_track = st.by_track()
        for tr in out.get("tracks", []):
            tid, label, box = int(tr["track_id"]), tr.get("label"), boxes.clip(tr["box"], f.width, f.height)
            if (o.classes is not None and label not in o.classes) or box is None:
                continue
            obj = by_track.get(tid)
            if obj is None:
                if len(st.objects) >= o.max_objects:
                    if tid not in st.refused_tracks:
                        st.refused_tracks.add(tid)
                        self.ctx.events(f.stream_id, "mask_refused", {"track_id": tid, "label": label, "seq": f.seq,
                                                                      "reason": f"max_objects ({o.max_objects})"})
                    continue
                obj = self._new_object(st, track_id=tid, label=label)
                steps[obj.object_id] = ObjectStep(obj, Prompt.from_box(box))
            elif obj.object_id not in steps and self._reprompt(obj, box, t):
                steps[obj.object_id] = ObjectStep(obj, Prompt.from_box(box))
            obj.track_seen_at = t

    def _reprompt(self, obj: TrackedObject, track_box: list[float], t: int) -> bool:
        """The track came back after missing frames (the tracker re-associated it), or the mask drifted off it."""
        if obj.track_seen_at is not None and obj.track_seen_at < t - 1:
            return True
        o = self.opts
        if o.reprompt_iou <= 0 or t - obj.prompted_at < o.reprompt_cooldown_frames:
            return False
        return (0.0 if obj.box is None else boxes.iou(obj.box, track_box)) < o.reprompt_iou

    def _after(self, engine: Any, w: Work, outs: list[Any]) -> list[tuple[TrackedObject, Any, dict[str, Any]]]:
        """On the loop, right after the forward pass: scores -> visibility (events), the mask's box for the drift
        check, lost objects dropped, every memory bank cut to what the next frame reads."""
        f = w.frame
        st = self._streams.get(f.stream_id)
        if st is None:  # forgotten while the pass ran
            return []
        results = []
        for oo in outs:
            obj = oo.obj
            obj.score = oo.score
            if oo.prompted:
                obj.prompted_at = st.t
            event = obj.visibility.update(oo.score, f.pts_s)
            obj.box = boxes.low_res_box(oo.low_res, f.width, f.height)
            if event is not None:
                self._event(f.stream_id, event, obj, {"seq": f.seq, "pts_s": f.pts_s,
                                                      **({"reason": "occluded"} if event == "mask_lost" else {})})
            if obj.visibility.state is State.LOST:
                st.objects.pop(obj.object_id, None)
            results.append((obj, oo.low_res, {"state": obj.visibility.state.value, "score": round(oo.score, 4),
                                              "prompted": oo.prompted}))
        spatial_from, pointers_from = engine.window(st.t + 1, self.opts.memory_frames)
        for obj in st.objects.values():
            obj.prune(spatial_from, pointers_from, self.opts.max_cond_frames)
        w.carry[self.name] = st.counts()
        return results

    def _publish(self, engine: Any, w: Work, results: list[tuple[TrackedObject, Any, dict[str, Any]]]) -> None:
        """On the masks thread: each object's mask at the frame's size, its box, area and RLE."""
        f = w.frame
        masks = engine.frame_masks([r[1] for r in results], f.height, f.width)
        objects = []
        for (obj, _, fields), mask in zip(results, masks):
            box = boxes.mask_box(mask)
            objects.append({
                "object_id": obj.object_id, "track_id": obj.track_id, "label": obj.label, **fields,
                "box": box, "box_norm": None if box is None else [round(box[0] / f.width, 5),
                                                                    round(box[1] / f.height, 5),
                                                                    round(box[2] / f.width, 5),
                                                                    round(box[3] / f.height, 5)],
                "area": int(mask.sum()), "mask": mask_rle(mask),
            })
        memory = w.carry.pop(self.name, None) or StreamMemory().counts()
        w.outputs[self.name] = {"model": self.source, "objects": objects, "memory": memory}

    def _event(self, stream_id: str, kind: str, obj: TrackedObject, extra: dict[str, Any]) -> None:
        self.ctx.events(stream_id, kind, {"object_id": obj.object_id, "track_id": obj.track_id, "label": obj.label,
                                          "score": round(obj.score, 4), **extra})


def _rounds(works: list[Work]) -> list[list[Work]]:
    """Round k holds the k-th frame of each stream in the batch: a stream's frames stay in order, one per round."""
    rounds: list[list[Work]] = []
    seen: dict[str, int] = {}
    for w in works:
        k = seen.get(w.frame.stream_id, 0)
        seen[w.frame.stream_id] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(w)
    return rounds

"""The VLM stage: asks a vision-language model about frames, beside detection and tracking.

It is a branch: `process()` only decides which frames to ask about and returns at once, so the model's latency
never holds back the pipeline. Answers are published, as they arrive, to ``streamd:{<stream>}:vlm`` with the
frame's seq, why it was asked, the prompt version used, the model, the endpoint, the latency and token counts.
A frame's own result record says whether it was asked about (``outputs.vlm.asked``, ``outputs.vlm.trigger``).

When to ask (per stream, see triggers.py): every `every_s` seconds of stream time, at once when the prompt
changes, when the scene changes, and about the crop of each new track. Modes (see modes.py): `text` (parsed JSON
with a schema), `tags` / `safety` (tags with confidences turned into time ranges: tag_started / tag_ended
events) and `summary` (captions summarised every `summary_every_s`). Requests in flight are bounded; a question
that would start more than `staleness_s` after its frame's capture is skipped (counted, published as a
``vlm_skipped`` event) instead of queued: checked when the stage's slot is granted and again when the backend's
(an endpoint's concurrency slot, a place in a batch).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import numpy as np

from streamd import keys
from streamd.config import StageConfig
from streamd.errors import StageError
from streamd.frames import JOB_PREFIX, PREDICT_PREFIX, Frame, Work
from streamd.log import get_logger
from streamd.stages import Stage, parse_options
from streamd.stages.vlm.base import VlmRequest, VlmStale
from streamd.stages.vlm.modes import Caption, SummaryWindow, TagTimeline, captions_text
from streamd.stages.vlm.options import VlmOptions
from streamd.stages.vlm.prompting import frame_values, parse_tags, render, tags_instruction, tags_schema
from streamd.stages.vlm import live
from streamd.stages.vlm.single import ask_for_predict
from streamd.stages.vlm.triggers import Ask, StreamTriggers, crop

__all__ = ["Vlm", "VlmOptions", "clean_text", "fit_pixels"]

log = get_logger("streamd.stage.vlm")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONFIG_PROMPT = {"scope": "config", "version": 0}  # the version of the configured prompt (no store prompt)


def fit_pixels(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """Resize to at most `max_pixels` pixels, keeping the aspect ratio."""
    h, w = image.shape[:2]
    if w * h <= max_pixels:
        return image
    from PIL import Image

    scale = (max_pixels / (w * h)) ** 0.5
    im = Image.fromarray(np.ascontiguousarray(image)).resize((max(1, int(w * scale)), max(1, int(h * scale))),
                                                             Image.BILINEAR)
    return np.asarray(im)


def clean_text(text: str, limit: int) -> str:
    return _CONTROL.sub("", text or "")[:limit]


class Vlm(Stage):
    kind = "vlm"
    max_batch = 64
    prompt_kinds = ("vlm",)
    live_options = live.LIVE_OPTIONS  # what PATCH /api/v1/pipelines/{name} may change while it runs

    def __init__(self, cfg: StageConfig, opts: VlmOptions):
        super().__init__(cfg)
        self.opts = opts
        self.backend: Any = None
        self._owns_backend = False
        self._model: Any = None  # transformers: a streamd.models.ModelRef on the shared model
        self.serving: live.Serving | None = None  # set by setup(), replaced by a switch
        self._triggers: dict[str, StreamTriggers] = {}
        self._tags: dict[str, TagTimeline] = {}
        self._windows: dict[str, SummaryWindow] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._by_stream: dict[str, set[asyncio.Task[None]]] = {}  # tasks in flight per stream (jobs wait on them)
        self._coming: dict[str, int] = {}  # per job stream: frames room() let in that have not passed this stage
        self._room_changed = asyncio.Event()  # a task ended or a frame passed: room() looks again
        self._slots = asyncio.Semaphore(opts.max_in_flight)
        self.asked = 0
        self.answered = 0
        self.skipped = 0
        self.failed = 0

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Vlm":
        return cls(cfg, parse_options(VlmOptions, cfg, where))

    async def setup(self) -> None:
        o = self.opts
        if o.backend == "openai":
            from streamd.stages.vlm.openai import OpenAIBackend

            if not o.endpoints:
                raise StageError("the openai backend needs endpoints")
            self.backend = OpenAIBackend(o.model, o.endpoints, o.retry, o.timeout_s, o.jpeg_quality)
            self._owns_backend = True
        elif o.backend == "transformers":
            # closing the backend lets go of the model, which the manager unloads when idle
            self._model, self.backend = await live.managed_model(self, self.cfg, o)
            self._owns_backend = True
        else:
            from streamd.stages.vlm.sglang import SglangBackend

            self.backend = await asyncio.to_thread(SglangBackend, o.model)
            self._owns_backend = True
        self.serving = live.Serving(o, self._model, self.backend)

    # -- a live switch (streamd.streams.switch; streamd.stages.vlm.live) ----------------------------------------------
    @property
    def model(self) -> Any:
        """The handle on the model answering now (transformers: a streamd.models.ModelRef), else None."""
        return self._model

    async def prepare_switch(self, cfg: StageConfig) -> live.Serving:
        return await live.prepare(self, cfg)

    def switch(self, cfg: StageConfig, s: live.Serving) -> None:
        live.switch(self, cfg, s)

    def discard(self, s: live.Serving) -> None:
        live.discard(self, s)

    def install(self, s: live.Serving) -> None:
        self.serving, self.opts, self._model, self.backend = s, s.opts, s.model, s.backend

    def reset_triggers(self) -> None:
        self._triggers.clear()

    async def teardown(self) -> None:
        # let answers in flight finish (the daemon's grace period bounds this); partial windows are summarised
        while self._inflight or any(w.captions for w in self._windows.values()):
            await asyncio.gather(*self._inflight, return_exceptions=True)
            for sid in list(self._windows):
                self._flush_summary(sid)
        for sid in list(self._tags):
            self._close_tags(sid, "shutdown")
        if self.backend is not None and self._owns_backend:
            await self.backend.aclose()

    def reset_stream(self, stream_id: str) -> None:
        self._triggers.pop(stream_id, None)

    def forget_stream(self, stream_id: str) -> None:
        self.reset_stream(stream_id)
        self._coming.pop(stream_id, None)
        if stream_id.startswith(JOB_PREFIX) and self._by_stream.get(stream_id):
            # a job's last answers are still on their way: their captions join its last summary window first
            self._spawn(self._forget_later(stream_id), f"vlm-forget:{stream_id}", stream_id)
            return
        self._forget_now(stream_id)

    async def _forget_later(self, stream_id: str) -> None:
        me = asyncio.current_task()
        while others := [t for t in self._by_stream.get(stream_id, ()) if t is not me]:
            await asyncio.gather(*others, return_exceptions=True)
        self._forget_now(stream_id)

    def _forget_now(self, stream_id: str) -> None:
        self._close_tags(stream_id, "stream removed")
        self._flush_summary(stream_id)
        if self._model is not None:
            self._model.drop_stream(stream_id)  # the model may be unloaded once no stream uses it

    def _flush_summary(self, stream_id: str) -> None:
        win = self._windows.pop(stream_id, None)
        if win is not None and win.captions:
            self._spawn(self._summarise(stream_id, win.take()), f"vlm-summary:{stream_id}:last", stream_id)

    # -- deciding

    async def process(self, batch: list[Work]) -> list[Work]:
        if self._model is not None:  # these streams use the model: it stays loaded for them
            self._model.hold(w.frame.stream_id for w in batch)
        for w in batch:
            if "vlm" not in w.prompts:  # the configured prompt, stamped as detection stamps its configured vocabulary
                w.prompt_versions["vlm"] = dict(_CONFIG_PROMPT)
            if w.frame.predict:  # one image of a predict request: always asked, answered in its outputs
                ask_for_predict(self, w)
                continue
            asks = self._decide(w)
            w.outputs[self.name] = {"asked": bool(asks), **({"trigger": asks[0].trigger} if asks else {})}
            for ask in asks:
                f = ask.frames[-1]
                self._spawn(self._ask(w, ask, self.serving), f"vlm:{f.stream_id}:{f.seq}:{ask.trigger}", f.stream_id)
        return batch

    async def settle(self, stream_id: str) -> None:
        """Every question about the stream answered (or failed), its last summary included."""
        while tasks := self._by_stream.get(stream_id):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def room(self, stream_id: str, limit: int) -> None:
        """Until the stream has fewer than `limit` questions in flight, counting as one each frame let in here
        that has not reached this stage yet (it may become a question), then lets one more frame in (a job's
        feeder waits here: its frames are never skipped, so it must not outrun the model). Counting only the
        questions already asked let the feeder put a queue's worth of frames through meanwhile: more than
        `limit` questions at once, answered out of order."""
        while len(self._by_stream.get(stream_id, ())) + self._coming.get(stream_id, 0) >= limit:
            self._room_changed.clear()
            await self._room_changed.wait()
        self._coming[stream_id] = self._coming.get(stream_id, 0) + 1

    def passed(self, works: list[Work]) -> None:
        changed = False
        for w in works:
            sid = w.frame.stream_id
            n = self._coming.get(sid, 0)
            if n > 0:
                changed = True
                if n == 1:
                    del self._coming[sid]
                else:
                    self._coming[sid] = n - 1
        if changed:
            self._room_changed.set()

    def _prompt(self, w: Work) -> tuple[str, dict[str, Any] | None, Any]:
        rec = w.prompts.get("vlm")
        if rec is None:
            return self.opts.default_prompt(), self.opts.schema_, dict(_CONFIG_PROMPT)
        return rec.get("text") or self.opts.default_prompt(), rec.get("schema"), w.prompt_versions["vlm"]

    def _decide(self, w: Work) -> list[Ask]:
        f = w.frame
        trig = self._triggers.get(f.stream_id)
        if trig is None:
            trig = self._triggers[f.stream_id] = StreamTriggers(self.opts)
        asks: list[Ask] = []
        why = trig.frame_trigger(w, self._prompt(w)[2])
        if why is not None and self._room(w, asks):
            trig.asked()
            asks.append(Ask(why, list(trig.clip)))
        if self.opts.on_new_track:
            for t in trig.new_tracks(w):
                if self._room(w, asks):
                    trig.track_asked(t["track_id"])
                    asks.append(Ask("new_track", [f], track=t))
        return asks

    def _room(self, w: Work, asks: list[Ask]) -> bool:
        if w.frame.job:  # a job's questions wait for a slot instead (its feeder waits in room())
            return True
        if len(self._inflight) + len(asks) < self.opts.max_in_flight:
            return True
        self._skip(w.frame, "too many requests in flight")
        return False

    def _count(self, stream_id: str, outcome: str) -> None:
        if self.ctx.metrics is not None:  # predict images count together (one label, not one per request)
            label = PREDICT_PREFIX.rstrip(":") if stream_id.startswith(PREDICT_PREFIX) else stream_id
            self.ctx.metrics.vlm_questions.labels(label, self.name, outcome).inc()

    def _skip(self, f: Frame, reason: str) -> None:
        self.skipped += 1
        self._count(f.stream_id, "skipped")
        self.ctx.events(f.stream_id, "vlm_skipped", {"seq": f.seq, "reason": reason})

    # -- asking

    def _request(self, w: Work, ask: Ask) -> tuple[VlmRequest, Any]:
        o = self.opts
        text, schema, version = self._prompt(w)
        values = frame_values(w)
        if ask.track is not None:
            t = ask.track
            text = o.track_prompt
            values.update(label=t.get("label", "object"), track_id=t["track_id"],
                          confidence=f"{t.get('confidence', 0):.2f}")
            images = [crop(ask.frames[-1].image, t["box"], o.crop_padding)]
            schema = None
        else:
            images = [f.image for f in ask.frames]
        text = render(text, values)
        if o.mode in ("tags", "safety") and ask.track is None:
            text, schema = text + "\n" + tags_instruction(o.tags), tags_schema(o.tags)
        images = [fit_pixels(im, o.max_pixels) for im in images]
        return VlmRequest(images, text, schema, o.max_tokens, o.temperature,
                          stream_id=ask.frames[-1].stream_id, low=ask.frames[-1].job), version

    async def _ask(self, w: Work, ask: Ask, sv: live.Serving) -> None:
        """Ask with `sv`, the serving state when the question was decided (a switch since does not change it)."""
        f = ask.frames[-1]
        async with self._slots:
            if self._stale(f):
                return
            self.asked += 1
            req, version = await asyncio.to_thread(self._request, w, ask)
            if not f.job:  # a job's frame is never stale: it is analysed, not watched
                req.not_after = f.capture_ts + self.opts.staleness_s  # checked again where the backend queues it
            rec = self._record(f, ask, version, sv)
            try:
                await self._answer(req, rec, sv.backend)
            except VlmStale:  # its turn at the backend came too late
                self.asked -= 1
                self._skip(f, f"stale: {time.time() - f.capture_ts:.1f} s old")
                return
        if "text" in rec and ask.track is None:
            self._after(f, rec, req.schema)
        self._publish(f.stream_id, rec)

    def _stale(self, f: Frame) -> bool:
        """Skips the question about `f` (True) when the frame is older than `staleness_s` (never a job's)."""
        age = time.time() - f.capture_ts
        if age <= self.opts.staleness_s or f.job:
            return False
        self._skip(f, f"stale: {age:.1f} s old")
        return True

    def _record(self, f: Frame, ask: Ask, version: Any, sv: live.Serving) -> dict[str, Any]:
        rec: dict[str, Any] = {"schema_version": keys.SCHEMA_VERSION, "stream_id": f.stream_id, "seq": f.seq,
                               "pts_s": round(f.pts_s, 6), "capture_ts": round(f.capture_ts, 6),
                               "stage": self.name, "kind": "answer", "mode": self.opts.mode, "trigger": ask.trigger,
                               "prompt": version, "model": sv.opts.model}
        if sv.model_version is not None:
            rec["model_version"] = sv.model_version
        if len(ask.frames) > 1:
            rec["frames"] = [x.seq for x in ask.frames]
        if ask.track is not None:
            rec.update(kind="track", track_id=ask.track["track_id"], label=ask.track.get("label"),
                       box=ask.track.get("box"))
        return rec

    async def _answer(self, req: VlmRequest, rec: dict[str, Any], backend: Any = None) -> None:
        """Asks (`backend`, default the current one); fills the record with the answer or the error (a failed
        question is recorded, never fatal)."""
        t0 = time.perf_counter()
        try:
            ans = await (backend or self.backend).answer(req)
        except VlmStale:
            raise  # not asked: the caller skips it
        except Exception as e:  # noqa: BLE001
            self.failed += 1
            self._count(rec["stream_id"], "failed")
            rec.update(error=clean_text(str(e), 500), latency_ms=round((time.perf_counter() - t0) * 1000, 1))
            self.ctx.events(rec["stream_id"], "vlm_failed", {"seq": rec["seq"], "reason": rec["error"]})
            return
        self.answered += 1
        dt = time.perf_counter() - t0
        rec.update(endpoint=ans.endpoint, text=clean_text(ans.text, self.opts.max_text_chars),
                   latency_ms=round(dt * 1000, 1))
        if ans.tokens:
            rec["tokens"] = ans.tokens
        m = self.ctx.metrics
        if m is not None:
            self._count(rec["stream_id"], "answered")
            m.vlm_latency.labels(self.name).observe(dt)
            for kind, n in ans.tokens.items():
                m.vlm_tokens.labels(self.name, kind).inc(n)

    def _after(self, f: Frame, rec: dict[str, Any], schema: dict[str, Any] | None) -> None:
        """What the answer means beyond itself: parsed JSON, tag ranges, the summary window."""
        o = self.opts
        if o.mode in ("tags", "safety"):
            try:
                confs = parse_tags(rec["text"], o.tags)
            except (ValueError, TypeError) as e:
                rec["parse_error"] = str(e)[:200]
                return
            tl = self._tags.get(f.stream_id)
            if tl is None:
                tl = self._tags[f.stream_id] = TagTimeline(o.tag_thresholds, o.tag_threshold, o.tag_end_after_s)
            rec["tags"] = [{"tag": t, "confidence": round(c, 4)} for t, c in sorted(confs.items())]
            for kind, fields in tl.apply(f.seq, f.pts_s, f.capture_ts, confs):
                self.ctx.events(f.stream_id, kind, {**fields, "mode": o.mode})
            rec["active_tags"] = sorted(tl.active)
        elif o.mode == "summary":
            win = self._windows.get(f.stream_id)
            if win is None:
                win = self._windows[f.stream_id] = SummaryWindow(o.summary_every_s)
            due = win.add(Caption(f.seq, f.pts_s, f.capture_ts, rec["text"]))
            if due:
                self._spawn(self._summarise(f.stream_id, due), f"vlm-summary:{f.stream_id}:{f.seq}", f.stream_id)
        elif schema is not None:
            try:
                rec["parsed"] = json.loads(rec["text"])
            except ValueError as e:
                rec["parse_error"] = str(e)

    def _spawn(self, coro: Any, name: str, stream_id: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        mine = self._by_stream.setdefault(stream_id, set())
        mine.add(task)
        task.add_done_callback(lambda t: self._task_done(stream_id, t))

    def _task_done(self, stream_id: str, task: asyncio.Task[None]) -> None:
        mine = self._by_stream.get(stream_id)
        if mine is not None:
            mine.discard(task)
            if not mine:
                del self._by_stream[stream_id]
        self._room_changed.set()

    async def _summarise(self, stream_id: str, captions: list[Caption] | None) -> None:
        if not captions:
            return
        o = self.opts
        first, last = captions[0], captions[-1]
        rec: dict[str, Any] = {"schema_version": keys.SCHEMA_VERSION, "stream_id": stream_id, "seq": last.seq,
                               "pts_s": round(last.pts_s, 6), "capture_ts": round(last.ts, 6), "stage": self.name,
                               "kind": "summary", "mode": o.mode, "model": o.model,
                               "window": {"start_seq": first.seq, "end_seq": last.seq,
                                          "start_pts_s": round(first.pts_s, 6), "end_pts_s": round(last.pts_s, 6),
                                          "captions": len(captions)}}
        req = VlmRequest([], render(o.summary_prompt, {"captions": captions_text(captions)}), None,
                         o.summary_max_tokens, o.temperature)
        async with self._slots:
            await self._answer(req, rec)
        self._publish(stream_id, rec)

    def _close_tags(self, stream_id: str, reason: str) -> None:
        tl = self._tags.pop(stream_id, None)
        if tl is not None:
            for kind, fields in tl.close(reason):
                self.ctx.events(stream_id, kind, {**fields, "mode": self.opts.mode})

    def _publish(self, stream_id: str, rec: dict[str, Any]) -> None:
        rec["publish_ts"] = round(time.time(), 6)
        self.ctx.publish(keys.vlm_key(stream_id), self.opts.maxlen, rec)

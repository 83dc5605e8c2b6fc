"""One job: its frames from a source into a pipeline's ingress as the lower priority class, its results back.

Frames carry the job as their input's handle: the pipeline's deliver step hands each one back (`answer`) instead of
publishing it, and the stages' VLM records and events for the job's stream id (`_job:<id>`) are routed to it by the
manager. Records go to the job's Redis stream as they come; progress (frames and media time done / total, ETA)
moves monotonically; at the end the summary document is written with the job. A job is cancelled within a second:
its source is closed, frames still queued are discarded, results still on their way are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from streamd.batching import FrameQueue
from streamd.config import DropPolicy
from streamd.frames import JOB_PREFIX, Frame, InputRef, Work
from streamd.jobs.options import JobsConfig, JobSpec
from streamd.jobs.sources import JobSourceFailed
from streamd.jobs.store import JobStore, LeaseLost
from streamd.jobs.summary import Summary
from streamd.log import get_logger
from streamd.sampling import SceneSampler
from streamd.sinks.redis import result_record

log = get_logger("streamd.jobs")
TERMINAL = ("done", "failed", "cancelled")
MAX_PENDING = 20_000  # records a job holds while Redis does not take them; past it the job fails (memory stays bounded)
SAVE_EVERY_S = 0.5  # a running job's document (its progress) is written this often


def keyframe_jpeg(image: Any, width: int = 160) -> str:
    """A small JPEG of a frame, base64: a scene's representative keyframe in the summary."""
    import io

    from PIL import Image

    im = Image.fromarray(image)
    im.thumbnail((width, width))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    return base64.b64encode(buf.getvalue()).decode()


def tag_rules(pipeline: Any) -> dict[str, tuple[dict[str, float], float, float]]:
    """The tags/safety VLM stages of a pipeline: their thresholds, for the summary's tag ranges."""
    out = {}
    for st in pipeline.stages:
        o = getattr(st, "opts", None)
        if st.kind == "vlm" and getattr(o, "mode", None) in ("tags", "safety"):
            out[st.name] = (dict(o.tag_thresholds), o.tag_threshold, o.tag_end_after_s)
    return out


class Job:
    def __init__(self, jid: str, spec: JobSpec, source_doc: dict[str, Any], cfg: JobsConfig, store: JobStore,
                 prompts: dict[str, dict[str, Any]]):
        self.id = jid
        self.sid = f"{JOB_PREFIX}{jid}"
        self.spec = spec
        self.cfg = cfg
        self.store = store
        self.prompts = prompts  # kind -> the prompt record this job's frames use (a stored version or inline)
        self.state = "queued"
        self.reason: str | None = None
        self.reason_code: str | None = None
        self.created_ts = time.time()
        self.started_ts: float | None = None
        self.ended_ts: float | None = None
        self.source_doc = source_doc
        self.source: Any = None  # set by the manager before run(): RecordedSource or StoredSource
        self.upload_path: str | None = None  # an uploaded file, removed at the end
        self.stream_id: str | None = source_doc.get("stream")  # re-score: the stream whose frames these are
        self.summary = Summary()
        self.fed = 0  # frames put into the pipeline
        self.looked_at = 0  # frames the source gave (before scene sampling)
        self.done_frames = 0
        self.media_done_s = 0.0
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._media_at: dict[int, float] = {}  # seq -> media time (the source's MediaClock) of frames on their way
        self.token = ""  # its lease's value (`<member>|<random>`), set by the manager
        self.daemon: str | None = None  # the member running it
        self.attempt = 1
        self.lost: list[dict[str, Any]] = []  # earlier attempts whose daemon was lost
        self.lease_lost = False  # another daemon holds its lease: nothing more is written from here

    # -- the handle frames carry --------------------------------------------------------------------------------
    def prompt(self, kind: str) -> dict[str, Any] | None:
        """The prompt record of `kind` this job's frames use (None: the usual resolution)."""
        return self.prompts.get(kind)

    def answer(self, w: Work) -> None:
        """From the pipeline's deliver step: a frame left the last stage."""
        if self.state != "running":
            return  # cancelled: what was still on its way is ignored
        rec = result_record(w)
        rec.pop("input", None)
        rec.update(type="frame", job_id=self.id, stream_id=self.stream_id, attempt=self.attempt)
        self.summary.frame(rec)
        self.done_frames += 1
        media_s = self._media_at.pop(w.frame.seq, None)
        if media_s is not None:
            self.media_done_s = max(self.media_done_s, media_s)
        self._push(rec)

    def vlm(self, rec: dict[str, Any]) -> None:
        """A VLM record of the job's stream id (routed by the manager)."""
        if self.state != "running":
            return
        rec = {**rec, "type": "vlm", "job_id": self.id, "stream_id": self.stream_id, "attempt": self.attempt}
        self.summary.vlm(rec)
        self._push(rec)

    def _push(self, rec: dict[str, Any]) -> None:
        self._pending.append(rec)
        self._wake.set()
        if len(self._pending) > MAX_PENDING and self.state == "running":
            self._fail(f"Redis has not taken the job's records: {len(self._pending)} wait, more than "
                       f"{MAX_PENDING}", "redis_unavailable")
            self.cancelled.set()  # stop feeding it: what it holds is bounded

    # -- the document -------------------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        total_s = getattr(self.source, "duration_s", None)
        done_s = self.media_done_s
        if self.state == "done":
            total_s = done_s if total_s is None else max(total_s, done_s)
            frac = 1.0
        elif total_s:
            frac = min(0.999, done_s / total_s)
        else:
            frac = 0.0
        frames_total: int | None = getattr(self.source, "total", None)  # stored frames: known at the start
        if self.state == "done":
            frames_total = self.done_frames
        elif frames_total is None and total_s and self.spec.sampling.mode == "fps":
            frames_total = max(self.fed, int(total_s * self.spec.sampling.fps) + 1)
        elif frames_total is None and total_s and done_s > 0:  # every frame, scene: estimated from the rate so far
            frames_total = max(self.fed, round(self.done_frames * total_s / done_s))
        eta = None
        if self.state == "running" and self.started_ts is not None and frac > 0:
            eta = round((time.time() - self.started_ts) * (1 - frac) / frac, 3)
        return {"fraction": round(frac, 4), "frames_done": self.done_frames, "frames_total": frames_total,
                "frames_looked_at": self.looked_at, "media_s_done": round(done_s, 3),
                "media_s_total": round(total_s, 3) if total_s else None, "eta_s": eta}

    def document(self, summary: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id, "state": self.state, "reason": self.reason, "reason_code": self.reason_code,
            "pipeline": self.spec.pipeline, "source": self.source_doc,
            "sampling": self.spec.sampling.model_dump(), "max_duration_s": self.spec.max_duration_s,
            "live": getattr(self.source, "live", False),
            "unknown_length": getattr(self.source, "unknown_length", False),
            "prompts": {k: {"scope": v["scope"], "version": v["version"]} for k, v in self.prompts.items()},
            "created_ts": round(self.created_ts, 6), "started_ts": self.started_ts, "ended_ts": self.ended_ts,
            "progress": self.progress(), "daemon": self.daemon, "attempt": self.attempt, "lost": self.lost,
        }
        if summary and self.state == "done":
            doc["summary"] = self.summary.document()
        return doc

    async def save(self, new: bool = False) -> None:
        """The document to Redis under the job's lease (nothing when another daemon holds it now)."""
        if self.lease_lost:
            return
        try:
            await self.store.save(self.document(summary=self.state == "done"), self.token, new=new)
        except LeaseLost:
            self.lose()

    def lose(self) -> None:
        """Another daemon took the job's lease (this one was paused or cut off past jobs.lease_ttl_s): it stops
        here at once and writes nothing more (the other runs it again or ends it)."""
        if not self.lease_lost:
            log.warning("job lease lost: another daemon has the job", job=self.id)
        self.lease_lost = True
        if self.state not in TERMINAL:
            self.state, self.reason, self.reason_code = "cancelled", "another daemon took the job over", "lease_lost"
            self.ended_ts = round(time.time(), 6)
        self.cancelled.set()

    # -- running --------------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        if self.state in TERMINAL:
            return
        self.state, self.reason, self.reason_code = "cancelled", "cancelled through the API", "cancelled"
        self.ended_ts = round(time.time(), 6)
        self.cancelled.set()

    async def _frames(self) -> AsyncIterator[Frame]:
        """The source's frames the job keeps (scene sampling), as frames of the job's stream id."""
        s = self.spec.sampling
        scene = SceneSampler(s.scene_threshold, s.min_fps, s.max_fps) if s.mode == "scene" else None
        async for f in self.source.frames():
            self.looked_at += 1
            if scene is not None:
                d = scene.offer(f.pts_s, f.image)
                if not d.keep:
                    continue
                if d.cut:
                    self.summary.cut(f.seq, f.pts_s, d.change, await asyncio.to_thread(keyframe_jpeg, f.image))
            # progress counts media time as the source's bound does (its MediaClock: from the first frame, across a
            # PTS reset or wrap), taken when the frame's result comes back
            if len(self._media_at) >= MAX_PENDING:
                self._media_at.pop(next(iter(self._media_at)))  # a frame never answered: bounded all the same
            self._media_at[f.seq] = self.source.media_s
            yield dataclasses.replace(f, stream_id=self.sid, ref=InputRef("_job", self.id, str(f.seq), handle=self))

    async def run(self, pipeline: Any, pipeline_task: asyncio.Task[None]) -> None:
        """Feed the job's frames into `pipeline` (running as `pipeline_task`), wait for every result, write the
        summary. Never raises: the job ends done, failed or cancelled."""
        if self.state in TERMINAL:  # cancelled while it waited for its start (a re-score's earlier answers)
            try:
                await self.save()
            except Exception as e:  # noqa: BLE001 - Redis down: the in-memory document still answers
                log.warning("could not save a job", job=self.id, error=str(e))
            self.finished.set()
            return
        self.state, self.started_ts = "running", round(time.time(), 6)
        self.summary.tag_rules = tag_rules(pipeline)
        try:
            await self.save()
        except Exception as e:  # noqa: BLE001 - Redis down at the start: the writer saves it again later
            log.warning("could not save a job", job=self.id, error=str(e))
        q: FrameQueue[Frame] = FrameQueue(self.cfg.queue_size, DropPolicy.WAIT, asyncio.get_running_loop())
        ended = pipeline.attach(self.sid, q, low=True)
        writer = asyncio.create_task(self._write(), name=f"job:{self.id}:write")
        feeder = asyncio.create_task(self._feed(pipeline, q), name=f"job:{self.id}:feed")
        stop = asyncio.ensure_future(self.cancelled.wait())
        try:
            await asyncio.wait({feeder, stop, pipeline_task}, return_when=asyncio.FIRST_COMPLETED)
            if not feeder.done():
                feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            if self.state == "cancelled":
                while q.get_nowait() is not None:
                    pass  # queued frames never enter
            q.close()
            if self.state == "running":
                await asyncio.wait({ended, pipeline_task, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not ended.done() and self.state == "running":
                    self._fail("the pipeline stopped before the job's frames were through", "pipeline_stopped")
            if self.state == "running":
                settle = asyncio.ensure_future(pipeline.settle(self.sid))
                await asyncio.wait({settle, stop}, return_when=asyncio.FIRST_COMPLETED)
                settle.cancel()
            if self.state == "running":
                self.state, self.ended_ts = "done", round(time.time(), 6)
                if getattr(self.source, "bounded", False):  # it says where it stopped
                    self.reason, self.reason_code = (f"stopped at max_duration_s ({self.spec.max_duration_s:g} s "
                                                     "of media)", "max_duration")
                elif getattr(self.source, "capped", False):
                    self.reason, self.reason_code = (
                        f"stopped at jobs.unknown_length_cap_s ({self.source.cap_s:g} s of media): the source's "
                        "length is unknown (no Content-Length) and it had not ended; set max_duration_s (at most "
                        "the cap) to analyse a slice of it", "unknown_length_cap")
        except Exception as e:  # noqa: BLE001 - a job's bug ends the job, never the daemon
            log.exception("job crashed", job=self.id)
            self._fail(f"internal error: {type(e).__name__}: {e}", "internal")
        finally:
            stop.cancel()
            self.cancelled.set()  # the writer's last round
            await asyncio.gather(writer, return_exceptions=True)
            try:
                await self._flush()
                await self.save()
            except Exception as e:  # noqa: BLE001 - Redis down at the end: the in-memory document still answers
                log.warning("could not save a job", job=self.id, error=str(e))
            self.finished.set()
            log.info("job ended", job=self.id, state=self.state, frames=self.done_frames, reason=self.reason)

    def discard(self) -> None:
        """The job is over (or will never run): its uploaded file goes."""
        path, self.upload_path = self.upload_path, None
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _fail(self, reason: str, code: str) -> None:
        if self.state not in TERMINAL:
            self.state, self.reason, self.reason_code = "failed", reason, code
            self.ended_ts = round(time.time(), 6)

    async def _feed(self, pipeline: Any, q: FrameQueue[Frame]) -> None:
        try:
            ready = asyncio.ensure_future(pipeline.ready.wait())
            await ready
            async for f in self._frames():
                await pipeline.room(self.sid, self.cfg.max_vlm_in_flight)
                await q.put(f)
                self.fed += 1
        except JobSourceFailed as e:
            self._fail(e.reason, e.code)
        finally:
            await self.source.aclose()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch and not self.lease_lost:
            try:
                await self.store.add_records(self.id, batch, self.token)
            except LeaseLost:
                self.lose()
            except BaseException:
                self._pending[:0] = batch  # not written: tried again (a Redis blip loses no record)
                raise

    async def _write(self) -> None:
        """Records to Redis as they come; the document (progress) every SAVE_EVERY_S."""
        last = 0.0
        while not self.cancelled.is_set() or self._pending:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), SAVE_EVERY_S)
            except TimeoutError:
                pass
            try:
                await self._flush()
                if time.monotonic() - last >= SAVE_EVERY_S and self.state == "running":
                    if await self.store.cancel_requested(self.id):  # DELETE answered by another daemon
                        self.cancel()
                        continue
                    await self.save()
                    last = time.monotonic()
            except Exception as e:  # noqa: BLE001 - Redis down: records stay pending, tried again
                log.warning("could not write a job's records", job=self.id, error=str(e))
                await asyncio.sleep(0.5)
            if self.cancelled.is_set() and self.state != "running":
                return

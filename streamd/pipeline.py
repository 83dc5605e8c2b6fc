"""A pipeline: stages run as coroutines joined by bounded queues, serving many streams at once.

   stream queues ──► Ingress (round-robin fan-in) ──► stage 1 ──► queue ──► stage 2 ──► ... ──► sink

Frames of all streams meet in the first stage, so batches span streams; no stream waits for another (the fan-in
takes whatever is ready). A stage that fails on a batch marks those frames failed; they skip the later stages
and the sink settles them (a Redis input entry is retried, then dead-lettered). A stream's closed queue sends an
`EndOfStream` marker after its last frame; it passes every stage in order, and when it reaches the end the stages
forget the stream and `attach`'s future resolves. Closing the ingress drains the pipeline in order, stage by stage,
through sentinels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streamd.batching import Ingress, QueueClosed, StageQueue
from streamd.config import PipelineConfig
from streamd.frames import EndOfStream, Frame, Work
from streamd.log import get_logger, redact_text
from streamd.metrics import Metrics
from streamd.stages import Stage

log = get_logger("streamd.pipeline")

Deliver = Callable[[list[Work]], Awaitable[None]]


class Pipeline:
    def __init__(self, name: str, cfg: PipelineConfig, stages: list[Stage], deliver: Deliver, metrics: Metrics):
        self.name = name
        self.cfg = cfg
        self.stages = stages
        self._deliver = deliver
        self._metrics = metrics
        self.ingress: Ingress[Frame] = Ingress()
        self._queues = [StageQueue[Work](cfg.queue_size) for _ in stages]  # output queue of each stage
        self.ready = asyncio.Event()
        self.prompt_kinds = sorted({k for st in stages for k in st.prompt_kinds})
        self.prompts: Any = None  # PromptCache, when the daemon has one
        self._ends: dict[Any, tuple[str, asyncio.Future[None]]] = {}  # stream queue -> (stream, its end future)
        self.busy_s: dict[str, float] = {st.name: 0.0 for st in stages}  # seconds each stage spent processing
        self.busy_since: dict[str, float | None] = {st.name: None for st in stages}  # the batch in progress's start
        self.failed: str | None = None  # a job's own pipeline (PipelineSet.start_for_job): why it stopped early

    def attach(self, stream_id: str, queue: Any, low: bool = False) -> asyncio.Future[None]:
        """Read the stream's frames from `queue` (`low`: a job's, the ingress's lower priority class). The future
        resolves once the queue was closed and every frame of it has left the last stage (the stages forgot the
        stream by then, unless a new queue of the same stream id was attached meanwhile), or when the pipeline
        stops."""
        fut = asyncio.get_running_loop().create_future()
        self._ends[queue] = (stream_id, fut)
        self.ingress.attach(stream_id, queue, low)
        return fut

    async def settle(self, stream_id: str) -> None:
        """Wait for work the stages still do for a stream whose frames are through (a VLM's answers in flight)."""
        for st in self.stages:
            await st.settle(stream_id)

    async def room(self, stream_id: str, limit: int) -> None:
        """Wait until no stage holds `limit` or more pieces of the stream's work beyond its frames."""
        for st in self.stages:
            await st.room(stream_id, limit)

    def detach(self, queue: Any) -> None:
        """A stream queue whose frames never entered (the pipeline was not set up yet): forget it now."""
        self.ingress.detach(queue)
        self._ended(queue)

    def _ended(self, queue: Any) -> None:
        sid, fut = self._ends.pop(queue, (None, None))
        if sid is None:
            return
        if not any(other == sid for other, _ in self._ends.values()):
            self.forget_stream(sid)  # no newer queue of this stream id is on its way
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def run(self) -> None:
        """Set the stages up, run until the ingress is closed and everything queued has been delivered."""
        for st in self.stages:
            await st.setup()
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                for i, st in enumerate(self.stages):
                    tg.create_task(self._stage_loop(i, st), name=f"{self.name}:{st.name}")
                tg.create_task(self._deliver_loop(), name=f"{self.name}:deliver")
        finally:
            for _, fut in self._ends.values():
                if not fut.done():
                    fut.set_result(None)
            self._ends.clear()
            for st in self.stages:
                try:
                    await st.teardown()
                except Exception as e:  # noqa: BLE001 - teardown errors are logged, the others still run
                    log.error("stage teardown failed", pipeline=self.name, stage=st.name, error=str(e))

    def busy_until(self, name: str, now: float) -> float:
        """Seconds stage `name` has spent processing up to `now` (time.perf_counter()), the batch in progress
        included: a stage working on one long batch counts as busy before the batch is done."""
        since = self.busy_since.get(name)
        return self.busy_s.get(name, 0.0) + (max(0.0, now - since) if since is not None else 0.0)

    def forget_stream(self, stream_id: str) -> None:
        for st in self.stages:
            st.forget_stream(stream_id)

    async def _get(self, i: int, st: Stage) -> list[Work | EndOfStream]:
        wait_s = st.max_wait_ms / 1000.0
        if i == 0:
            items = await self.ingress.get_batch(st.max_batch, wait_s)
            now = time.time()
            out: list[Work | EndOfStream] = [
                it if isinstance(it, EndOfStream) else
                Work(it, timings_ms={"queue": round((now - it.capture_ts) * 1000.0, 3)}) for it in items]
            if self.prompt_kinds and self.prompts is not None:
                self._stamp_prompts([w for w in out if isinstance(w, Work)])
            return out
        return await self._queues[i - 1].get_batch(st.max_batch, wait_s)

    def _stamp_prompts(self, works: list[Work]) -> None:
        """Each frame carries the prompts current when it entered the pipeline: a switch happens between two
        frames, never inside one, and every stage of a frame uses the same version."""
        for w in works:
            ref = w.frame.ref
            own = getattr(ref.handle, "prompt", None) if ref is not None else None  # a job's own prompt versions
            for kind in self.prompt_kinds:
                rec = own(kind) if own is not None else None
                if rec is None:
                    rec = self.prompts.resolve(kind, w.frame.stream_id, self.name)
                if rec is not None:
                    w.prompts[kind] = rec
                    w.prompt_versions[kind] = {"scope": rec["scope"], "version": rec["version"]}

    async def _stage_loop(self, i: int, st: Stage) -> None:
        out = self._queues[i]
        counts = type(st).passed is not Stage.passed  # a stage that counts frames through it (room())
        latency, sizes = self._metrics.stage_latency.labels(st.name), self._metrics.batch_size.labels(st.name)
        while True:
            try:
                batch = await self._get(i, st)
            except QueueClosed:
                await out.close()
                return
            todo = [w for w in batch if isinstance(w, Work) and w.error is None]
            if todo:
                for w in todo:
                    if w.frame.discontinuity:
                        st.reset_stream(w.frame.stream_id)
                t0 = time.perf_counter()
                self.busy_since[st.name] = t0
                try:
                    await st.process(todo)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - a failing batch must not stop the pipeline
                    reason = redact_text(f"stage {st.name}: {type(e).__name__}: {e}")
                    log.error("stage failed on a batch", pipeline=self.name, stage=st.name, error=reason,
                              frames=len(todo))
                    for w in todo:
                        w.error = reason
                dt = time.perf_counter() - t0
                self.busy_s[st.name] = self.busy_s.get(st.name, 0.0) + dt
                self.busy_since[st.name] = None
                latency.observe(dt)
                sizes.observe(len(todo))
                ms = round(dt * 1000.0, 3)
                for w in todo:
                    w.timings_ms[st.name] = ms
            if counts:  # failed frames too: they never come back
                st.passed([w for w in batch if isinstance(w, Work)])
            for w in batch:
                await out.put(w)

    async def _deliver_loop(self) -> None:
        last = self._queues[-1]
        while True:
            try:
                batch = await last.get_batch(256)
            except QueueClosed:
                return
            works = [w for w in batch if isinstance(w, Work)]
            try:
                if works:
                    await self._deliver(works)
            finally:
                for w in batch:  # a marker follows its stream's last frame: delivered above or before
                    if isinstance(w, EndOfStream):
                        self._ended(w.queue)

"""A pipeline: stages run as coroutines joined by bounded queues, serving many streams at once.

   stream queues ──► Ingress (round-robin fan-in) ──► stage 1 ──► queue ──► stage 2 ──► ... ──► sink

Frames of all streams meet in the first stage, so batches span streams; no stream waits for another (the fan-in
takes whatever is ready). A stage that fails on a batch marks those frames failed; they skip the later stages
and the sink settles them (a Redis input entry is retried, then dead-lettered). Closing the ingress drains the
pipeline in order, stage by stage, through sentinels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streamd.batching import Ingress, QueueClosed, StageQueue
from streamd.config import PipelineConfig
from streamd.frames import Frame, Work
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
        self._in_flight: dict[str, int] = {}  # stream -> frames between the ingress and the sink

    def in_flight(self, stream_id: str) -> int:
        """Frames of this stream inside the pipeline (taken from its queue, not yet delivered)."""
        return self._in_flight.get(stream_id, 0) + self.ingress.holding(stream_id)

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
            for st in self.stages:
                try:
                    await st.teardown()
                except Exception as e:  # noqa: BLE001 - teardown errors are logged, the others still run
                    log.error("stage teardown failed", pipeline=self.name, stage=st.name, error=str(e))

    def forget_stream(self, stream_id: str) -> None:
        for st in self.stages:
            st.forget_stream(stream_id)

    async def _get(self, i: int, st: Stage) -> list[Work]:
        wait_s = st.max_wait_ms / 1000.0
        if i == 0:
            frames = await self.ingress.get_batch(st.max_batch, wait_s)
            for f in frames:
                self._in_flight[f.stream_id] = self._in_flight.get(f.stream_id, 0) + 1
            now = time.time()
            works = [Work(f, timings_ms={"queue": round((now - f.capture_ts) * 1000.0, 3)}) for f in frames]
            if self.prompt_kinds and self.prompts is not None:
                self._stamp_prompts(works)
            return works
        return await self._queues[i - 1].get_batch(st.max_batch, wait_s)

    def _stamp_prompts(self, works: list[Work]) -> None:
        """Each frame carries the prompts current when it entered the pipeline: a switch happens between two
        frames, never inside one, and every stage of a frame uses the same version."""
        for w in works:
            for kind in self.prompt_kinds:
                rec = self.prompts.resolve(kind, w.frame.stream_id, self.name)
                if rec is not None:
                    w.prompts[kind] = rec
                    w.prompt_versions[kind] = {"scope": rec["scope"], "version": rec["version"]}

    async def _stage_loop(self, i: int, st: Stage) -> None:
        out = self._queues[i]
        latency, sizes = self._metrics.stage_latency.labels(st.name), self._metrics.batch_size.labels(st.name)
        while True:
            try:
                batch = await self._get(i, st)
            except QueueClosed:
                await out.close()
                return
            todo = [w for w in batch if w.error is None]
            if todo:
                for w in todo:
                    if w.frame.discontinuity:
                        st.reset_stream(w.frame.stream_id)
                t0 = time.perf_counter()
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
                latency.observe(dt)
                sizes.observe(len(todo))
                ms = round(dt * 1000.0, 3)
                for w in todo:
                    w.timings_ms[st.name] = ms
            for w in batch:
                await out.put(w)

    async def _deliver_loop(self) -> None:
        last = self._queues[-1]
        while True:
            try:
                batch = await last.get_batch(256)
            except QueueClosed:
                return
            try:
                await self._deliver(batch)
            finally:
                for w in batch:
                    sid = w.frame.stream_id
                    left = self._in_flight.get(sid, 1) - 1
                    if left > 0:
                        self._in_flight[sid] = left
                    else:
                        self._in_flight.pop(sid, None)

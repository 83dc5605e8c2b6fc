"""Single images through a running pipeline (POST /api/v1/predict/{pipeline}), batched with its live frames.

Each pipeline that has answered a predict request has one `PredictQueue`: a bounded FrameQueue attached to the
pipeline's ingress under the key `_predict`, beside the streams' queues, so an image meets live frames in the
same stage batches and the same shared model batcher. Each image is a frame of a stream of its own
(`_predict:<n>`, seq 0): stateful stages see the first frame of a new stream (the tracker gives its first-frame
tracks and keeps nothing, publishing no events); once it has left the last stage the pipeline's deliver step hands
it to its queue (`frame.ref.handle.answer`) instead of the sink, which resolves the request's future and makes the
stages forget the stream (the model no longer counts it as a user). Nothing is written to Redis.

Load shedding: a queue holds at most `api.predict.queue_size` images (queued or in the stages); one more is refused
at once (`Overloaded`) with a retry time from the measured service rate (images in flight / answers per second of
busy time, at least 1 s). A request that stops waiting (timeout, client gone) cancels its future; its frame goes
on through the stages and still counts until it is out, so the bound holds for the work really queued.

Pipelines with a `vlm` stage answer too: for a predict image the stage always asks (trigger `predict`) and leaves the
question's task in `Work.carry[AWAITING]` (streamd/stages/vlm/single.py); the answer goes into the image's outputs
and the request is answered once it is in, while live frames of the same batch go on at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamd import pipelines as pipeline_files
from streamd.batching import FrameQueue
from streamd.config import DropPolicy, PredictConfig
from streamd.errors import StreamdError
from streamd.frames import AWAITING, PREDICT_PREFIX, Frame, InputRef, Work
from streamd.metrics import Metrics
from streamd.pipeline import Pipeline

QUEUE_KEY = "_predict"  # the predict queue's key in a pipeline's ingress (never a stream id)
MAX_RETRY_AFTER_S = 300


class PredictError(StreamdError):
    """A predict request that cannot be answered; the API maps each kind to its code."""


class Overloaded(PredictError):
    def __init__(self, pipeline: str, in_flight: int, bound: int, retry_after_s: int):
        super().__init__(f"pipeline {pipeline!r} holds {in_flight} predict images, its bound "
                         f"(api.predict.queue_size {bound}); try again in {retry_after_s} s")
        self.in_flight, self.bound, self.retry_after_s = in_flight, bound, retry_after_s


class PipelineFailed(PredictError):
    def __init__(self, pipeline: str, reason: str):
        super().__init__(reason)
        self.reason = reason


class PredictUnavailable(PredictError):
    """The pipeline stopped before answering (the daemon is stopping), or the daemon does not run."""


class PredictTimeout(PredictError):
    def __init__(self, pipeline: str, timeout_s: float, retry_after_s: int):
        super().__init__(f"no answer from pipeline {pipeline!r} within api.predict.timeout_s ({timeout_s:g} s)")
        self.retry_after_s = retry_after_s


class ServiceRate:
    """Answers per second of busy time (time with an image in flight, the pipeline set up), exponentially smoothed
    over `tau_s` seconds of busy time: idle spells, and the wait for a model's first load, neither count nor age the
    measurement."""

    def __init__(self, tau_s: float = 10.0):
        self.tau_s = tau_s
        self._answers = 0.0  # decayed count
        self._busy_s = 0.0  # decayed busy seconds
        self._t: float | None = None  # the last event of the current busy spell (None: idle)

    def _advance(self, now: float) -> None:
        if self._t is not None:
            dt = max(0.0, now - self._t)
            decay = math.exp(-dt / self.tau_s)
            self._answers *= decay
            self._busy_s = self._busy_s * decay + self.tau_s * (1.0 - decay)  # busy all along dt
            self._t = now

    def started(self, now: float) -> None:
        """An image entered a set-up pipeline: from an idle state, busy time counts from now."""
        if self._t is None:
            self._t = now

    def answered(self, now: float, idle: bool) -> None:
        if self._t is None:  # its images entered while the pipeline was being set up: measured from now on
            if not idle:
                self._t = now
            return
        self._advance(now)
        self._answers += 1.0
        if idle:
            self._t = None

    def per_s(self, now: float) -> float | None:
        """Answers per second of busy time; None before the first answer."""
        self._advance(now)
        if self._answers <= 0 or self._busy_s <= 0:
            return None
        return self._answers / self._busy_s

    def wait_s(self, in_flight: int, now: float) -> int:
        """Seconds until `in_flight` images are likely answered: at least 1; before any answer, at least as long
        as it has been busy without one."""
        rate = self.per_s(now)
        if rate is None:
            est = self._busy_s
        else:
            est = in_flight / rate
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(est))))


class PredictQueue:
    """One pipeline's predict images: the queue in its ingress and the requests waiting for their answers."""

    def __init__(self, pipeline: Pipeline, bound: int, metrics: Metrics):
        self.pipeline = pipeline
        self.bound = bound
        self.queue: FrameQueue[Frame] = FrameQueue(bound, DropPolicy.WAIT, asyncio.get_running_loop())
        self.rate = ServiceRate()
        self._waiting: dict[str, tuple[asyncio.Future[Work], float]] = {}  # stream id -> (future, perf_counter)
        self._ids = itertools.count()
        self._finishing: set[asyncio.Future[None]] = set()  # answers waiting for a stage's later part (VLM)
        self._depth = metrics.predict_queue_depth.labels(pipeline.name)
        self._latency = metrics.predict_latency.labels(pipeline.name)
        self._rejected = metrics.predict_rejections.labels(pipeline.name)
        pipeline.attach(QUEUE_KEY, self.queue)

    def __len__(self) -> int:
        """Images in flight: queued, or in the stages."""
        return len(self._waiting)

    def refuse_if_full(self) -> None:
        if len(self._waiting) >= self.bound:
            self._rejected.inc()
            raise Overloaded(self.pipeline.name, len(self._waiting), self.bound, self.retry_after_s())

    def retry_after_s(self) -> int:
        return self.rate.wait_s(len(self._waiting), time.monotonic())

    async def submit(self, image: np.ndarray) -> tuple[str, asyncio.Future[Work]]:
        """Queue one image (HxWx3 uint8 RGB); its answer is the future's result. Raises Overloaded when full."""
        self.refuse_if_full()
        sid = f"{PREDICT_PREFIX}{next(self._ids)}"
        fut: asyncio.Future[Work] = asyncio.get_running_loop().create_future()
        self._waiting[sid] = (fut, time.perf_counter())
        if self.pipeline.ready.is_set():
            self.rate.started(time.monotonic())
        self._depth.set(len(self._waiting))
        ref = InputRef(QUEUE_KEY, self.pipeline.name, sid, handle=self)
        await self.queue.put(Frame(sid, 0, 0.0, time.time(), image, ref=ref))  # never waits: room was checked
        return sid, fut

    def answer(self, w: Work) -> None:
        """From the pipeline's deliver step: the image left the last stage (failed or not). A stage that answers
        later (a VLM question) left its task in `w.carry[AWAITING]`: the request is answered once those end."""
        awaiting = w.carry.pop(AWAITING, None)
        if awaiting:
            task = asyncio.ensure_future(self._answer_after(w, awaiting))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            return
        self._answer(w)

    async def _answer_after(self, w: Work, awaiting: list[asyncio.Future[Any]]) -> None:
        for res in await asyncio.gather(*awaiting, return_exceptions=True):
            if isinstance(res, BaseException) and w.error is None:
                w.error = f"{type(res).__name__}: {res}"[:500]
        self._answer(w)

    def _answer(self, w: Work) -> None:
        sid = w.frame.stream_id
        fut, t0 = self._waiting.pop(sid, (None, 0.0))
        self.rate.answered(time.monotonic(), idle=not self._waiting)
        self._depth.set(len(self._waiting))
        self.pipeline.forget_stream(sid)  # what stages kept for it (the model's users) goes
        if fut is not None and not fut.done():  # done: cancelled, the request stopped waiting
            self._latency.observe(time.perf_counter() - t0)
            fut.set_result(w)

    def close(self) -> None:
        """The pipeline is gone: nothing will be answered."""
        for fut, _ in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        self._depth.set(0)


class Predictor:
    """The predict queues of a daemon's pipelines, by pipeline name. `start_pipeline(name, where)` (the stream
    manager's) returns the running pipeline, starting it if none runs; `pipelines` is the PipelineSet."""

    def __init__(self, manager: Any, cfg: PredictConfig, metrics: Metrics):
        self._manager = manager
        self.cfg = cfg
        self._metrics = metrics
        self._queues: dict[str, PredictQueue] = {}
        self.requests = 0  # requests between their first body byte and their answer, every pipeline together

    @contextlib.contextmanager
    def request(self, name: str) -> Iterator[None]:
        """Hold one of the daemon's `max_requests` places for a request while its body is read, decoded and
        answered. Overloaded (before anything is read) when none is free."""
        if self.requests >= self.cfg.max_requests:
            self._metrics.predict_rejections.labels(name).inc()
            raise Overloaded(name, self.requests, self.cfg.max_requests, 1)
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1

    def queue(self, name: str) -> PredictQueue | None:
        return self._queues.get(name)

    def refuse_if_full(self, name: str) -> None:
        """Before a request's body is read: Overloaded if the pipeline's predict queue is full already."""
        q = self._queues.get(name)
        if q is not None and self._alive(q):
            q.refuse_if_full()

    def check(self, name: str) -> None:
        """ConfigError for an unknown pipeline or one whose file is invalid."""
        pipeline_files.resolve(self._manager.cfg, name, "predict")

    def _alive(self, q: PredictQueue) -> bool:
        task = self._manager.pipelines.task(q.pipeline)
        return task is not None and not task.done()

    def _queue(self, name: str) -> PredictQueue:
        q = self._queues.get(name)
        if q is not None and self._alive(q):
            return q
        if q is not None:
            q.close()
        self.check(name)
        p = self._manager.start_pipeline(name, "predict")
        q = self._queues[name] = PredictQueue(p, self.cfg.queue_size, self._metrics)
        return q

    async def predict(self, name: str, image: np.ndarray) -> Work:
        """The image's Work once it has passed every stage of pipeline `name` (started if it is not running).
        Raises ConfigError, Overloaded, PipelineFailed (its setup failed), PredictUnavailable
        (it stopped), PredictTimeout. A stage's failure is the Work's `error`."""
        q = self._queue(name)
        task = self._manager.pipelines.task(q.pipeline)
        if task is None:
            raise PredictUnavailable(f"pipeline {name!r} is not running")
        _, fut = await q.submit(image)
        try:
            await asyncio.wait({fut, task}, timeout=self.cfg.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if fut.done() and not fut.cancelled():
                return fut.result()
            if task.done():
                reason = self._manager.pipelines.errors.get(name)
                if reason is not None:
                    raise PipelineFailed(name, reason)
                raise PredictUnavailable(f"pipeline {name!r} stopped before answering")
            if fut.cancelled():  # its queue was closed: the pipeline is gone
                raise PredictUnavailable(f"pipeline {name!r} stopped before answering")
            raise PredictTimeout(name, self.cfg.timeout_s, q.retry_after_s())
        finally:
            if not fut.done():
                fut.cancel()  # the frame goes on through the stages; its answer is dropped

"""Publishes result records and events to Redis streams (XADD MAXLEN ~), and acknowledges Redis inputs in the
same MULTI/EXEC as their result.

Records wait in one bounded in-memory buffer. While Redis is reachable a full buffer makes producers wait
(nothing is lost); while it is not, the daemon keeps running, the sink retries with exponential backoff and
jitter, and a full buffer drops its oldest records (counted). An input entry whose record was dropped is simply
not acknowledged, so Redis delivers it again: no input is ever acknowledged without its result.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamd import keys
from streamd.config import RedisConfig
from streamd.frames import InputRef, Work
from streamd.log import get_logger
from streamd.metrics import Metrics

log = get_logger("streamd.sink")


@dataclass(slots=True)
class Pending:
    key: str
    maxlen: int
    fields: dict[str, Any] | None  # ready fields (events)
    work: Work | None = None  # results are encoded at publish time (publish_ts)
    ack: InputRef | None = None


def result_record(w: Work, publish_ts: float) -> dict[str, Any]:
    """The documented result record (schema_version 1)."""
    f = w.frame
    rec: dict[str, Any] = {
        "schema_version": keys.SCHEMA_VERSION,
        "stream_id": f.stream_id,
        "seq": f.seq,
        "pts_s": round(f.pts_s, 6),
        "capture_ts": round(f.capture_ts, 6),
        "publish_ts": round(publish_ts, 6),
        "width": f.width,
        "height": f.height,
        "discontinuity": f.discontinuity,
        "outputs": w.outputs,
        "prompt_versions": w.prompt_versions,
        "timings_ms": w.timings_ms,
        "error": w.error,
    }
    if f.ref is not None:
        rec["input"] = {"key": f.ref.key, "entry_id": f.ref.entry_id, "deliveries": f.ref.deliveries}
    if f.meta:
        rec["meta"] = f.meta
    return rec


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)


class RedisSink:
    def __init__(
        self,
        client: aioredis.Redis,
        cfg: RedisConfig,
        metrics: Metrics,
        on_settled: Callable[[InputRef], None] | None = None,
    ):
        self.r = client
        self.cfg = cfg
        self.metrics = metrics
        self._on_settled = on_settled
        self._buf: deque[Pending] = deque()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.healthy = True
        self.last_error: str | None = None
        self.published = 0
        self.overflowed = 0
        self.results_by_stream: dict[str, int] = {}

    # -- producers ------------------------------------------------------------------------------------------
    async def publish_results(self, works: list[Work]) -> None:
        for w in works:
            while self.healthy and len(self._buf) >= self.cfg.buffer_max_records:
                self._space.clear()
                await self._space.wait()
            self._append(Pending(keys.results_key(w.frame.stream_id), self.cfg.results_maxlen, None, w,
                                 w.frame.ref))

    def event(self, stream_id: str, kind: str, fields: dict[str, Any] | None = None) -> None:
        """Queue an event; never waits (events are small and rare)."""
        body = {"type": kind, "ts": round(time.time(), 6), "stream_id": stream_id, **(fields or {})}
        rec = {"schema_version": keys.SCHEMA_VERSION, "stream_id": stream_id, "type": kind, "event": _json(body)}
        self._append(Pending(keys.events_key(stream_id), self.cfg.events_maxlen, rec))

    def record(self, key: str, maxlen: int, record: dict[str, Any]) -> None:
        """Queue a JSON record for any stream key (VLM answers); never waits."""
        rec = {"schema_version": keys.SCHEMA_VERSION, "stream_id": record.get("stream_id", ""),
               "record": _json(record)}
        self._append(Pending(key, maxlen, rec))

    def _append(self, p: Pending) -> None:
        if len(self._buf) >= self.cfg.buffer_max_records:
            old = self._buf.popleft()
            self.overflowed += 1
            self.metrics.buffer_overflow.inc()
            if old.ack is not None and self._on_settled is not None:
                self._on_settled(old.ack)  # not acknowledged: Redis will deliver it again
        self._buf.append(p)
        self._idle.clear()
        self._ready.set()

    def __len__(self) -> int:
        return len(self._buf)

    async def wait_idle(self) -> None:
        """Wait until everything buffered has been published."""
        await self._idle.wait()

    # -- publisher ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Publish until cancelled. Never raises on Redis errors: it backs off and retries."""
        delay = self.cfg.retry_initial_s
        while True:
            if not self._buf:
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            n = min(len(self._buf), self.cfg.publish_batch)
            batch = [self._buf[i] for i in range(n)]
            try:
                await self._send(batch)
            except (RedisError, OSError) as e:
                self.metrics.publish_errors.inc()
                if self.healthy:
                    log.warning("redis unreachable, buffering records", error=str(e) or type(e).__name__,
                                buffered=len(self._buf))
                self.healthy = False
                self.last_error = str(e) or type(e).__name__
                self._space.set()  # producers stop waiting: the buffer now drops its oldest
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if not self.healthy:
                log.info("redis reachable again, published buffered records", buffered=len(self._buf))
            self.healthy = True
            self.last_error = None
            delay = self.cfg.retry_initial_s
            for p in batch:  # still at the front, unless overflow trimmed it during the send
                if self._buf and self._buf[0] is p:
                    self._buf.popleft()
                if p.ack is not None and self._on_settled is not None:
                    self._on_settled(p.ack)
            self.published += n
            self.metrics.buffered.set(len(self._buf))
            self._space.set()

    async def _send(self, batch: list[Pending]) -> None:
        now = time.time()
        has_ack = any(p.ack is not None for p in batch)
        async with self.r.pipeline(transaction=has_ack) as pipe:
            for p in batch:
                fields = p.fields
                if p.work is not None:
                    rec = result_record(p.work, now)
                    f = p.work.frame
                    fields = {"schema_version": keys.SCHEMA_VERSION, "stream_id": f.stream_id, "seq": f.seq,
                              "record": _json(rec)}
                pipe.xadd(p.key, fields, maxlen=p.maxlen, approximate=True)  # type: ignore[arg-type]
                if p.ack is not None:
                    pipe.xack(p.ack.key, p.ack.group, p.ack.entry_id)
            await pipe.execute()
        for p in batch:
            if p.work is not None:
                f = p.work.frame
                self.results_by_stream[f.stream_id] = self.results_by_stream.get(f.stream_id, 0) + 1
                self.metrics.frames_processed.labels(f.stream_id).inc()
                self.metrics.e2e_latency.labels(f.stream_id).observe(max(0.0, now - f.capture_ts))

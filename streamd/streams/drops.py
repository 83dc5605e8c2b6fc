"""Frames a full queue dropped: counted per stream, published as at most one aggregated event per interval."""

from __future__ import annotations

import asyncio

from streamd.frames import Frame
from streamd.metrics import Metrics
from streamd.sources.base import EventFn


class DropReporter:
    """Counts drops; publishes at most one aggregated event per interval."""

    def __init__(self, stream_id: str, metrics: Metrics, on_event: EventFn, interval_s: float):
        self.stream_id = stream_id
        self._dropped = metrics.stream(stream_id).dropped
        self._on_event = on_event
        self._interval_s = interval_s
        self._pending = 0
        self.total = 0
        self._handle: asyncio.TimerHandle | None = None

    def __call__(self, frame: Frame) -> None:
        if frame.ref is not None and frame.ref.handle is not None:
            frame.ref.handle.dropped(frame.ref)  # a Redis entry: acknowledged without a result
        self.total += 1
        self._pending += 1
        self._dropped.inc()
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._interval_s, self.flush)

    def flush(self) -> None:
        self._handle = None
        if self._pending:
            self._on_event("frames_dropped", {"count": self._pending, "total": self.total, "reason": "queue_full"})
            self._pending = 0

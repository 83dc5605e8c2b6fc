"""A daemon's measured load, for admission in a fleet: the busiest stage's share of busy time, and the share of
sampled frames its streams' queues dropped (live sources drop the oldest frame when the stages cannot keep up).
Sampled at every fleet heartbeat and smoothed over time (an exponential moving average with time constant `tau_s`,
weighted by the time between samples: a burst of samples moves it no more than one), so one slow batch does not
close the door and one quiet second does not open it. A stage in the middle of a long batch counts as busy."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any


class LoadMeter:
    def __init__(self, max_busy: float, max_drop_fraction: float, tau_s: float = 3.0):
        self.max_busy = max_busy
        self.max_drop_fraction = max_drop_fraction
        self.tau_s = tau_s
        self.busy = 0.0  # smoothed share of time the busiest stage was processing (0..1)
        self.drop_fraction = 0.0  # smoothed share of sampled frames the queues dropped (0..1)
        self._t: float | None = None
        self._busy_s: dict[tuple[int, str], float] = {}
        self._frames: dict[str, tuple[int, int, int]] = {}  # stream -> (runner id, sampled, dropped)

    @property
    def overloaded(self) -> bool:
        return (self.max_busy < 1 and self.busy > self.max_busy) or \
            (self.max_drop_fraction < 1 and self.drop_fraction > self.max_drop_fraction)

    def sample(self, pipelines: Mapping[str, Any], runners: Mapping[str, Any], now: float | None = None) -> None:
        """Take a sample (`now`: time.perf_counter()): the pipelines' stage busy seconds and the runners' sampled
        and dropped frames since the last one."""
        now = time.perf_counter() if now is None else now
        busy_s = {(id(p), name): p.busy_until(name, now) for p in pipelines.values() for name in p.busy_s}
        frames = {sid: (id(r), r.frames, r.drops.total) for sid, r in runners.items()}
        if self._t is not None and now > self._t:
            dt = now - self._t
            busiest = max((max(0.0, v - self._busy_s.get(k, 0.0)) / dt for k, v in busy_s.items()), default=0.0)
            sampled = dropped = 0
            for sid, (rid, n, d) in frames.items():
                prid, pn, pd = self._frames.get(sid, (rid, 0, 0))
                if prid != rid:  # the stream was replaced: a new runner counts from zero
                    pn, pd = 0, 0
                sampled, dropped = sampled + max(0, n - pn), dropped + max(0, d - pd)
            frac = min(1.0, dropped / sampled) if sampled else 0.0  # `frames` counts the dropped ones too
            alpha = 1.0 - math.exp(-dt / self.tau_s)
            self.busy += alpha * (min(1.0, busiest) - self.busy)
            self.drop_fraction += alpha * (frac - self.drop_fraction)
        self._t, self._busy_s, self._frames = now, busy_s, frames

    def report(self) -> dict[str, Any]:
        return {"busy": round(self.busy, 4), "drop_fraction": round(self.drop_fraction, 4),
                "overloaded": self.overloaded}

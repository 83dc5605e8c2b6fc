"""FPS sampling by presentation timestamp (not by frame count).

A sampler keeps a grid of due times spaced 1/fps apart and emits the first frame at or after each due time.
It survives variable frame rate (the grid follows time, not frames) and timestamp jumps: a jump backwards or
forwards by more than `jump_s` is a discontinuity (the grid restarts at the new timestamp and the frame is
flagged, so trackers reset and an event is published).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Decision:
    keep: bool
    discontinuity: bool = False


class FpsSampler:
    def __init__(self, fps: float | None, jump_s: float = 5.0, tolerance_s: float = 0.002):
        if fps is not None and fps <= 0:
            raise ValueError("fps must be > 0 or None")
        self.period_s = None if fps is None else 1.0 / fps
        self.jump_s = jump_s
        # a frame this early still counts (timestamp rounding, 29.97 vs 30 fps)
        self._early_s = 0.0 if self.period_s is None else min(tolerance_s, self.period_s / 10)
        self._next_due: float | None = None
        self._last_pts: float | None = None
        self._pending_discontinuity = False

    def mark_discontinuity(self) -> None:
        """The source restarted (reconnect): restart the grid; the next kept frame is flagged."""
        self._next_due = None
        self._last_pts = None
        self._pending_discontinuity = True

    def offer(self, pts_s: float) -> Decision:
        """Decide whether the frame at `pts_s` is sampled."""
        last = self._last_pts
        jumped = last is not None and (pts_s < last - 1e-6 or pts_s - last > self.jump_s)
        self._last_pts = pts_s
        if jumped:
            self._next_due = None
            self._pending_discontinuity = True
        if self.period_s is None:
            return self._emit()
        if self._next_due is None:
            self._next_due = pts_s + self.period_s
            return self._emit()
        if pts_s + self._early_s < self._next_due:
            return Decision(False)
        # advance the grid; if we fell more than a period behind (gap), restart it at this frame
        self._next_due += self.period_s
        if self._next_due <= pts_s:
            self._next_due = pts_s + self.period_s
        return self._emit()

    def _emit(self) -> Decision:
        d = Decision(True, self._pending_discontinuity)
        self._pending_discontinuity = False
        return d

"""FPS sampling by presentation timestamp (not by frame count).

A sampler keeps a grid of due times spaced 1/fps apart and emits the first frame at or after each due time.
It survives variable frame rate (the grid follows time, not frames) and timestamp jumps: a jump backwards or
forwards by more than `jump_s` is a discontinuity (the grid restarts at the new timestamp and the frame is
flagged, so trackers reset and an event is published). The rate can change while frames flow (`set_fps`, from any
thread): the next offered frame applies it, and the grid goes on from the last kept frame (no discontinuity).

A decoder that skips frames (streamd/sources/plan.py) offers only some of them: it may let a frame count as due
`reach_s` before its due time (the keyframe nearest a due time), and it watches forward timestamp jumps itself, on
every packet (`watch_forward = False`), since the frames it skips make gaps that are no jump.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Decision:
    keep: bool
    discontinuity: bool = False


class FpsSampler:
    def __init__(self, fps: float | None, jump_s: float = 5.0, tolerance_s: float = 0.002):
        self.jump_s = jump_s
        self._tolerance_s = tolerance_s
        self.period_s: float | None = None
        self._early_s = 0.0
        self._set_period(_period(fps))
        # the rate asked for by set_fps (a one-element tuple, replaced whole, so that a change made from another
        # thread is never lost) and the one in effect: the thread that offers frames applies it
        self._wanted: tuple[float | None] = (self.period_s,)
        self._in_effect = self._wanted
        self._next_due: float | None = None
        self._last_pts: float | None = None
        self._pending_discontinuity = False
        self.watch_forward = True  # a forward gap over jump_s between offered frames is a discontinuity

    @property
    def next_due_s(self) -> float | None:
        """The next due time (None: the next offered frame starts the grid)."""
        return self._next_due

    def _set_period(self, period_s: float | None) -> None:
        self.period_s = period_s
        # a frame this early still counts (timestamp rounding, 29.97 vs 30 fps)
        self._early_s = 0.0 if period_s is None else min(self._tolerance_s, period_s / 10)

    def set_fps(self, fps: float | None) -> None:
        """Change the rate at the next frame boundary (safe from any thread): the next due time becomes the last
        kept frame's plus the new period; not a discontinuity."""
        self._wanted = (_period(fps),)

    def _apply_wanted(self) -> None:
        wanted = self._wanted
        if wanted is self._in_effect:
            return
        self._in_effect = wanted
        old, new = self.period_s, wanted[0]
        self._set_period(new)
        if self._next_due is not None and old is not None and new is not None:
            self._next_due += new - old  # last kept frame + the new period
        else:
            self._next_due = None  # every frame before or after: the grid starts at the next frame

    def mark_discontinuity(self) -> None:
        """The source restarted (reconnect): restart the grid; the next kept frame is flagged."""
        self._next_due = None
        self._last_pts = None
        self._pending_discontinuity = True

    def offer(self, pts_s: float, reach_s: float = 0.0) -> Decision:
        """Decide whether the frame at `pts_s` is sampled; it counts as due from `reach_s` (or the rounding
        tolerance) before its due time."""
        self._apply_wanted()
        last = self._last_pts
        jumped = last is not None and (pts_s < last - 1e-6 or (self.watch_forward and pts_s - last > self.jump_s))
        self._last_pts = pts_s
        if jumped:
            self._next_due = None
            self._pending_discontinuity = True
        if self.period_s is None:
            return self._emit()
        if self._next_due is None:
            self._next_due = pts_s + self.period_s
            return self._emit()
        if pts_s + (reach_s if reach_s > self._early_s else self._early_s) < self._next_due:
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


def _period(fps: float | None) -> float | None:
    if fps is not None and not fps > 0:
        raise ValueError("fps must be > 0 or None")
    return None if fps is None else 1.0 / fps

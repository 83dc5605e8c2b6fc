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
        # a stream's `sampling: scene`: a decoded frame this grid kept (at scene.max_fps) is kept only when the scene
        # changed, or at the floor (SceneSampler.gate); None: every frame the grid keeps
        self.scene: SceneSampler | None = None

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

    def retract(self, due_s: float | None, discontinuity: bool = False) -> None:
        """A frame kept by `offer` never came out of the decoder: `due_s` (the due time before it) is due again,
        and its discontinuity flag goes to the next kept frame."""
        self._next_due = due_s
        self._pending_discontinuity = self._pending_discontinuity or discontinuity

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


# -- scene sampling (jobs: `sampling: scene`) -------------------------------------------------------------------------
SCENE_THUMB = (64, 36)  # width, height of the grey thumbnails compared


def scene_thumbnail(image: object) -> object:
    """A frame (HxWx3 uint8 RGB) as a SCENE_THUMB grey thumbnail, float32 in 0..1: the mean of each cell (block
    averages over an even grid, no interpolation), luma from BT.601 weights."""
    import numpy as np

    h, w = image.shape[:2]
    tw, th = SCENE_THUMB
    ys = (np.arange(th + 1) * h) // th
    xs = (np.arange(tw + 1) * w) // tw
    grey = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114 if image.ndim == 3 else image
    rows = np.add.reduceat(grey.astype(np.float32), ys[:-1], axis=0) / np.diff(ys)[:, None]
    cells = np.add.reduceat(rows, xs[:-1], axis=1) / np.diff(xs)[None, :]
    return (cells / 255.0).astype(np.float32)


@dataclass(slots=True)
class SceneDecision:
    keep: bool
    change: float  # the measure against the last kept frame (0..1); 1.0 for the first frame
    cut: bool = False  # kept because the scene changed (not the first frame, not the floor)


class SceneSampler:
    """Keeps a frame when the scene changes and skips near-duplicates, between a floor and a ceiling rate.

    The measure: the mean absolute difference between the frame's grey thumbnail (SCENE_THUMB, 0..1, see
    `scene_thumbnail`) and the last kept frame's. A frame is kept when it is the first, when the measure is at least
    `threshold` (a scene change: a `cut`), or when no frame was kept for 1/`min_fps` seconds (the floor); never
    within 1/`max_fps` of the last kept frame (the ceiling; the decoder's FPS sampler at `max_fps` already skips
    most of those without converting them). A hard cut between two shots measures about 0.1-0.4; sensor noise and
    compression about 0.002-0.01; a slow pan accumulates change until it passes the threshold."""

    def __init__(self, threshold: float = 0.08, min_fps: float = 0.2, max_fps: float = 5.0):
        if not 0 < threshold <= 1 or min_fps < 0 or not max_fps > 0:
            raise ValueError("threshold must be in (0, 1], min_fps >= 0, max_fps > 0")
        self.threshold = threshold
        self.floor_s = 1.0 / min_fps if min_fps > 0 else None
        self.ceiling_s = 1.0 / max_fps
        self._last: object = None  # the last kept frame's thumbnail
        self._last_pts: float | None = None
        self._pending_discontinuity = False

    def offer(self, pts_s: float, image: object) -> SceneDecision:
        import numpy as np

        thumb = scene_thumbnail(image)
        if self._last is None or self._last_pts is None or pts_s < self._last_pts:  # first, or time went back
            self._last, self._last_pts = thumb, pts_s
            return SceneDecision(True, 1.0)
        change = float(np.mean(np.abs(thumb - self._last)))
        since = pts_s - self._last_pts
        if since + 1e-6 < self.ceiling_s:
            return SceneDecision(False, change)
        cut = change >= self.threshold
        if cut or (self.floor_s is not None and since + 1e-6 >= self.floor_s):
            self._last, self._last_pts = thumb, pts_s
            return SceneDecision(True, change, cut)
        return SceneDecision(False, change)

    def gate(self, pts_s: float, image: object, discontinuity: bool) -> Decision:
        """A stream's frame the FPS grid kept (decoded, RGB): kept when `offer` keeps it; the discontinuity flag
        of a frame skipped here goes to the next kept frame (its trackers still reset)."""
        keep = self.offer(pts_s, image).keep
        disc = discontinuity or self._pending_discontinuity
        self._pending_discontinuity = not keep and disc
        return Decision(keep, keep and disc)

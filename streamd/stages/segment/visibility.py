"""An object's visibility from SAM 2's object score, frame after frame: `visible` while the score is at or above the
threshold, `occluded` while it is below, `lost` once it has stayed below for `lost_after_s` (source time). Each
change is an event: `mask_occluded`, `mask_reappeared`, `mask_lost`. Plain logic on scores: no torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(str, enum.Enum):
    VISIBLE = "visible"
    OCCLUDED = "occluded"
    LOST = "lost"


EVENTS = {(State.VISIBLE, State.OCCLUDED): "mask_occluded", (State.OCCLUDED, State.VISIBLE): "mask_reappeared",
          (State.OCCLUDED, State.LOST): "mask_lost"}


@dataclass
class Visibility:
    """One object's state. `update(score, pts_s)` returns the event of the change it made, or None. A lost object
    stays lost (the stage stops following it)."""

    visible_from: float  # object score (0..1) at or above which the object counts as visible
    lost_after_s: float  # occluded this long (by the frames' source time) -> lost
    state: State = State.VISIBLE
    occluded_since_s: float | None = None

    def update(self, score: float, pts_s: float) -> str | None:
        if self.state is State.LOST:
            return None
        old = self.state
        if score >= self.visible_from:
            self.state, self.occluded_since_s = State.VISIBLE, None
        else:
            if self.occluded_since_s is None:
                self.occluded_since_s = pts_s
            hidden_s = max(0.0, pts_s - self.occluded_since_s)  # a clock that went back counts as no time
            self.state = State.LOST if hidden_s >= self.lost_after_s else State.OCCLUDED
            if old is State.VISIBLE and self.state is State.LOST:  # lost at once (lost_after_s 0): occluded first
                return "mask_lost"
        return EVENTS.get((old, self.state))

"""When to ask, per stream: on a timer (stream time), when the prompt changes, when the scene changes, and about
the crop of every new track. A question may carry the last K sampled frames (a clip)."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamd.frames import Frame, Work
from streamd.stages.vlm.options import VlmOptions
from streamd.stages.vlm.prompting import find_output

THUMB_W, THUMB_H = 32, 18
_MAX_SEEN_TRACKS = 10_000


@dataclass
class Ask:
    trigger: str  # start | interval | prompt_change | scene_change | new_track
    frames: list[Frame]  # oldest first; the last is the frame asked about
    track: dict[str, Any] | None = None


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A 32x18 grey thumbnail (block means over every 4th pixel), values 0-1."""
    small = image[::4, ::4]
    h, w = small.shape[0] // THUMB_H, small.shape[1] // THUMB_W
    if h == 0 or w == 0:
        return small.mean(axis=2, dtype=np.float32) / 255.0
    blocks = small[:h * THUMB_H, :w * THUMB_W].reshape(THUMB_H, h, THUMB_W, w, -1)
    return blocks.mean(axis=(1, 3, 4), dtype=np.float32) / 255.0


def scene_difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 1.0
    return float(np.abs(a - b).mean())


def crop(image: np.ndarray, box: list[float], padding: float) -> np.ndarray:
    """The box (pixels, xyxy) grown by `padding` of its size on each side, clipped to the image."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    px, py = (x2 - x1) * padding, (y2 - y1) * padding
    l, t = max(0, int(x1 - px)), max(0, int(y1 - py))
    r, b = min(w, int(round(x2 + px))), min(h, int(round(y2 + py)))
    return image[t:max(b, t + 1), l:max(r, l + 1)]


class StreamTriggers:
    """One stream's trigger state."""

    def __init__(self, opts: VlmOptions):
        self.opts = opts
        self.last_pts: float | None = None
        self.last_version: Any = None
        self.last_thumb: np.ndarray | None = None
        self.seen_tracks: OrderedDict[Any, None] = OrderedDict()
        self.clip: deque[Frame] = deque(maxlen=opts.clip_frames)

    def frame_trigger(self, w: Work, version: Any) -> str | None:
        """Why this frame should be asked about, or None."""
        o, f = self.opts, w.frame
        self.clip.append(f)
        if o.every_s is None and o.scene_change is None and not o.on_prompt_change:
            return None
        thumb = thumbnail(f.image) if o.scene_change is not None else None
        if self.last_pts is None:
            why = "start" if (o.every_s is not None or o.scene_change is not None) else None
        elif o.on_prompt_change and version != self.last_version:
            why = "prompt_change"
        elif thumb is not None and self.last_thumb is not None and \
                scene_difference(thumb, self.last_thumb) >= o.scene_change:
            why = "scene_change"
        elif o.every_s is not None and f.pts_s - self.last_pts >= o.every_s:
            why = "interval"
        elif f.pts_s < self.last_pts:  # time went back (a looping file restarted): start the timer again
            why = "interval" if o.every_s is not None else None
        else:
            why = None
        if why is None and self.last_pts is None:
            self.last_version = version  # only prompt changes from here on ask
            self.last_pts = f.pts_s
            self.last_thumb = thumb
        self._pending = (f.pts_s, version, thumb)
        return why

    def asked(self) -> None:
        """The frame last passed to `frame_trigger` is being asked about."""
        self.last_pts, self.last_version, self.last_thumb = self._pending

    def new_tracks(self, w: Work) -> list[dict[str, Any]]:
        fresh = [t for t in find_output(w, "tracks") if "track_id" in t and t["track_id"] not in self.seen_tracks]
        return fresh

    def track_asked(self, track_id: Any) -> None:
        self.seen_tracks[track_id] = None
        while len(self.seen_tracks) > _MAX_SEEN_TRACKS:
            self.seen_tracks.popitem(last=False)

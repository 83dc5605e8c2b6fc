"""What the segment stage keeps per stream: the objects it follows, each with its own bounded SAM 2 memory bank.

An object's memory is what SAM 2's video predictor keeps per object (`output_dict_per_obj`), cut to what the next
frame can read: its conditioning frames (the frames it was prompted on; at most `max_cond_frames`, the oldest
dropped first), the spatial memories of its last `memory_frames` frames, and the object pointers of the frames the
memory attention reads pointers from (SAM 2's `max_obj_ptrs_in_encoder`, 16). Everything older is dropped as the
stream goes on, so memory stays flat however long the stream runs (SAM 2's own predictor keeps every frame).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from streamd.stages.segment.visibility import Visibility


@dataclass(slots=True)
class Memory:
    """One frame's memory of one object."""

    features: Any  # maskmem_features, bfloat16 [1, C, H, W]; None once out of the spatial window (pointer only)
    obj_ptr: Any  # [1, hidden]


@dataclass(slots=True)
class Prompt:
    """A prompt in frame pixels: points (x, y) with labels 1 (positive) / 0 (negative); a box is its two corners
    labelled 2 and 3, first (as SAM 2 was trained)."""

    points: list[tuple[float, float]]
    labels: list[int]

    @classmethod
    def from_box(cls, box: list[float] | tuple[float, ...]) -> "Prompt":
        x1, y1, x2, y2 = (float(v) for v in box)
        return cls([(x1, y1), (x2, y2)], [2, 3])


@dataclass(eq=False)
class TrackedObject:
    object_id: int
    visibility: Visibility
    track_id: int | None = None  # the track that prompted it (None: prompted through the API)
    label: str | None = None
    cond: dict[int, Memory] = field(default_factory=dict)  # frame index -> a prompted frame's memory, oldest first
    recent: dict[int, Memory] = field(default_factory=dict)  # frame index -> a tracked frame's memory
    prompted_at: int = -1  # frame index of its last prompt
    track_seen_at: int | None = None  # frame index its track was last in the tracker's output
    box: list[float] | None = None  # its mask's box on the last frame (pixels)
    score: float = 1.0  # its last object score (0..1)

    def prune(self, spatial_from: int, pointers_from: int, max_cond_frames: int) -> None:
        """Keep spatial memories of frames >= spatial_from, pointers of frames >= pointers_from, and the newest
        `max_cond_frames` conditioning frames."""
        for t in [t for t in self.recent if t < pointers_from]:
            del self.recent[t]
        for t, m in self.recent.items():
            if t < spatial_from:
                m.features = None
        while len(self.cond) > max_cond_frames:
            del self.cond[min(self.cond)]

    def counts(self) -> dict[str, int]:
        recent = list(self.recent.values())  # one step under the GIL: the device thread may add one meanwhile
        spatial = sum(m.features is not None for m in recent)
        return {"cond_frames": len(self.cond), "memory_frames": spatial, "pointer_frames": len(recent)}

    def nbytes(self) -> int:
        n = 0
        for m in [*list(self.cond.values()), *list(self.recent.values())]:
            for t in (m.features, m.obj_ptr):
                if t is not None:
                    n += t.numel() * t.element_size()
        return n


@dataclass(eq=False)
class StreamMemory:
    """One stream's objects. `t` is the stream's frame index (frames this stage processed), the time axis of SAM 2's
    memory. Object ids count up for the stream's whole life here (a reset keeps counting)."""

    t: int = -1
    objects: dict[int, TrackedObject] = field(default_factory=dict)
    next_id: int = 1
    commands: deque[tuple[str, Any]] = field(default_factory=deque)  # API prompts and removals, applied in order
    refused_tracks: set[int] = field(default_factory=set)  # tracks not prompted (the object limit), told once

    def new_id(self) -> int:
        oid, self.next_id = self.next_id, self.next_id + 1
        return oid

    def by_track(self) -> dict[int, TrackedObject]:
        return {o.track_id: o for o in self.objects.values() if o.track_id is not None}

    def counts(self) -> dict[str, int]:
        out = {"objects": len(self.objects), "cond_frames": 0, "memory_frames": 0, "pointer_frames": 0, "bytes": 0}
        for o in self.objects.values():
            for k, v in o.counts().items():
                out[k] += v
            out["bytes"] += o.nbytes()
        return out

"""Boxes and prompts in frame pixels: an API prompt to SAM 2's points, clipping, IoU, a mask's box."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamd.stages.segment.memory import Prompt, TrackedObject


def to_prompt(raw: dict[str, Any], width: int, height: int) -> Prompt:
    """An API prompt (checked by its schema) in this frame's pixels: a box first (labels 2, 3), then points."""
    sx, sy = (width, height) if raw.get("normalized") else (1.0, 1.0)
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    if raw.get("box") is not None:
        x1, y1, x2, y2 = raw["box"]
        box = clip([x1 * sx, y1 * sy, x2 * sx, y2 * sy], width, height) or [0.0, 0.0, float(width), float(height)]
        points += [(box[0], box[1]), (box[2], box[3])]
        labels += [2, 3]
    for (x, y), label in zip(raw.get("points") or [], raw.get("labels") or []):
        points.append((min(max(x * sx, 0.0), width), min(max(y * sy, 0.0), height)))
        labels.append(int(label))
    return Prompt(points, labels)


def clip(box: list[float], width: int, height: int) -> list[float] | None:
    x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x2, y2 = min(float(width), float(box[2])), min(float(height), float(box[3]))
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> list[float] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def low_res_box(low_res: Any, width: int, height: int) -> list[float] | None:
    """The mask's box from its low-resolution logits, in frame pixels (for the drift check; cheap)."""
    m = low_res.numpy()[0] > 0
    box = mask_box(m)
    if box is None:
        return None
    h, w = m.shape
    return [box[0] * width / w, box[1] * height / h, box[2] * width / w, box[3] * height / h]


def describe(o: TrackedObject) -> dict[str, Any]:
    return {"object_id": o.object_id, "track_id": o.track_id, "label": o.label, "state": o.visibility.state.value,
            "score": round(o.score, 4), "box": None if o.box is None else [round(v, 1) for v in o.box]}

"""A result record drawn on its frame (GET /api/v1/streams/{id}/snapshot.jpg?overlay=true): boxes with label, track
id and confidence, masks tinted, from the record exactly as consumers get it. Blocking (PIL): run it in a thread."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 178, 29), (207, 210, 49), (146, 204, 23),
           (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (52, 69, 147), (100, 115, 255),
           (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255), (255, 149, 200), (255, 55, 199)]


def box_of(d: Any) -> tuple[float, float, float, float] | None:
    """A detection's box as (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2; None unless it is 4 finite numbers (a
    record is data from Redis: anything may be in it)."""
    box = d.get("box") if isinstance(d, dict) else None
    if not isinstance(box, list) or len(box) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def detections(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage output's detections that carry a pixel box (detect, open-vocabulary stages); those whose box
    is not 4 finite numbers are skipped."""
    out = []
    outputs = record.get("outputs") if isinstance(record, dict) else None
    for value in (outputs.values() if isinstance(outputs, dict) else ()):
        if isinstance(value, dict) and isinstance(value.get("detections"), list):
            out.extend(d for d in value["detections"] if box_of(d) is not None)
    return out


def segments(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A segment stage's (SAM 2) objects that carry a mask: tinted like a detection's mask (their box is their
    track's, drawn with its detection)."""
    outputs = record.get("outputs") if isinstance(record, dict) else None
    return [o for value in (outputs.values() if isinstance(outputs, dict) else ())
            if isinstance(value, dict) and isinstance(value.get("objects"), list)
            for o in value["objects"] if isinstance(o, dict) and isinstance(o.get("mask"), dict)]


def label_text(d: dict[str, Any]) -> str:
    parts = [str(d.get("label", d.get("class_id", "?")))]
    if d.get("track_id") is not None:
        parts.append(f"#{d['track_id']}")
    if isinstance(d.get("confidence"), (int, float)):
        parts.append(f"{d['confidence']:.2f}")
    return " ".join(parts)


def colour(d: dict[str, Any]) -> tuple[int, int, int]:
    key = next((d[k] for k in ("track_id", "object_id", "class_id") if d.get(k) is not None), 0)
    return PALETTE[hash(str(key)) % len(PALETTE)] if not isinstance(key, int) else PALETTE[key % len(PALETTE)]


def rle_counts(mask: Any, width: int, height: int) -> np.ndarray | None:
    """A mask's uncompressed RLE counts as int64, or None unless it is a {size, counts} for this frame whose counts
    are a list of at most h*w+1 ints (not bools), each 0..h*w, summing to h*w. Checked with Python ints before numpy:
    counts that overflow int64 when summed would otherwise pass a numpy sum check and crash np.repeat. Compressed
    (string) counts are not supported: None."""
    try:
        h, w = (int(x) for x in mask["size"])
        counts = mask["counts"]
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    n = h * w
    if (h, w) != (height, width) or not isinstance(counts, list) or len(counts) > n + 1:
        return None
    if not all(type(c) is int and 0 <= c <= n for c in counts) or sum(counts) != n:
        return None
    return np.asarray(counts, dtype=np.int64)


def decode_rle(mask: dict[str, Any], width: int, height: int) -> np.ndarray | None:
    """COCO uncompressed RLE (column-major, zeros first) as an HxW bool array; None if it does not fit the frame."""
    counts = rle_counts(mask, width, height)
    if counts is None:
        return None
    h, w = height, width
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def draw(jpeg: bytes, record: dict[str, Any] | None, quality: int = 80) -> bytes:
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if record is None:
        return jpeg
    dets = detections(record)
    masked = [d for d in dets if isinstance(d.get("mask"), dict)] + segments(record)
    if masked:
        arr = np.asarray(img).copy()
        for d in masked:
            m = decode_rle(d["mask"], img.width, img.height)
            if m is not None:
                arr[m] = (arr[m] * 0.5 + np.asarray(colour(d)) * 0.5).astype(np.uint8)
        img = Image.fromarray(arr)
    pen = ImageDraw.Draw(img)
    width = max(2, round(min(img.size) / 240))
    w, h = img.width - 1, img.height - 1
    for d in dets:
        x1, y1, x2, y2 = box_of(d) or (0.0, 0.0, 0.0, 0.0)
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)  # clamped to the frame (sorted already)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        c = colour(d)
        pen.rectangle([x1, y1, x2, y2], outline=c, width=width)
        text = label_text(d)
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1
        pen.rectangle([x1, ty, x1 + (right - left) + 6, ty + (bottom - top) + 4], fill=c)
        pen.text((x1 + 3, ty + 1), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()

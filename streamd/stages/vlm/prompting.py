"""Prompt templates: `{name}` placeholders filled from the frame (its time, detections, tracks). Only known names
are replaced, so JSON or other braces in a prompt pass through untouched."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

from streamd.frames import Work

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def render(template: str, values: dict[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def find_output(w: Work, key: str) -> list[dict[str, Any]]:
    """The list under `key` ("detections", "tracks") from the first stage output that has one."""
    for out in w.outputs.values():
        if isinstance(out, dict) and isinstance(out.get(key), list):
            return out[key]
    return []


def _box(b: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in b) + "]"


def frame_values(w: Work) -> dict[str, Any]:
    """What a template may use about a frame."""
    f = w.frame
    dets = find_output(w, "detections")
    tracks = find_output(w, "tracks")
    counts = Counter(d.get("label", "?") for d in dets)
    return {
        "stream_id": f.stream_id,
        "seq": f.seq,
        "pts_s": f"{f.pts_s:.1f}",
        "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.capture_ts)),
        "count": len(dets),
        "labels": ", ".join(f"{n} {label}" for label, n in counts.most_common()) or "nothing detected",
        "detections": "; ".join(f"{d.get('label')} {d.get('confidence', 0):.2f} at {_box(d['box'])}"
                                for d in dets if "box" in d) or "none",
        "tracks": "; ".join(f"#{t.get('track_id')} {t.get('label')} at {_box(t['box'])}"
                            for t in tracks if "box" in t) or "none",
    }


def tags_instruction(tags: list[str]) -> str:
    return ("Tags: " + ", ".join(tags) + '.\nAnswer with JSON only, like {"tags": [{"tag": "' + tags[0] +
            '", "confidence": 0.9}]}, listing only tags from the list that apply (an empty list if none).')


def tags_schema(tags: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["tags"],
            "properties": {"tags": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["tag", "confidence"],
                "properties": {"tag": {"type": "string", "enum": list(tags)},
                               "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}}}}


def parse_tags(text: str, tags: list[str]) -> dict[str, float]:
    """Tag -> confidence from an answer. Accepts {"tags": [{"tag", "confidence"} | "name", ...]} or
    {"name": confidence, ...}, inside a ```json fence or not; tags not in the list are ignored.
    Raises ValueError when the answer is not such JSON."""
    raw = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", raw, re.S)
    data = json.loads(fence.group(1) if fence else raw)
    known = {t.lower(): t for t in tags}
    out: dict[str, float] = {}

    def put(name: Any, conf: Any) -> None:
        tag = known.get(str(name).strip().lower())
        if tag is not None:
            c = min(max(float(conf), 0.0), 1.0)
            out[tag] = max(out.get(tag, 0.0), c)

    if isinstance(data, dict) and isinstance(data.get("tags"), list):
        for item in data["tags"]:
            if isinstance(item, dict):
                put(item.get("tag", item.get("name")), item.get("confidence", item.get("score", 1.0)))
            else:
                put(item, 1.0)
    elif isinstance(data, dict):
        for name, conf in data.items():
            if isinstance(conf, (int, float)) and not isinstance(conf, bool):
                put(name, conf)
    else:
        raise ValueError("expected a JSON object with a 'tags' list")
    return out

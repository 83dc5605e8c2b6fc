"""What answers turn into beyond a record each: tag time ranges (tags and safety modes) and rolling summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Active:
    start_seq: int
    start_pts_s: float
    start_ts: float
    last_seq: int
    last_pts_s: float
    last_ts: float
    max_confidence: float
    answers: int = 1


class TagTimeline:
    """One stream's tags over time. A tag starts at the first answer that has it at or above its threshold and
    ends at the first answer without it once it has been absent for `end_after_s` (stream time); the range is
    first seen .. last seen. Answers older than one already applied (they can arrive out of order) do not move
    the state."""

    def __init__(self, thresholds: dict[str, float], default: float, end_after_s: float):
        self.thresholds = thresholds
        self.default = default
        self.end_after_s = end_after_s
        self.active: dict[str, _Active] = {}
        self.last_seq = -1

    def present(self, confidences: dict[str, float]) -> dict[str, float]:
        return {t: c for t, c in confidences.items() if c >= self.thresholds.get(t, self.default)}

    def apply(self, seq: int, pts_s: float, ts: float,
              confidences: dict[str, float]) -> list[tuple[str, dict[str, Any]]]:
        """Events (type, fields) this answer causes."""
        if seq <= self.last_seq:
            return []
        self.last_seq = seq
        events: list[tuple[str, dict[str, Any]]] = []
        present = self.present(confidences)
        for tag, conf in sorted(present.items()):
            a = self.active.get(tag)
            if a is None:
                self.active[tag] = _Active(seq, pts_s, ts, seq, pts_s, ts, conf)
                events.append(("tag_started", {"tag": tag, "confidence": round(conf, 4), "seq": seq,
                                               "pts_s": round(pts_s, 6), "start_ts": round(ts, 6)}))
            else:
                a.last_seq, a.last_pts_s, a.last_ts = seq, pts_s, ts
                a.max_confidence = max(a.max_confidence, conf)
                a.answers += 1
        for tag in sorted(set(self.active) - set(present)):
            if pts_s - self.active[tag].last_pts_s >= self.end_after_s:
                events.append(self._end(tag, "absent", seq))
        return events

    def close(self, reason: str) -> list[tuple[str, dict[str, Any]]]:
        return [self._end(tag, reason, None) for tag in sorted(self.active)]

    def _end(self, tag: str, reason: str, absent_seq: int | None) -> tuple[str, dict[str, Any]]:
        a = self.active.pop(tag)
        fields = {"tag": tag, "reason": reason, "start_seq": a.start_seq, "end_seq": a.last_seq,
                  "start_pts_s": round(a.start_pts_s, 6), "end_pts_s": round(a.last_pts_s, 6),
                  "start_ts": round(a.start_ts, 6), "end_ts": round(a.last_ts, 6),
                  "duration_s": round(a.last_pts_s - a.start_pts_s, 6),
                  "max_confidence": round(a.max_confidence, 4), "answers": a.answers}
        if absent_seq is not None:
            fields["absent_seq"] = absent_seq
        return "tag_ended", fields


@dataclass
class Caption:
    seq: int
    pts_s: float
    ts: float
    text: str


@dataclass
class SummaryWindow:
    """One stream's captions since its last summary; full once it spans `every_s` of stream time."""

    every_s: float
    captions: list[Caption] = field(default_factory=list)
    start_pts_s: float | None = None

    def add(self, c: Caption) -> list[Caption] | None:
        """Adds a caption; returns the window's captions (in frame order) when it is due for a summary."""
        if self.start_pts_s is None:
            self.start_pts_s = c.pts_s
        self.captions.append(c)
        if c.pts_s - self.start_pts_s >= self.every_s:
            return self.take()
        return None

    def take(self) -> list[Caption] | None:
        done = sorted(self.captions, key=lambda x: x.seq)
        self.captions, self.start_pts_s = [], None
        return done or None


def captions_text(captions: list[Caption]) -> str:
    return "\n".join(f"[{c.pts_s:.1f}s] {c.text}" for c in captions)

"""A job's summary document, built as its records arrive: tracks (label, first/last seen, frames), detections per
label, tags with time ranges (from the VLM's answers in frame order, with the stage's own thresholds), captions and
rolling summaries, scene cuts with a keyframe, per-stage timings; for a re-score, the stream's earlier answers beside
the job's for the same frames."""

from __future__ import annotations

from typing import Any

from streamd.stages.vlm.modes import TagTimeline


class _Track:
    __slots__ = ("label", "first_seq", "first_pts_s", "last_seq", "last_pts_s", "frames")

    def __init__(self, label: str, seq: int, pts_s: float):
        self.label, self.first_seq, self.first_pts_s = label, seq, pts_s
        self.last_seq, self.last_pts_s, self.frames = seq, pts_s, 1


class Summary:
    """`tag_rules`: per VLM stage name, (thresholds by tag, default threshold, end_after_s) of tags/safety mode."""

    def __init__(self, tag_rules: dict[str, tuple[dict[str, float], float, float]] | None = None):
        self.tag_rules = tag_rules or {}
        self.frames = 0
        self.failed = 0
        self.first_pts: float | None = None
        self.last_pts: float | None = None
        self._tracks: dict[tuple[str, int], _Track] = {}  # (stage, track id)
        self._labels: dict[str, int] = {}  # detections per label, every frame together
        self._timings: dict[str, list[float]] = {}  # stage -> [sum, max, n]
        self.answers: list[dict[str, Any]] = []  # the VLM's records
        self.cuts: list[dict[str, Any]] = []
        self.earlier: dict[int, list[dict[str, Any]]] = {}  # re-score: the stream's own answers by seq

    def frame(self, rec: dict[str, Any]) -> None:
        self.frames += 1
        if rec.get("error"):
            self.failed += 1
        pts = rec["pts_s"]
        self.first_pts = pts if self.first_pts is None else min(self.first_pts, pts)
        self.last_pts = pts if self.last_pts is None else max(self.last_pts, pts)
        for stage, ms in (rec.get("timings_ms") or {}).items():
            t = self._timings.setdefault(stage, [0.0, 0.0, 0])
            t[0] += ms
            t[1] = max(t[1], ms)
            t[2] += 1
        for stage, out in (rec.get("outputs") or {}).items():
            if not isinstance(out, dict):
                continue
            for d in out.get("detections") or ():
                self._labels[d.get("label", "?")] = self._labels.get(d.get("label", "?"), 0) + 1
            for t in out.get("tracks") or ():
                key = (stage, int(t["track_id"]))
                tr = self._tracks.get(key)
                if tr is None:
                    self._tracks[key] = _Track(t.get("label", "?"), rec["seq"], pts)
                else:
                    tr.last_seq, tr.last_pts_s, tr.frames = rec["seq"], pts, tr.frames + 1

    def vlm(self, rec: dict[str, Any]) -> None:
        self.answers.append(rec)

    def cut(self, seq: int, pts_s: float, change: float, keyframe: str | None) -> None:
        self.cuts.append({"seq": seq, "pts_s": round(pts_s, 6), "change": round(change, 4),
                          **({"keyframe_jpeg_b64": keyframe} if keyframe else {})})

    def _tags(self, stage: str, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        thresholds, default, end_after_s = self.tag_rules[stage]
        tl = TagTimeline(thresholds, default, end_after_s)
        ranges = []
        for a in sorted(answers, key=lambda a: a["seq"]):
            if a.get("kind") != "answer" or "tags" not in a:
                continue
            confs = {t["tag"]: t["confidence"] for t in a["tags"]}
            ranges += [f for kind, f in tl.apply(a["seq"], a["pts_s"], a["capture_ts"], confs) if kind == "tag_ended"]
        ranges += [f for _, f in tl.close("end")]
        keep = ("tag", "start_seq", "end_seq", "start_pts_s", "end_pts_s", "duration_s", "max_confidence", "answers")
        return [{k: r[k] for k in keep} for r in sorted(ranges, key=lambda r: (r["start_seq"], r["tag"]))]

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "frames": self.frames, "frames_failed": self.failed,
            "media_s": {"first_pts_s": self.first_pts, "last_pts_s": self.last_pts},
            "labels": dict(sorted(self._labels.items())),
            "tracks": [{"stage": s, "track_id": tid, "label": t.label, "first_seq": t.first_seq,
                        "first_seen_pts_s": round(t.first_pts_s, 6), "last_seq": t.last_seq,
                        "last_seen_pts_s": round(t.last_pts_s, 6), "frames": t.frames}
                       for (s, tid), t in sorted(self._tracks.items())],
            "timings_ms": {s: {"mean": round(t[0] / t[2], 3), "max": round(t[1], 3), "frames": t[2]}
                           for s, t in sorted(self._timings.items()) if t[2]},
        }
        if self.answers:
            by_stage: dict[str, list[dict[str, Any]]] = {}
            for a in self.answers:
                by_stage.setdefault(a.get("stage", "vlm"), []).append(a)
            doc["vlm"] = {s: self._stage_doc(s, ans) for s, ans in sorted(by_stage.items())}
        if self.cuts:
            doc["scene_cuts"] = sorted(self.cuts, key=lambda c: c["seq"])
        return doc

    def _stage_doc(self, stage: str, answers: list[dict[str, Any]]) -> dict[str, Any]:
        frames = sorted((a for a in answers if a.get("kind") == "answer"), key=lambda a: a["seq"])
        out: dict[str, Any] = {
            "asked": len(answers), "failed": sum(1 for a in answers if "error" in a),
            "captions": [{"seq": a["seq"], "pts_s": a["pts_s"], "text": a.get("text"), "prompt": a.get("prompt"),
                          **({"tags": a["tags"]} if "tags" in a else {})} for a in frames],
            "summaries": [{"window": a.get("window"), "text": a.get("text")}
                          for a in sorted(answers, key=lambda a: a["seq"]) if a.get("kind") == "summary"],
            "track_answers": [{"seq": a["seq"], "track_id": a.get("track_id"), "label": a.get("label"),
                               "text": a.get("text")} for a in answers if a.get("kind") == "track"],
        }
        if stage in self.tag_rules:
            out["tags"] = self._tags(stage, answers)
        if self.earlier:
            out["compare"] = [{"seq": a["seq"], "pts_s": a["pts_s"],
                               "new": {"prompt": a.get("prompt"), "text": a.get("text")},
                               "old": [{"prompt": e.get("prompt"), "text": e.get("text")}
                                       for e in self.earlier[a["seq"]]]}
                              for a in frames if a["seq"] in self.earlier]
        return out

"""Tracking with Ultralytics' own trackers (ByteTrack, BoT-SORT): one tracker per stream, no shared state.

Track ids are unique within a stream for the daemon's lifetime (a reset keeps counting), and across daemons of a
fleet (a stream taken over numbers its tracks above the previous owner's: TRACK_IDS_PER_FRAME). Buffers are set in
seconds and scaled to the stream's *sampled* frame rate (measured from timestamps). A discontinuity (reconnect,
timestamp jump) resets the stream's tracker. Publishes `track_started` and `track_lost` events. A single image of a
predict request (POST /api/v1/predict) is tracked as the first frame of a stream of its own, on a tracker that is
not kept, and publishes no events.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamd.config import StageConfig
from streamd.frames import Work
from streamd.stages import Stage, parse_options


class TrackOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["track"] = "track"
    name: str | None = None
    tracker: Literal["bytetrack", "botsort"] = Field("bytetrack", description="Ultralytics tracker")
    source: str = Field("detect", description="name of the detection stage whose detections are tracked")
    track_buffer_s: float = Field(2.0, gt=0, description="keep a lost track this long before it ends")
    track_high_thresh: float | None = Field(None, ge=0, le=1, description="first-stage match threshold")
    track_low_thresh: float | None = Field(None, ge=0, le=1, description="second-stage match threshold")
    new_track_thresh: float | None = Field(None, ge=0, le=1, description="score needed to start a track")
    match_thresh: float | None = Field(None, ge=0, le=1, description="association threshold")


@dataclass
class _TrackInfo:
    label: str
    first_ts: float
    first_pts: float
    last_ts: float
    last_pts: float
    frames: int = 1


class _Dets:
    """The detection view Ultralytics' trackers read: conf, cls, xywh, xyxy, boolean indexing."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: Any) -> "_Dets":
        return _Dets(self.data[idx])

    @property
    def xyxy(self) -> np.ndarray:
        return self.data[:, :4]

    @property
    def xywh(self) -> np.ndarray:
        d = self.data
        return np.stack([(d[:, 0] + d[:, 2]) / 2, (d[:, 1] + d[:, 3]) / 2, d[:, 2] - d[:, 0], d[:, 3] - d[:, 1]], 1)

    @property
    def conf(self) -> np.ndarray:
        return self.data[:, 4]

    @property
    def cls(self) -> np.ndarray:
        return self.data[:, 5]


# A tracker that starts on a stream whose frames are already numbered (its seq goes on from another daemon's: a fleet
# takeover) numbers its tracks from seq * TRACK_IDS_PER_FRAME + 1: the earlier tracker, which saw fewer frames than
# that seq and at most this many new tracks per frame (a detector's max_det is 300), never gave such an id.
TRACK_IDS_PER_FRAME = 1000


class _StreamTracker:
    def __init__(self, make: Any, buffer_s: float):
        self.tracker = make()
        self.buffer_s = buffer_s
        self.tracks: dict[int, _TrackInfo] = {}
        self.last_pts: float | None = None
        self.period_s: float | None = None

    def observe_pts(self, pts: float) -> None:
        if self.last_pts is not None and pts > self.last_pts:
            dt = pts - self.last_pts
            self.period_s = dt if self.period_s is None else 0.8 * self.period_s + 0.2 * dt
        self.last_pts = pts
        if self.period_s:
            self.tracker.max_frames_lost = max(1, round(self.buffer_s / self.period_s))

    def number_from(self, first: int) -> None:
        """Give new tracks ids from `first` on: above every id an earlier tracker of the stream can have given."""
        if getattr(self.tracker, "_ids", None) is not None:
            self.tracker._ids = iter(range(first, sys.maxsize))

    def reset(self) -> None:
        ids = getattr(self.tracker, "_ids", None)
        self.tracker.reset()
        if ids is not None:  # keep counting: ids stay unique within the stream
            self.tracker._ids = ids
        self.last_pts = None


def _quiet(stream_id: str, kind: str, fields: dict[str, Any] | None = None) -> None:
    """The events of a predict image's tracker: none (it has no events stream)."""


class Track(Stage):
    kind = "track"
    max_batch = 64

    def __init__(self, cfg: StageConfig, opts: TrackOptions):
        super().__init__(cfg)
        self.opts = opts
        self._streams: dict[str, _StreamTracker] = {}
        self._make: Any = None

    @classmethod
    def from_config(cls, cfg: StageConfig, where: str) -> "Track":
        return cls(cfg, parse_options(TrackOptions, cfg, where))

    async def setup(self) -> None:
        import ultralytics
        from ultralytics.trackers.track import TRACKER_MAP
        from ultralytics.utils import YAML, IterableSimpleNamespace

        o = self.opts
        path = Path(ultralytics.__file__).parent / "cfg" / "trackers" / f"{o.tracker}.yaml"
        args = YAML.load(path)
        for k in ("track_high_thresh", "track_low_thresh", "new_track_thresh", "match_thresh"):
            if getattr(o, k) is not None:
                args[k] = getattr(o, k)
        if o.tracker == "botsort":
            args["with_reid"] = False  # ReID weights are a download; appearance-free BoT-SORT works offline
            args["gmc_method"] = args.get("gmc_method") or "sparseOptFlow"
        ns = IterableSimpleNamespace(**args)
        cls = TRACKER_MAP[o.tracker]
        self._make = lambda: cls(args=ns)

    def reset_stream(self, stream_id: str) -> None:
        st = self._streams.get(stream_id)
        if st is not None:
            self._end_all(stream_id, st, "reset")
            st.reset()

    def forget_stream(self, stream_id: str) -> None:
        st = self._streams.pop(stream_id, None)
        if st is not None:
            self._end_all(stream_id, st, "stream removed")

    async def process(self, batch: list[Work]) -> list[Work]:
        # trackers are cheap (no model): run inline, in order, one stream's frames after another
        for w in batch:
            self._track(w)
        return batch

    def _track(self, w: Work) -> None:
        f = w.frame
        if f.predict:  # a single image (POST /api/v1/predict): a stream's first frame, on a tracker kept nowhere
            self._update(w, _StreamTracker(self._make, self.opts.track_buffer_s), _quiet)
            return
        st = self._streams.get(f.stream_id)
        if st is None:
            st = self._streams[f.stream_id] = _StreamTracker(self._make, self.opts.track_buffer_s)
            if f.seq > 0:  # a stream that goes on elsewhere's numbering (taken over by this daemon in a fleet)
                st.number_from(f.seq * TRACK_IDS_PER_FRAME + 1)
        self._update(w, st, self.ctx.events)

    def _update(self, w: Work, st: _StreamTracker, events: Any) -> None:
        f = w.frame
        st.observe_pts(f.pts_s)
        data = w.carry.get(self.opts.source)
        det_out = w.outputs.get(self.opts.source) or {}
        dets = det_out.get("detections", [])
        if data is None:
            data = np.zeros((0, 6), np.float32)
        img = np.ascontiguousarray(f.image[..., ::-1]) if self.opts.tracker == "botsort" else None
        res = st.tracker.update(_Dets(np.asarray(data, dtype=np.float32)), img)
        tracks = []
        seen: set[int] = set()
        for row in res:
            x1, y1, x2, y2, tid, score, cls, idx = (float(v) for v in row[:8])
            tid_i, idx_i = int(tid), int(idx)
            det = dets[idx_i] if 0 <= idx_i < len(dets) else {}
            label = det.get("label", str(int(cls)))
            seen.add(tid_i)
            tracks.append({
                "track_id": tid_i,
                "label": label,
                "class_id": int(cls),
                "confidence": round(score, 4),
                "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
                "box_norm": [round(x1 / f.width, 5), round(y1 / f.height, 5), round(x2 / f.width, 5),
                             round(y2 / f.height, 5)],
                "det_index": idx_i,
            })
            if 0 <= idx_i < len(dets):
                det["track_id"] = tid_i
            info = st.tracks.get(tid_i)
            if info is None:
                st.tracks[tid_i] = _TrackInfo(label, f.capture_ts, f.pts_s, f.capture_ts, f.pts_s)
                events(f.stream_id, "track_started",
                       {"track_id": tid_i, "label": label, "seq": f.seq, "pts_s": f.pts_s})
            else:
                info.last_ts, info.last_pts, info.frames = f.capture_ts, f.pts_s, info.frames + 1
        alive = {t.track_id for t in (*st.tracker.tracked_stracks, *st.tracker.lost_stracks)}
        for tid in [t for t in st.tracks if t not in alive]:  # none on a fresh tracker (a predict image's)
            self._end(f.stream_id, tid, st.tracks.pop(tid), "lost")
        w.outputs[self.name] = {"tracker": self.opts.tracker, "tracks": tracks}

    def _end(self, stream_id: str, tid: int, info: _TrackInfo, reason: str) -> None:
        self.ctx.events(stream_id, "track_lost", {
            "track_id": tid, "label": info.label, "reason": reason, "frames": info.frames,
            "first_seen_ts": info.first_ts, "last_seen_ts": info.last_ts,
            "first_seen_pts_s": info.first_pts, "last_seen_pts_s": info.last_pts,
        })

    def _end_all(self, stream_id: str, st: _StreamTracker, reason: str) -> None:
        for tid, info in st.tracks.items():
            self._end(stream_id, tid, info, reason)
        st.tracks.clear()

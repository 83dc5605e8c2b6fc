"""Where a job's frames come from: a recorded video (an HTTP(S) URL through the egress policy, an uploaded or local
file), read once from start to end as a replay source (nothing dropped; the decoder waits for the job), through the
same supervised source a stream uses (streamd.streams.supervisor: typed failure reasons, a reconnect that resumes a
recording where it stopped)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from streamd.batching import Doorbell, QueueClosed
from streamd.config import StreamConfig
from streamd.egress import EgressRules
from streamd.errors import StreamdError
from streamd.frames import Frame
from streamd.jobs.options import JobsConfig
from streamd.metrics import Metrics
from streamd.streams.supervisor import State, StreamRunner


class JobSourceFailed(StreamdError):
    """The job's source failed for good: `code` is the source's typed reason (streamd.errors.REASON_CODES)."""

    def __init__(self, reason: str, code: str | None):
        super().__init__(reason)
        self.reason, self.code = reason, code or "source_error"


def _no_redis(url: str, egress: Any = None) -> Any:
    raise StreamdError("a job reads no Redis input")


MAX_STEP_S = 10.0  # a forward PTS jump longer than this (and than 4 sampling intervals) is a discontinuity
MAX_FPS = 240.0  # media of unknown length: at most this many decoded frames per second of the cap (then too_large)


class MediaClock:
    """Media time read so far, from frame-to-frame PTS deltas (counted from the first frame, whatever its PTS: an
    MPEG-TS often starts at 1.4 s or later). A backward jump (a PTS reset at an HLS discontinuity or an encoder
    restart, a 33-bit wrap) or a forward jump longer than a plausible step counts as one frame's step (the last
    good one), so a bound on media time still trips."""

    def __init__(self, fps: float | None = None):
        self.max_step_s = max(MAX_STEP_S, 4.0 / fps) if fps else MAX_STEP_S
        self.media_s = 0.0
        self._last: float | None = None
        self._step = 0.0

    def advance(self, pts_s: float) -> float:
        """The media time at a frame of presentation time `pts_s` (0.0 at the first)."""
        if self._last is not None:
            d = pts_s - self._last
            if 0.0 <= d <= self.max_step_s:
                self._step = d
            else:
                d = self._step
            self.media_s += d
        self._last = pts_s
        return self.media_s


class RecordedSource:
    """Frames of a recording, sampled at `fps` (None: every frame), once. `origin` is "api" (the whole egress
    policy) or "config" (the operator's: `streamd analyze`, uploads)."""

    def __init__(self, sid: str, url: str, fps: float | None, cfg: JobsConfig, egress: EgressRules,
                 metrics: Metrics, doorbell: Doorbell | None, origin: str, max_duration_s: float | None = None):
        scfg = StreamConfig.model_validate({
            "id": "job", "url": url, "fps": fps, "queue_size": cfg.queue_size, "drop_policy": "wait",
            "playback": "fast", "loop": False, "open_timeout_s": cfg.open_timeout_s,
            # every frame decoded: a job's records are exactly the sampled frames (decode: auto may pick a
            # keyframe or a later frame for a due time, which a live stream may trade for density, a job not)
            "decode": "all",
            "stall_timeout_s": max(10.0, cfg.open_timeout_s),
            "reconnect": {"max_attempts": cfg.attempts - 1, "initial_s": 0.2, "max_s": 1.0}})
        scfg = scfg.model_copy(update={"id": sid})  # a job's id is never a valid stream id (no collision)
        self.events: dict[str, int] = {}
        self.runner = StreamRunner(scfg, metrics, self._event, _no_redis, "job", 1.0, doorbell, egress, origin)
        self._task: asyncio.Task[None] | None = None
        self.max_duration_s = max_duration_s
        self.cap_s = cfg.unknown_length_cap_s
        # HTTP media of unknown length is a file that ends, read to its end (sources/av.py), never past the cap;
        # the frame bound leaves room for the sampled frame that reaches the cap (one sampling period on) and a
        # second more: a feed of up to MAX_FPS frames a second ends at the cap, not too_large
        period_s = 1.0 / fps if fps else 0.0
        self.runner.hls_state["unsized_max_frames"] = int((self.cap_s + period_s + 1.0) * MAX_FPS) + 1
        self.live = False  # the source has no end (known once it is open)
        self.unknown_length = False  # HTTP media of unknown length (known once it is open): read to cap_s at most
        self.capped = False  # stopped at cap_s
        self.start_pts_s = 0.0  # media time 0: the first frame's PTS (set when it arrives)
        self.clock = MediaClock(fps)  # media time read, robust to PTS resets (the max_duration_s bound)
        self.media_s = 0.0  # the media time of the last frame given (the job's progress)
        self.bounded = False  # stopped at max_duration_s

    def _event(self, stream_id: str, kind: str, fields: dict[str, Any]) -> None:
        self.events[kind] = self.events.get(kind, 0) + 1

    @property
    def limit_s(self) -> float | None:
        """Media time read at most: max_duration_s, and for media of unknown length the cap."""
        if self.unknown_length:
            return self.cap_s if self.max_duration_s is None else min(self.cap_s, self.max_duration_s)
        return self.max_duration_s

    @property
    def duration_s(self) -> float | None:
        """The recording's length once it is open, within max_duration_s (a live source: that bound; media of
        unknown length: that bound, else unknown)."""
        d, bound = self.runner.hls_state.get("duration_s"), self.max_duration_s
        if d is None:
            return self.limit_s if self.live or (self.unknown_length and bound is not None) else None
        return d if bound is None else min(d, bound)

    async def frames(self) -> AsyncIterator[Frame]:
        """The frames in order. Raises JobSourceFailed when the source fails for good."""
        self._task = asyncio.ensure_future(self.runner.run())
        q, first = self.runner.queue, True
        while True:
            try:
                f = await q.get()
            except QueueClosed:
                break
            if first:
                first, self.live = False, bool(self.runner.hls_state.get("live"))
                self.unknown_length = bool(self.runner.hls_state.get("unknown_length"))
                if self.live and self.max_duration_s is None:
                    await self.aclose()
                    raise JobSourceFailed("the source is live (a playlist without #EXT-X-ENDLIST, a camera feed): "
                                          "it never ends; set max_duration_s to analyse a slice of it",
                                          "live_source")
                self.start_pts_s = f.pts_s
            media_s = self.clock.advance(f.pts_s)
            limit = self.limit_s
            if limit is not None and media_s >= limit - 1e-9:
                if self.max_duration_s is not None and self.max_duration_s <= limit:
                    self.bounded = True
                else:
                    self.capped = True
                self.runner.stop()
                break
            self.media_s = media_s
            yield f
        await self._task
        r = self.runner
        if r.state is State.FAILED and not (self.bounded or self.capped):  # what failed after the bound: not read
            raise JobSourceFailed(r.reason or "the source failed", r.reason_code)

    async def aclose(self) -> None:
        self.runner.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


class StoredSource:
    """Re-scoring: the frames a stream already saw, kept by the frame store (streamd/frame_store.py, the stream's
    `keep_frames`), captured within [t0, t1]; chosen when the job is accepted, read as it runs (what the store
    evicted meanwhile is skipped: its bytes are not held here).
    Each keeps its seq, pts and capture time, so the job's answers line up with the stream's own."""

    def __init__(self, store: Any, stream_id: str, t0: float, t1: float, fps: float | None):
        from streamd.sampling import FpsSampler

        self.store = store
        self.stream_id = stream_id
        self.t0, self.t1 = t0, t1
        sampler = FpsSampler(fps)
        self._frames = [sf for sf in store.between(stream_id, t0, t1) if sampler.offer(sf.pts_s).keep]
        self.total = len(self._frames)
        self.start_pts_s = self._frames[0].pts_s if self._frames else 0.0
        clock = MediaClock(fps)  # media time from the first kept frame, across the stream's PTS resets
        self._media = [clock.advance(sf.pts_s) for sf in self._frames]
        self.duration_s = self._media[-1] if self._frames else None
        self.media_s = 0.0  # the media time of the last frame given (the job's progress)
        self.seqs = [sf.seq for sf in self._frames]

    async def frames(self) -> AsyncIterator[Frame]:
        import numpy as np

        if not self._frames:
            raise JobSourceFailed(f"no kept frames of stream {self.stream_id!r} captured in the window (its "
                                  "keep_frames bounds them)", "not_found")
        for sf, media_s in zip(self._frames, self._media):
            image = sf.image
            if image is None:
                try:
                    data = await self.store.jpeg(sf)
                except LookupError:
                    continue  # evicted since the job started
                image = await asyncio.to_thread(_decode_jpeg, data)
            self.media_s = media_s
            yield Frame(self.stream_id, sf.seq, sf.pts_s, sf.capture_ts, np.asarray(image))

    async def aclose(self) -> None:
        self._frames, self._media = [], []


def _decode_jpeg(data: bytes) -> Any:
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))

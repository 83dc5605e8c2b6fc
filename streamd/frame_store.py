"""Recent sampled frames per stream, bounded and accounted: the frames behind the API's snapshots (always on, a few
per stream) and, with larger per-stream limits, frames kept for re-scoring a stream's last minutes.

Each stream has a ring of `StoredFrame`s, newest last, bounded by count, bytes and age (`FrameLimits`, per stream),
and every stream together by `max_total_bytes`. A frame carries its seq, pts, capture time and, once the sink has
written it, the Redis entry id of its result record (`entry_id`), so a snapshot is drawn with exactly the record
consumers got.

Encoding never runs on the event loop and never runs for nobody: the newest `raw_frames` of a stream are held as
the decoded image (the array the pipeline had anyway) and encoded to JPEG only when someone asks (`jpeg()`, in the
store's encoder thread; the bytes are kept, so many viewers cost one encode). A frame that leaves that raw window
and is still within the stream's limits (re-scoring retention) is encoded then, in the same thread; if the encoder
falls behind (`max_pending_encodes`), the frame is dropped and counted, never queued without bound. With the
default limits (`max_frames` == `raw_frames`) no frame is ever encoded unless a snapshot is asked for.

Measured here (720p, PIL/libjpeg-turbo, quality 80): one encode takes about 2.2 ms and turns 2.76 MB of pixels into
about 74 KB; holding a frame raw costs memory, encoding every frame costs CPU: lazy for the few snapshot frames,
eager for retention.

Everything here runs on the event loop except `encode_jpeg` (in the encoder thread).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """How much of one stream is kept. The newest frame is kept whatever `max_bytes` says (until `max_age_s`)."""

    max_frames: int = 2
    max_bytes: int = 32 << 20
    max_age_s: float = 60.0
    raw_frames: int = 2  # the newest frames held as decoded images, encoded only when asked for

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.raw_frames < 1 or self.max_bytes < 1 or not self.max_age_s > 0:
            raise ValueError("frame limits must be positive")


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """An RGB (HxWx3 uint8) image as JPEG bytes. Blocking: runs in the encoder thread."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class StoredFrame:
    """One kept frame: its image as JPEG bytes, or (in the raw window) the decoded image until someone asks."""

    __slots__ = ("stream_id", "seq", "pts_s", "capture_ts", "width", "height", "added_t", "entry_id", "jpeg",
                 "image", "_encoding", "_written")

    def __init__(self, stream_id: str, seq: int, pts_s: float, capture_ts: float, image: np.ndarray):
        self.stream_id = stream_id
        self.seq = seq
        self.pts_s = pts_s
        self.capture_ts = capture_ts
        self.height, self.width = int(image.shape[0]), int(image.shape[1])
        self.added_t = time.monotonic()
        self.entry_id: str | None = None  # the result record's Redis entry id, once written
        self.jpeg: bytes | None = None
        self.image: np.ndarray | None = image
        self._encoding: asyncio.Future[bytes] | None = None
        self._written: asyncio.Future[None] | None = None

    @property
    def nbytes(self) -> int:
        """Memory held: the JPEG, plus the image while it is held."""
        return (len(self.jpeg) if self.jpeg is not None else 0) + (self.image.nbytes if self.image is not None else 0)

    def _set_written(self, entry_id: str) -> None:
        self.entry_id = entry_id
        if self._written is not None and not self._written.done():
            self._written.set_result(None)

    async def wait_written(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until the result record is written; True when it is."""
        if self.entry_id is not None:
            return True
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._written), timeout_s)
        except TimeoutError:
            pass
        return self.entry_id is not None

    def __repr__(self) -> str:
        return f"StoredFrame({self.stream_id!r}, seq={self.seq}, entry_id={self.entry_id!r}, bytes={self.nbytes})"


class FrameStore:
    def __init__(self, defaults: FrameLimits | None = None, max_total_bytes: int = 512 << 20, quality: int = 80,
                 max_pending_encodes: int = 64, metrics: Any = None):
        self.defaults = defaults or FrameLimits()
        self.max_total_bytes = max_total_bytes
        self.quality = quality
        self.max_pending_encodes = max_pending_encodes
        self._limits: dict[str, FrameLimits] = {}
        self._rings: dict[str, deque[StoredFrame]] = {}
        self._bytes: dict[str, int] = {}
        self.total_bytes = 0
        self.encoded = 0  # JPEG encodes done
        self.evicted: dict[str, int] = {}  # frames dropped, by reason: frames, bytes, age, total_bytes, encoder_busy
        self._pending = 0  # encodes queued or running
        self._pool: ThreadPoolExecutor | None = None
        self._metrics = metrics
        if metrics is not None:
            metrics.frame_store_bytes.set_function(lambda: self.total_bytes)
            metrics.frame_store_frames.set_function(lambda: sum(len(r) for r in self._rings.values()))

    # -- limits ----------------------------------------------------------------------------------------------------
    def limits(self, stream_id: str) -> FrameLimits:
        return self._limits.get(stream_id, self.defaults)

    def set_limits(self, stream_id: str, limits: FrameLimits | None) -> None:
        """A stream's own limits (None: back to the defaults); applied at once."""
        if limits is None:
            self._limits.pop(stream_id, None)
        else:
            self._limits[stream_id] = limits
        if stream_id in self._rings:
            self._trim(stream_id)

    # -- writing ---------------------------------------------------------------------------------------------------
    def add(self, frame: Any) -> StoredFrame:
        """Keep `frame` (a streamd.frames.Frame) as the stream's newest; cheap (no copy, no encode)."""
        sf = StoredFrame(frame.stream_id, frame.seq, frame.pts_s, frame.capture_ts, frame.image)
        ring = self._rings.setdefault(sf.stream_id, deque())
        ring.append(sf)
        self._account(sf.stream_id, sf.nbytes)
        self._trim(sf.stream_id)
        return sf

    def written(self, sf: StoredFrame, entry_id: str) -> None:
        """The sink wrote `sf`'s result record as `entry_id`."""
        sf._set_written(entry_id)

    def drop(self, stream_id: str) -> None:
        """The stream is gone: forget its frames and limits."""
        ring = self._rings.pop(stream_id, None)
        self.total_bytes -= self._bytes.pop(stream_id, 0)
        self._limits.pop(stream_id, None)
        for sf in ring or ():
            sf.image = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- reading ---------------------------------------------------------------------------------------------------
    def stream_ids(self) -> list[str]:
        return list(self._rings)

    def frames(self, stream_id: str) -> list[StoredFrame]:
        """The stream's kept frames, oldest first (expired ones dropped first)."""
        if stream_id not in self._rings:
            return []
        self._trim(stream_id)
        return list(self._rings.get(stream_id, ()))

    def latest(self, stream_id: str, written: bool = False) -> StoredFrame | None:
        """The newest frame (with `written`, the newest whose result record is written)."""
        for sf in reversed(self.frames(stream_id)):
            if not written or sf.entry_id is not None:
                return sf
        return None

    def get(self, stream_id: str, entry_id: str) -> StoredFrame | None:
        """The frame whose result record is `entry_id`, if still kept."""
        return next((sf for sf in self.frames(stream_id) if sf.entry_id == entry_id), None)

    def between(self, stream_id: str, t0: float, t1: float) -> list[StoredFrame]:
        """Frames captured within [t0, t1] (epoch seconds, `capture_ts`), oldest first."""
        return [sf for sf in self.frames(stream_id) if t0 <= sf.capture_ts <= t1]

    async def jpeg(self, sf: StoredFrame) -> bytes:
        """`sf` as JPEG bytes, encoded in the encoder thread the first time (never on the event loop)."""
        if sf.jpeg is not None:
            return sf.jpeg
        if sf._encoding is None:
            if sf.image is None:
                raise LookupError("the frame was dropped")
            self._encode(sf)
        assert sf._encoding is not None
        return await asyncio.shield(sf._encoding)

    def stats(self) -> dict[str, Any]:
        return {"bytes": self.total_bytes, "max_total_bytes": self.max_total_bytes, "encoded": self.encoded,
                "pending_encodes": self._pending, "evicted": dict(self.evicted),
                "streams": {sid: {"frames": len(r), "bytes": self._bytes.get(sid, 0),
                                  "raw": sum(sf.image is not None for sf in r)} for sid, r in self._rings.items()}}

    # -- internals -------------------------------------------------------------------------------------------------
    def _account(self, stream_id: str, delta: int) -> None:
        self._bytes[stream_id] = self._bytes.get(stream_id, 0) + delta
        self.total_bytes += delta

    def _evict(self, ring: deque[StoredFrame], i: int, reason: str) -> None:
        sf = ring[i]
        del ring[i]
        self._account(sf.stream_id, -sf.nbytes)
        sf.image = sf.jpeg = sf._encoding = None  # nothing outlives the accounting (a queued re-score job may list it)
        self.evicted[reason] = self.evicted.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.frame_store_evicted.labels(reason).inc()

    def _trim(self, stream_id: str) -> None:
        ring = self._rings[stream_id]
        lim = self.limits(stream_id)
        now = time.monotonic()
        while ring and now - ring[0].added_t > lim.max_age_s:
            self._evict(ring, 0, "age")
        while len(ring) > lim.max_frames:
            self._evict(ring, 0, "frames")
        while len(ring) > 1 and self._bytes.get(stream_id, 0) > lim.max_bytes:
            self._evict(ring, 0, "bytes")
        # frames past the raw window are kept as JPEG (encoded now, in the encoder thread) or, the encoder being
        # behind, dropped
        for i in range(len(ring) - lim.raw_frames - 1, -1, -1):
            sf = ring[i]
            if sf.image is None or sf._encoding is not None:
                continue
            if self._pending >= self.max_pending_encodes:
                self._evict(ring, i, "encoder_busy")
            else:
                self._encode(sf)
        while self.total_bytes > self.max_total_bytes and self._evict_oldest():
            pass

    def _evict_oldest(self) -> bool:
        """Over max_total_bytes: drop the oldest frame of any stream (a stream's newest last)."""
        best: tuple[int, float, str] | None = None
        for sid, ring in self._rings.items():
            if ring:
                key = (len(ring) == 1, ring[0].added_t, sid)
                best = key if best is None or key < best else best
        if best is None:
            return False
        self._evict(self._rings[best[2]], 0, "total_bytes")
        return True

    def _encode(self, sf: StoredFrame) -> None:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="frame-jpeg")
        image = sf.image
        self._pending += 1
        fut = sf._encoding = loop.run_in_executor(self._pool, encode_jpeg, image, self.quality)
        fut.add_done_callback(lambda f: self._encoded(sf, f))

    def _encoded(self, sf: StoredFrame, fut: asyncio.Future[bytes]) -> None:
        self._pending -= 1
        if fut.cancelled() or fut.exception() is not None:
            sf._encoding = None
            return
        self.encoded += 1
        if self._metrics is not None:
            self._metrics.frame_store_encoded.inc()
        if sf.image is None:  # evicted meanwhile: nothing is held for it
            return
        before = sf.nbytes
        sf.jpeg, sf.image = fut.result(), None
        self._account(sf.stream_id, sf.nbytes - before)

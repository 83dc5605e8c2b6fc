"""PyAV source for RTSP, HLS, files and any URL FFmpeg opens.

Decoding runs in one thread per source (PyAV releases the GIL while decoding); only sampled frames are
converted to RGB arrays, through one swscale converter per connection: PyAV's `frame.to_ndarray(format=...)` makes
a new converter for every frame, which under FFmpeg 8's swscale means setting the conversion (and its threads) up
again each time, 2-3x the CPU of the conversion itself for a 720p frame (benchmarks/RESULTS.md, spine). The
thread may block on network reads for up to `open_timeout_s`; the event loop never blocks. The thread puts frames
straight into the stream's queue (a `PushSource`): with a `wait` queue a slow consumer slows the decoder instead of
piling frames up in memory.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from fractions import Fraction
from typing import Any

import av
from av.video.reformatter import VideoReformatter

from streamd.batching import FrameQueue
from streamd.config import Playback, StreamConfig
from streamd.errors import SourceError
from streamd.frames import Frame
from streamd.log import get_logger, redact_text
from streamd.sampling import FpsSampler
from streamd.sources import SourceRef

log = get_logger("streamd.source.av")

MAX_CONSECUTIVE_DECODE_ERRORS = 25


def _describe(exc: BaseException) -> str:
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "HTTP 404 not found"
    if isinstance(exc, av.error.HTTPError):
        return f"HTTP error: {exc.strerror or exc}"
    if isinstance(exc, av.error.FFmpegError):
        return redact_text(f"{type(exc).__name__}: {exc.strerror or exc}")
    return redact_text(f"{type(exc).__name__}: {exc}")


class AvSource:
    def __init__(
        self,
        cfg: StreamConfig,
        ref: SourceRef,
        sampler: FpsSampler,
        seq: itertools.count,
        out: FrameQueue[Frame],
        loop: asyncio.AbstractEventLoop,
    ):
        self.cfg = cfg
        self.ref = ref
        self.sampler = sampler
        self._seq = seq
        self._out = out
        self.ended: asyncio.Future[None] = loop.create_future()
        self._stop = threading.Event()
        self.frames_decoded = 0  # every decoded frame, sampled or not (read by metrics)
        self._pts_offset = 0.0  # a looping file keeps its timeline increasing
        self._progress_t = time.monotonic()  # the last decoded frame (or the start)
        self._waiting = False  # blocked on a full `wait` queue: the consumer's doing, not a stall
        self._thread = threading.Thread(target=self._run, name=f"decode-{cfg.id}", daemon=True)
        self._thread.start()

    @property
    def idle_s(self) -> float:
        return 0.0 if self._waiting else time.monotonic() - self._progress_t

    async def aclose(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, self.cfg.open_timeout_s + 1)

    def _end(self, error: SourceError | None) -> None:
        if self.ended.done():
            return
        if error is None or self._stop.is_set():  # once closed, how it ended no longer matters
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)

    # -- decode thread ---------------------------------------------------------------------------------------
    def _options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
        if self.ref.kind == "rtsp":
            opts["rtsp_transport"] = "tcp"
        opts.update(self.cfg.ffmpeg_options)
        return opts

    def _run(self) -> None:
        error = None
        try:
            while not self._stop.is_set():
                if not self._play_once():
                    break
        except SourceError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - any decoder failure ends this connection with a reason
            error = SourceError(_describe(e))
        self._out.call_threadsafe(self._end, error)  # after the frames: they are queued before the end is seen

    def _play_once(self) -> bool:
        """Plays the input once. Returns True to play it again (a looping file)."""
        t = self.cfg.open_timeout_s
        try:
            container = av.open(self.ref.url, options=self._options(), timeout=(t, t))
        except (av.error.FFmpegError, OSError) as e:
            raise SourceError(f"cannot open: {_describe(e)}",
                              permanent=isinstance(e, (av.error.FileNotFoundError, FileNotFoundError))) from None
        try:
            if not container.streams.video:
                raise SourceError("no video stream in the input", permanent=True)
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.cfg.decode_threads:
                stream.codec_context.thread_count = self.cfg.decode_threads
            end_pts = self._decode(container, stream)
        finally:
            container.close()
        if self._stop.is_set():
            return False
        if self.ref.kind == "file":
            if self.cfg.loop:
                self._pts_offset = end_pts
                return True
            return False
        raise SourceError("the stream ended")

    def _decode(self, container: Any, stream: Any) -> float:
        tb_s = float(stream.time_base or Fraction(1, 90_000))  # a float: Fraction arithmetic per frame is slow
        realtime = self.ref.kind == "file" and self.cfg.playback is Playback.REALTIME
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        frame_dur = 1.0 / rate if rate > 0 else 0.04
        wall0: float | None = None
        pts0 = 0.0
        last_pts = self._pts_offset
        errors = 0
        synthetic = 0
        offset = self._pts_offset
        rgb = VideoReformatter()  # set up on the first frame, reused for the others (and redone if their size changes)
        for packet in container.demux(stream):
            if self._stop.is_set():
                break
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as e:
                errors += 1
                if errors > MAX_CONSECUTIVE_DECODE_ERRORS:
                    raise SourceError(f"corrupt input: {errors} undecodable packets in a row ({_describe(e)})")
                continue
            for vf in frames:
                errors = 0
                self.frames_decoded += 1
                self._progress_t = time.monotonic()
                if vf.pts is not None:
                    pts = vf.pts * tb_s + offset
                else:
                    pts = offset + synthetic * frame_dur
                synthetic += 1
                last_pts = pts
                if realtime:
                    now = time.monotonic()
                    if wall0 is None:
                        wall0, pts0 = now, pts
                    ahead = (pts - pts0) - (now - wall0)
                    if ahead > 0:
                        if self._stop.wait(min(ahead, 1.0)):
                            return last_pts + frame_dur
                    elif ahead < -1.0:  # pts jumped or we fell behind: re-anchor the clock
                        wall0, pts0 = now, pts
                decision = self.sampler.offer(pts)
                if not decision.keep:
                    continue
                image = rgb.reformat(vf, format="rgb24").to_ndarray()
                frame = Frame(
                    stream_id=self.cfg.id,
                    seq=next(self._seq),
                    pts_s=pts,
                    capture_ts=time.time(),
                    image=image,
                    discontinuity=decision.discontinuity,
                )
                self._waiting = True
                queued = self._out.put_threadsafe(frame, self._stop)
                self._waiting = False
                if not queued:
                    return last_pts + frame_dur
        return last_pts + frame_dur

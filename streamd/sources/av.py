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
import os
import stat
import threading
import time
from fractions import Fraction
from typing import Any

import av
from av.codec.hwaccel import HWAccel
from av.video.reformatter import VideoReformatter

from streamd.batching import FrameQueue
from streamd.config import DropPolicy, Playback, StreamConfig
from streamd.errors import SourceError
from streamd.frames import Frame
from streamd.log import get_logger, redact_text
from streamd.sampling import FpsSampler
from streamd.sources import SourceRef
from streamd.sources.base import Abandoned
from streamd.sources.formats import open_options
from streamd.sources.plan import decode_threads, make_plan, mode_reporter

log = get_logger("streamd.source.av")

MAX_CONSECUTIVE_DECODE_ERRORS = 25  # live sources: this many undecodable packets in a row end the connection
CLOSE_WAIT_S = 1.0  # aclose() waits this long for the decoder thread, then abandons it (counted)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "HTTP 404 not found"
    if isinstance(exc, av.error.HTTPError):
        return f"HTTP error: {exc.strerror or exc}"
    if isinstance(exc, av.error.FFmpegError):
        return redact_text(f"{type(exc).__name__}: {exc.strerror or exc}")
    return redact_text(f"{type(exc).__name__}: {exc}")


def _open_error(exc: BaseException, kind: str, timeout_s: float, file_object: bool = False) -> SourceError:
    """A typed reason for an input that did not open."""
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, av.error.ExitError):  # FFmpeg's interrupt: our open timeout
        return SourceError(f"no answer within open_timeout_s ({timeout_s:g} s)", code="timeout")
    if isinstance(exc, (av.error.FileNotFoundError, FileNotFoundError)):
        return SourceError(f"cannot open: {_describe(exc)}", permanent=kind == "file", code="not_found")
    if isinstance(exc, av.error.HTTPError):
        return SourceError(f"cannot open: {_describe(exc)}", code="http_status")
    if isinstance(exc, (av.error.ConnectionRefusedError, ConnectionRefusedError)):
        return SourceError(f"cannot open: {_describe(exc)}", code="unreachable")
    if kind == "file" and isinstance(exc, (av.error.PermissionError, PermissionError)):
        return SourceError(f"cannot open: {_describe(exc)}", permanent=True, code="not_found")
    if isinstance(exc, av.error.ArgumentError) and kind != "rtsp":  # FFmpeg's "Format not on whitelist"
        # A file, HTTP media or an upload in a container outside sources/formats.py: refused for good (retrying
        # reads the same bytes). A live feed (TCP/UDP/RTMP/SRT) may come back with other bytes: retried.
        return SourceError("refused by the FFmpeg format whitelist: not a container streamd reads by default (an "
                           "operator may widen it in the config file: ffmpeg_options.format_whitelist); "
                           f"{_describe(exc)}", permanent=kind == "file" or file_object, code="not_media")
    if kind == "file" and isinstance(exc, av.error.FFmpegError):  # a regular file FFmpeg cannot read
        return SourceError(f"not a media file: {_describe(exc)}", permanent=True, code="not_media")
    if isinstance(exc, av.error.InvalidDataError):
        return SourceError(f"not a media stream: {_describe(exc)}", code="not_media")
    return SourceError(f"cannot open: {_describe(exc)}")


def check_local_file(path: str) -> None:
    """Fail at once, for good, on what can never play: a missing path, a directory, a FIFO or device (whose open
    would block a thread), an empty file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"no such file: {path}", permanent=True, code="not_found") from None
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror or e}", permanent=True, code="not_found") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{path} is a directory, not a media file", permanent=True, code="not_media")
    if stat.S_ISCHR(st.st_mode):  # a capture device (/dev/video0): FFmpeg's v4l2 input
        return
    if not stat.S_ISREG(st.st_mode):
        what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise SourceError(f"{path} is {what}, not a media file", permanent=True, code="not_media")
    if st.st_size == 0:
        raise SourceError(f"{path} is empty", permanent=True, code="not_media")


def _duration(container: Any, stream: Any) -> float | None:
    """A recording's length in seconds, from the video stream or else the container (None: unknown)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return None


class AvSource:
    """`url` is what FFmpeg opens (the reference with its host pinned to the address the egress policy checked);
    `reader` (plain HTTP(S) media) a file object to open instead. `state` outlives the connection: a recording's
    position, so that a reconnect resumes where it stopped instead of replaying it."""

    def __init__(
        self,
        cfg: StreamConfig,
        ref: SourceRef,
        sampler: FpsSampler,
        seq: itertools.count,
        out: FrameQueue[Frame],
        loop: asyncio.AbstractEventLoop,
        *,
        url: str | None = None,
        reader: Any = None,
        state: dict[str, Any] | None = None,
        on_event: Any = None,
        relay: Any = None,
    ):
        self.cfg = cfg
        self.ref = ref
        self.sampler = sampler
        self._seq = seq
        self._out = out
        self._url = url or ref.url
        self._reader = reader
        self._relay = relay  # RTSP: streamd's relay FFmpeg connects to (rtsp_relay.py), closed with this source
        self._state = state if state is not None else {}
        self._on_event = on_event or (lambda kind, fields: None)
        self.ended: asyncio.Future[None] = loop.create_future()
        self._stop = threading.Event()
        self.frames_decoded = 0  # every decoded frame, sampled or not (read by metrics)
        self.skipped_packets = 0  # undecodable packets skipped
        self._pts_offset = 0.0  # a looping file keeps its timeline increasing
        self._skip_left = 0  # media of unknown length: frames decoded before a cut not yet met again
        self._progress_t = time.monotonic()  # the last decoded frame (or the start)
        self._waiting = False  # blocked on a full `wait` queue: the consumer's doing, not a stall
        self.plan = make_plan(cfg, sampler, mode_reporter(cfg.id, out, self._on_event))  # None: every frame is decoded
        self._thread = threading.Thread(target=self._run, name=f"decode-{cfg.id}", daemon=True)
        self._thread.start()

    @property
    def idle_s(self) -> float:
        return 0.0 if self._waiting else time.monotonic() - self._progress_t

    async def aclose(self) -> None:
        """Stop the thread; wait for it at most CLOSE_WAIT_S. One stuck in FFmpeg is abandoned (it returns by itself
        within its timeout, having been told to discard what it still decodes)."""
        self._stop.set()
        if self._reader is not None:
            self._reader.interrupt()
        if self._relay is not None:  # its sockets closed: a read FFmpeg is stuck in returns
            await self._relay.aclose()
        await asyncio.to_thread(self._thread.join, CLOSE_WAIT_S)
        if self._thread.is_alive():
            Abandoned.add(self.cfg.id, self._thread)
            log.warning("decoder thread abandoned (stuck in FFmpeg)", stream=self.cfg.id,
                        alive=Abandoned.alive(self.cfg.id))

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
        if error is not None and self._relay is not None and self._relay.error is not None:
            error = self._relay.error  # what the relay refused (a redirect) or could not reach says why
        self._out.call_threadsafe(self._end, error)  # after the frames: they are queued before the end is seen

    @property
    def _read_timeout_s(self) -> float:
        # a read blocked past the stall timeout returns soon after the watchdog has said `stalled`
        return min(self.cfg.open_timeout_s, self.cfg.stall_timeout_s + 1)

    def _recording(self, container: Any) -> bool:
        """Played once, never replayed: a file, or HTTP media of a known size."""
        if self.ref.kind == "file":
            return os.path.isfile(self._url)
        return self._reader is not None and self._reader.size is not None

    def _unsized_once(self, recording: bool) -> bool:
        """HTTP media of unknown length (chunked, no Content-Length) read by a job (its state's `unsized_max_frames`
        set): a file that ends, played once to its end; a stream's is a live feed (reconnected at its end)."""
        return not recording and self._reader is not None and self._state.get("unsized_max_frames") is not None

    def _keep_every_frame(self) -> None:
        """A recording over HTTP: nothing is dropped (like a file), unless the stream sets a drop policy."""
        if self.cfg.drop_policy is not None or self._out.policy is DropPolicy.WAIT:
            return
        done = threading.Event()

        def switch(_: Any) -> None:
            self._out.set_policy(DropPolicy.WAIT)
            done.set()

        self._out.call_threadsafe(switch, None)
        done.wait(1.0)

    def _play_once(self) -> bool:
        """Plays the input once. Returns True to play it again (a looping file)."""
        t = self.cfg.open_timeout_s
        if self._reader is not None and self._reader.seekable():
            self._reader.seek(0)
        try:
            container = self._open(t)
        except Exception as e:  # noqa: BLE001 - every open failure gets a typed reason
            if self._stop.is_set():
                return False
            raise _open_error(e, self.ref.kind, t, self._reader is not None) from None
        try:
            if not container.streams.video:
                raise SourceError("no video stream in the input", permanent=True, code="no_video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            threads = decode_threads(self.cfg, self.sampler.period_s and 1 / self.sampler.period_s)
            if threads:
                stream.codec_context.thread_count = threads
            recording = self._recording(container)
            unsized = self._unsized_once(recording)
            self._state.setdefault("live", not recording and not unsized)  # a job refuses it (or bounds it)
            if unsized:
                self._state.setdefault("unknown_length", True)
            if self._reader is not None and self._state.get("unsized_max_frames") is not None:  # a job's HTTP media
                self._same_sizing(recording)
            if self._reader is not None and ((recording and not self.cfg.loop) or unsized):  # resumed: same body
                self._same_entity()
            if recording:  # a job's progress: media time done / this
                self._state.setdefault("duration_s", _duration(container, stream))
            if (recording or unsized) and self.ref.kind != "file":
                self._keep_every_frame()
            resume = self._state.get("resume_pts") if recording and not self.cfg.loop else None
            if resume is not None:
                self._seek(container, stream, resume)
            end_pts = self._decode(container, stream, recording, resume, unsized)
        finally:
            container.close()
        if self._stop.is_set():
            return False
        if unsized:  # its end: the body ended (a read that failed is no end, however FFmpeg took it)
            if self._reader.error is not None:
                raise self._reader.error
            if self._skip_left > 0:  # read again after a cut, it ended before the frames already decoded
                done = self._state.get("unsized_frames", 0)
                raise SourceError(f"media of unknown length changed between connections: read again after its "
                                  f"body was cut off, it ended after {done - self._skip_left} frames, before the "
                                  f"{done} already decoded", permanent=True, code="source_changed")
            if not self._state.get("unsized_frames"):
                raise SourceError("no decodable video frame in the input", permanent=True, code="corrupt_input")
            return False
        if recording:
            if not self.frames_decoded and self._state.get("resume_pts") is None:
                raise SourceError("no decodable video frame in the input", permanent=True, code="corrupt_input")
            if self.skipped_packets:
                self._on_event("corrupt_skipped", {"packets": self.skipped_packets})
            if self.cfg.loop and self.ref.kind == "file":
                self._pts_offset = end_pts
                return True
            return False
        raise SourceError("the stream ended", code="disconnected")

    def _open(self, t: float) -> Any:
        src = self._reader if self._reader is not None else self._url
        # only media containers (no concat, hls, image2 ... that open other files), under the stream's own options
        options = {**open_options(self._reader is not None), **self._options()}
        kw: dict[str, Any] = {"options": options, "timeout": (t, self._read_timeout_s)}
        if self.cfg.hwaccel is None:
            return av.open(src, **kw)
        try:  # decoded on the device, frames copied to host memory (software decoding where the codec is not)
            return av.open(src, hwaccel=HWAccel(self.cfg.hwaccel, allow_software_fallback=True), **kw)
        except Exception as e:  # noqa: BLE001 - the device, or the input? The input opened without it tells
            if self._reader is not None and self._reader.seekable():
                self._reader.seek(0)
            try:
                av.open(src, **kw).close()
            except Exception:  # noqa: BLE001
                raise e from None
            raise SourceError(f"hwaccel {self.cfg.hwaccel}: the device cannot be used ({_describe(e)})",
                              permanent=True, code="source_error") from None

    def _same_sizing(self, recording: bool) -> None:
        """A job's HTTP media: every connection must be sized (Content-Length) as the first one was, or chunked as
        it was. A reconnect resumes a sized one by position and one of unknown length by counting frames: the one
        way cannot resume the other (every frame would be published again, the cap would not apply)."""
        kind = "sized" if recording else "unknown_length"
        first = self._state.setdefault("http_sizing", kind)
        if first != kind:
            was = "of a known size (Content-Length)" if first == "sized" else "of unknown length (no Content-Length)"
            now = "of unknown length" if kind == "unknown_length" else "of a known size"
            raise SourceError(f"the source changed between connections: it was {was}, a reconnect got it {now}; "
                              "it cannot be resumed", permanent=True, code="source_changed")

    def _same_entity(self) -> None:
        """HTTP media resumed on a reconnect (a recording by position, a job's media of unknown length by frames
        counted): the new connection's body must be the one the first connection read, where the origin says which
        (ETag or Last-Modified). A file replaced on the origin between connections fails `source_changed`; resumed
        into, the stream would go on with another video's frames."""
        from streamd.sources.httpio import changed_entity

        now = self._reader.validator
        first = self._state.setdefault("http_validator", now)
        if first is not None and now is not None and first != now:
            raise changed_entity(self.ref.url, first, now)

    def _seek(self, container: Any, stream: Any, pts_s: float) -> None:
        """A reconnect to a recording: go back to the last frame decoded (frames up to it are skipped)."""
        tb = float(stream.time_base or Fraction(1, 90_000))
        try:
            container.seek(int(pts_s / tb), stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError as e:  # not seekable: decode from the start, skipping what was published
            log.info("resume by skipping (seek failed)", stream=self.cfg.id, error=_describe(e))

    def _decode(self, container: Any, stream: Any, recording: bool, resume: float | None,
                unsized: bool = False) -> float:
        tb_s = float(stream.time_base or Fraction(1, 90_000))  # a float: Fraction arithmetic per frame is slow
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        frame_dur = 1.0 / rate if rate > 0 else 0.04
        pace = _Pacer(self._stop) if self.ref.kind == "file" and self.cfg.playback is Playback.REALTIME else None
        last_pts = self._pts_offset
        errors = 0
        synthetic = 0
        offset = self._pts_offset
        track = recording and not self.cfg.loop
        # media of unknown length (a job's): a reconnect reads it again from the start (it has no byte ranges) and
        # skips the frames already decoded, counted (its PTS may reset: a position by PTS would not do); past
        # `max_frames` decoded frames it fails (a hostile endless feed whose PTS never advance ends all the same)
        skip = self._skip_left = self._state.get("unsized_frames", 0) if unsized else 0
        max_frames = self._state.get("unsized_max_frames") if unsized else None
        # the frame counted last: the one a reconnect skips last must be it (else the body is another video)
        skip_to = self._state.get("unsized_last_pts") if unsized else None
        rgb = VideoReformatter()  # set up on the first frame, reused for the others (and redone if their size changes)
        ctx = stream.codec_context
        plan = self.plan
        if plan is not None:  # frames the sampler does not need are not decoded (sources/plan.py)
            plan.attach(ctx, tb_s, offset)
            decode, offer = plan.decode, plan.offer
        else:
            decode, offer = ctx.decode, self.sampler.offer
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.ExitError:
                if self._stop.is_set():
                    break
                raise SourceError(f"no data from the source for {self._read_timeout_s:g} s", code="timeout") from None
            except av.error.InvalidDataError as e:  # the container itself is damaged here
                if recording:  # ends with a reason: never replayed from the start
                    raise SourceError(f"corrupt input at {last_pts:.1f} s: {_describe(e)}", permanent=True,
                                      code="corrupt_input") from None
                raise SourceError(f"corrupt input: {_describe(e)}", code="corrupt_input") from None
            if self._stop.is_set() or (unsized and self._reader.error is not None):
                break  # a read failed: FFmpeg takes it for the end, its last packet may be cut short (not decoded)
            if plan is not None:
                if plan.packets_are_progress:  # frames are skipped: packets are the progress (the plan watches them)
                    self._progress_t = time.monotonic()
                if packet.pts is not None:  # where a looping file's next round starts, frames decoded or not
                    last_pts = max(last_pts, packet.pts * tb_s + offset)
                if pace is not None and packet.dts is not None and not pace.wait(packet.dts * tb_s + offset):
                    return last_pts + frame_dur
                if plan.skip(packet):
                    continue
            try:
                frames = decode(packet)
            except av.error.InvalidDataError as e:
                errors += 1
                self.skipped_packets += 1
                if not recording and errors > MAX_CONSECUTIVE_DECODE_ERRORS:
                    raise SourceError(f"corrupt input: {errors} undecodable packets in a row ({_describe(e)})",
                                      code="corrupt_input") from None
                continue  # a damaged region of a recording is skipped, whatever its length
            for vf in frames:
                if unsized and (self._stop.is_set() or self._reader.error is not None):
                    # closed (an abandoned thread counts and publishes nothing more), or a read failed: FFmpeg
                    # drains its decoder as at an end, and with B-frames what it gives out is not what the next
                    # frames in order would have been (a frame missed, one given twice after the skip)
                    return last_pts + frame_dur
                errors = 0
                if vf.pts is not None:
                    pts = vf.pts * tb_s + offset
                else:
                    pts = offset + synthetic * frame_dur
                synthetic += 1
                if resume is not None and pts <= resume + 1e-6:
                    continue  # published before the reconnect
                if unsized:
                    # every frame decoded counts, those decoded again after a cut too: an origin cutting each body
                    # a little further on cannot make it decode the start again and again without bound
                    total = self._state["unsized_decoded"] = self._state.get("unsized_decoded", 0) + 1
                    if total > 2 * max_frames:
                        raise SourceError(f"media of unknown length: more than {2 * max_frames} frames decoded, "
                                          "counting those decoded again after its body was cut off, and no end",
                                          permanent=True, code="too_large")
                    if skip > 0:
                        skip -= 1
                        self._skip_left = skip
                        self._progress_t = time.monotonic()
                        if skip == 0 and skip_to is not None and abs(pts - skip_to) > 1e-6:
                            raise SourceError(
                                "media of unknown length changed between connections: read again after its body "
                                f"was cut off, its frame {self._state.get('unsized_frames')} is at {pts:.3f} s, "
                                f"not {skip_to:.3f} s as before", permanent=True, code="source_changed")
                        continue  # decoded before the reconnect
                    n = self._state["unsized_frames"] = self._state.get("unsized_frames", 0) + 1
                    if n > max_frames:
                        raise SourceError(f"media of unknown length: more than {max_frames} frames decoded and no "
                                          "end", permanent=True, code="too_large")
                    self._state["unsized_last_pts"] = pts
                self.frames_decoded += 1
                self._progress_t = time.monotonic()
                last_pts = pts
                if track:
                    self._state["resume_pts"] = pts
                if pace is not None and plan is None and not pace.wait(pts):
                    return last_pts + frame_dur
                decision = offer(pts)
                if not decision.keep:
                    continue
                image = rgb.reformat(vf, format="rgb24").to_ndarray()
                if self.sampler.scene is not None:  # sampling: scene
                    decision = self.sampler.scene.gate(pts, image, decision.discontinuity)
                    if not decision.keep:
                        continue
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


class _Pacer:
    """Plays a file in real time (`playback: realtime`): `wait(pts)` returns once the wall clock has reached `pts`
    since the first one (False when stopped); a timestamp jump or falling more than 1 s behind re-anchors the
    clock."""

    def __init__(self, stop: threading.Event):
        self._stop = stop
        self._wall0: float | None = None
        self._pts0 = 0.0

    def wait(self, pts: float) -> bool:
        now = time.monotonic()
        if self._wall0 is None:
            self._wall0, self._pts0 = now, pts
            return True
        ahead = (pts - self._pts0) - (now - self._wall0)
        if ahead > 0:
            return not self._stop.wait(min(ahead, 1.0))
        if ahead < -1.0:
            self._wall0, self._pts0 = now, pts
        return True

"""Per-stream supervision: a state machine around a source.

    connecting ──► live ──► stalled ──► backoff ──► connecting ...
        │            │                     │
        └──► backoff ┘ (errors)            └──► failed (permanent error or too many attempts)
    any ──► stopped (removed, shut down, or the end of a file)

Reconnects back off exponentially with jitter; a watchdog marks a decoding source stalled when it goes
`stall_timeout_s` without a frame (checked a few times per timeout, not per frame) and reconnects it. Every
transition is logged and published as an event. A stream's failure never touches another stream.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from streamd.batching import Doorbell, FrameQueue, QueueClosed
from streamd.config import DropPolicy, StreamConfig
from streamd.egress import EgressError, EgressRules, StreamEgress
from streamd.errors import SourceError
from streamd.frames import Frame
from streamd.log import get_logger, redact_text, redact_url, scrub, url_secrets
from streamd.metrics import Metrics
from streamd.sampling import FpsSampler, SceneSampler
from streamd.sources import SourceRef, parse_reference
from streamd.sources.base import Abandoned, EventFn, PushSource, Settlement, Source
from streamd.sources.rtsp_relay import RtspRelay, rtsp_transports
from streamd.streams.drops import DropReporter

log = get_logger("streamd.streams")


class State(str, enum.Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    STALLED = "stalled"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


TERMINAL = {State.FAILED, State.STOPPED}
# config fields a running stream takes without reconnecting (StreamRunner.apply); any other change replaces it
LIVE_FIELDS = frozenset({"fps", "stall_timeout_s"})
_FREE_TEXT_FIELDS = frozenset({"reason", "error", "message", "detail"})  # what `scrub` reads in an event


class StreamRunner:
    def __init__(
        self,
        cfg: StreamConfig,
        metrics: Metrics,
        on_event: EventFn,
        redis_client: Callable[[str, StreamEgress], aioredis.Redis],
        consumer: str,
        drop_event_interval_s: float = 1.0,
        doorbell: Doorbell | None = None,
        egress_rules: EgressRules | None = None,
        origin: str = "config",
        rtsp_transports: tuple[str, ...] = ("tcp",),
    ):
        self.cfg = cfg
        self.origin = origin  # "config" (the operator's file) or "api"
        # rtsp_transport values this stream may use: tcp alone (through the relay) unless the operator's file lists
        # more (egress.rtsp_transports) for its own streams
        self.rtsp_transports = frozenset(rtsp_transports) if origin == "config" else frozenset({"tcp"})
        self.metrics = metrics
        self._emit = on_event
        self._redis_client = redis_client
        self.consumer = consumer
        self.state = State.CONNECTING
        self.reason: str | None = None
        self.reason_code: str | None = None  # the failure class (streamd.errors.REASON_CODES)
        self.last_error: str | None = None  # kept after the stream recovers
        self.last_frame_ts: float | None = None
        self.frames = 0  # sampled frames queued
        self._decoded_base = 0
        self.fps_in = 0.0  # decoded frames per second (measured by the daemon's monitor)
        self.fps_out = 0.0  # results published per second
        self.attempts = 0
        self._live_since: float | None = None
        self.inflight = Settlement()  # Redis input entries in the pipeline; each frame's InputRef carries it
        self._seq = itertools.count()
        self._stop = asyncio.Event()
        self._source: Source | PushSource | None = None
        self._redis_source: Any = None
        self._closing: asyncio.Future[None] | None = None
        try:
            self.ref: SourceRef | None = parse_reference(cfg.url)
            self._ref_error: SourceError | None = None
        except SourceError as e:
            self.ref, self._ref_error = None, e
        # the operator's own streams keep their own host reachable whatever it resolves to (egress.py)
        trusted = urlsplit(self.ref.url).hostname if origin == "config" and self.ref is not None and self.ref.url \
            else None
        self.egress = StreamEgress(egress_rules or EgressRules(), cfg.id, trusted)
        self.hls_state: dict[str, Any] = {}  # kept across reconnects: the HLS follower never decodes a segment twice
        self.fps = self.effective_fps(cfg)  # the sampling rate in effect (None: every frame)
        self.sampler = FpsSampler(self.fps)
        if cfg.sampling == "scene":  # the grid at the ceiling; a frame kept when the scene changes (or the floor)
            sc = cfg.scene
            self.sampler.scene = SceneSampler(sc.threshold, sc.min_fps, sc.max_fps)
        policy = cfg.drop_policy
        if policy is None:
            live = self.ref is not None and (self.ref.live or cfg.playback.value == "realtime")
            policy = DropPolicy.DROP_OLDEST if live else DropPolicy.WAIT
        self.drops = DropReporter(cfg.id, metrics, self.event, drop_event_interval_s)
        self.queue: FrameQueue[Frame] = FrameQueue(cfg.queue_size, policy, asyncio.get_running_loop(), self.drops,
                                                   self._accepted, doorbell)
        self._sampled = metrics.stream(cfg.id).sampled
        for st in State:
            metrics.stream_state.labels(cfg.id, st.value).set(0)

    def effective_fps(self, cfg: StreamConfig) -> float | None:
        """The sampling rate `cfg` means for this stream's source: a Redis input without an `fps` of its own gives
        every entry a result."""
        if cfg.sampling == "scene":
            return cfg.scene.max_fps
        if self.ref is not None and self.ref.kind == "redis" and "fps" not in cfg.model_fields_set:
            return None
        return cfg.fps

    def can_apply(self, cfg: StreamConfig) -> bool:
        """`cfg` differs from the running config in fields that change without a reconnect only, and the stream
        runs (a failed or stopped one is started again)."""
        if self.state in TERMINAL or self._stop.is_set() or cfg.id != self.cfg.id:
            return False
        old, new = self.cfg.model_dump(), cfg.model_dump()
        return all(old[k] == new[k] for k in old if k not in LIVE_FIELDS)

    def apply(self, cfg: StreamConfig) -> None:
        """Take `cfg` without a reconnect (see can_apply): the sampling rate changes at the next frame boundary
        (seq and trackers go on), the watchdog times the next check with the new `stall_timeout_s` (FFmpeg's read
        timeout follows at the next connection)."""
        fps = self.effective_fps(cfg)
        self.cfg = cfg
        if fps != self.fps:
            self.sampler.set_fps(fps)
            log.info("stream sampling rate changed", stream=cfg.id, fps=fps, was=self.fps)
            self.fps = fps

    def continue_seq(self, start: int) -> None:
        """Number this stream's frames from `start` (a stream taken over from another daemon continues its `seq`);
        before its first connection only."""
        self._seq = itertools.count(start)

    @property
    def redis_source(self) -> Any:
        """The stream's Redis input (the last one opened), or None."""
        return self._redis_source

    @property
    def decoded(self) -> int:
        """Frames decoded by every connection so far (sampled or not)."""
        return self._decoded_base + getattr(self._source, "frames_decoded", 0)

    @property
    def url_redacted(self) -> str:
        return redact_url(self.cfg.url)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        secrets = url_secrets(self.cfg.url)
        if secrets:  # nothing of the URL's credentials in an event (an error quoting a piece of a malformed URL)
            # free-text fields only (an error quoting a piece of a malformed URL): ids, states, codes and names stay
            fields = {k: scrub(v, secrets) if isinstance(v, str) and k in _FREE_TEXT_FIELDS else v
                      for k, v in fields.items()}
        if kind == "dead_letter":  # counted here whoever dead-lettered it (the source's decoder or a stage)
            self.metrics.dead_letters.labels(self.cfg.id).inc()
        self._emit(self.cfg.id, kind, fields)

    def _set_state(self, state: State, reason: str | None = None, code: str | None = None) -> None:
        if reason:  # the reason reaches events, logs, the API and the fleet's records: never a credential
            reason = scrub(redact_text(reason), url_secrets(self.cfg.url))
        if state is self.state and reason == self.reason:
            return
        old, self.state, self.reason = self.state, state, reason
        self.reason_code = code if reason else None
        if reason and state in (State.BACKOFF, State.FAILED, State.STALLED):
            self.last_error = reason
        self.metrics.stream_state.labels(self.cfg.id, old.value).set(0)
        self.metrics.stream_state.labels(self.cfg.id, state.value).set(1)
        fields: dict[str, Any] = {"from": old.value, "to": state.value}
        if reason:
            fields["reason"] = reason
            if self.reason_code:
                fields["reason_code"] = self.reason_code
        if state is State.BACKOFF:
            fields["attempt"] = self.attempts
        self.event("state", fields)
        logf = log.warning if state in (State.FAILED, State.STALLED, State.BACKOFF) else log.info
        logf("stream state", stream=self.cfg.id, **fields)

    def fail(self, reason: str) -> None:
        """Something outside the source failed this stream for good (its pipeline could not start)."""
        self._set_state(State.FAILED, reason)
        self.stop()
        self.queue.close()

    @property
    def stopped(self) -> asyncio.Event:
        return self._stop

    def stop(self) -> None:
        """Ask the stream to stop: its source is closed, what it already queued still flows through."""
        self._stop.set()
        if self._source is not None and self._closing is None:
            self._closing = asyncio.ensure_future(self._source.aclose())

    # -- running ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until stopped, failed, or a file ends. Closes the stream's queue at the end."""
        self.metrics.stream_state.labels(self.cfg.id, State.CONNECTING.value).set(1)
        self.event("state", {"from": None, "to": State.CONNECTING.value})
        try:
            await self._supervise()
        finally:
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)
            self.queue.close()
            self.drops.flush()
            await self.egress.aclose()

    async def _supervise(self) -> None:
        rc = self.cfg.reconnect
        if self.ref is None:
            assert self._ref_error is not None
            self._set_state(State.FAILED, str(self._ref_error), "invalid_reference")
            return
        delay = rc.initial_s
        while not self._stop.is_set():
            self._set_state(State.CONNECTING)
            try:
                ended = await self._play()
                if ended:
                    self._set_state(State.STOPPED, "end of input", "ended")
                    return
            except SourceError as e:
                reason = redact_text(str(e))
                if e.permanent:
                    self._set_state(State.FAILED, reason, e.code)
                    return
                self.reason, self.reason_code = reason, e.code
            except TimeoutError:
                self._set_state(State.STALLED, f"no frame for {self.cfg.stall_timeout_s:g} s", "stalled")
            except QueueClosed:
                return
            if self._stop.is_set():
                break
            # media of unknown length (a job's) is read again from its start after a cut: its reconnects are
            # bounded in number, however long each connection lasted
            unsized = bool(self.hls_state.get("unknown_length"))
            if self._live_since is not None and time.monotonic() - self._live_since >= rc.reset_after_s \
                    and not unsized:
                delay = rc.initial_s  # it worked for a while: start counting again
                self.attempts = 0
            self._live_since = None
            self.attempts += 1
            if rc.max_attempts is not None and self.attempts > rc.max_attempts:
                self._set_state(State.FAILED, f"gave up after {rc.max_attempts} attempts: {self.reason}",
                                self.reason_code)
                return
            self._set_state(State.BACKOFF, self.reason, self.reason_code)
            wait = delay * random.uniform(1 - rc.jitter, 1 + rc.jitter)
            delay = min(delay * rc.multiplier, rc.max_s)
            try:
                await asyncio.wait_for(self._stop.wait(), wait)
            except TimeoutError:
                pass
            if not unsized:  # media of unknown length goes on where it stopped (its frames decoded are skipped)
                self.sampler.mark_discontinuity()
        if self.state is not State.FAILED:
            self._set_state(State.STOPPED, "stopped")

    async def _open(self) -> Source | PushSource:
        assert self.ref is not None
        if self.ref.kind == "redis":
            from streamd.sources.redis import RedisFrameSource

            src = RedisFrameSource(self.cfg, self._redis_client(self.ref.url, self.egress), self.ref.key or "", self.sampler,
                                   self._seq, self.consumer, self.inflight, self.event,
                                   lambda: self._redis_client("", self.egress))  # the daemon's own (acking marks)
            self._redis_source = src
            return src
        loop = asyncio.get_running_loop()
        if self.ref.kind == "hls":
            from streamd.sources.hls import HlsSource

            return HlsSource(self.cfg, self.ref, self.sampler, self._seq, self.queue, loop, self.egress,
                             self.hls_state, self.event)
        from streamd.sources.av import AvSource, check_local_file

        while Abandoned.alive(self.cfg.id) >= Abandoned.MAX_PER_STREAM and not self._stop.is_set():
            await asyncio.sleep(0.2)  # the last connections' threads are still stuck in FFmpeg: no third one
        url, reader, relay = self.ref.url, None, None
        if self.ref.kind == "file":
            check_local_file(self.ref.url)
        elif urlsplit(self.ref.url).scheme in ("http", "https"):  # plain media over HTTP: fetched by the policy
            from streamd.sources.httpio import EgressReader, http_headers

            reader = EgressReader(self.egress, self.ref.url, loop, timeout_s=self.cfg.open_timeout_s,
                                  headers=http_headers(self.cfg.ffmpeg_options))
            await self._unless_stopped(reader.start())
        elif self.ref.kind == "rtsp":
            asked = rtsp_transports(self.cfg.ffmpeg_options)
            if not asked <= self.rtsp_transports:
                raise EgressError(f"ffmpeg_options.rtsp_transport {self.cfg.ffmpeg_options['rtsp_transport']!r} is "
                                  f"not allowed for this stream (only {', '.join(sorted(self.rtsp_transports))}: "
                                  "egress.rtsp_transports, config-file streams only)", permanent=True)
            if asked == {"tcp"}:  # FFmpeg talks to streamd's relay, which refuses redirects (rtsp_relay.py)
                relay = RtspRelay(self.egress, self.ref.url,
                                  min(self.cfg.open_timeout_s, self.egress.rules.connect_timeout_s))
                try:
                    url = await self._unless_stopped(relay.start())
                except BaseException:
                    await relay.aclose()
                    raise
            else:  # the operator's opt-in: FFmpeg connects to the checked address itself
                url = await self._unless_stopped(self.egress.pin_url(self.ref.url))
        else:  # RTMP, SRT ...: FFmpeg connects to the address the policy checked (no second resolution)
            url = await self._unless_stopped(self.egress.pin_url(self.ref.url))
        try:
            return AvSource(self.cfg, self.ref, self.sampler, self._seq, self.queue, loop, url=url, reader=reader,
                            state=self.hls_state, on_event=self.event, relay=relay)
        except BaseException:
            if relay is not None:
                await relay.aclose()
            raise

    async def _unless_stopped(self, aw: Any) -> Any:
        """Await `aw` (a resolution, a first request) unless the stream is stopped first: removing a stream or
        shutting down never waits out a connect timeout."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise SourceError("stopped")
        return task.result()

    async def _play(self) -> bool:
        """One connection. Returns True at a clean end of input; raises SourceError / TimeoutError otherwise."""
        assert self.ref is not None
        src = self._source = await self._open()
        try:
            if isinstance(src, PushSource):
                return await self._watch(src)
            return await self._pull(src)
        finally:
            self._source = None
            await src.aclose()
            self._decoded_base += getattr(src, "frames_decoded", 0)

    async def _pull(self, src: Source) -> bool:
        """Move frames from an iterated source (Redis) into the queue. No watchdog: an idle Redis stream is not a
        stalled camera."""
        async for frame in src:
            await self.queue.put(frame)
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    async def _watch(self, src: PushSource) -> bool:
        """Wait for a source that fills the queue itself to end; raise TimeoutError when it stalls. The watchdog
        times the source only, never our own queue (a full `wait` queue blocks it on purpose)."""
        while not src.ended.done():
            stall_s = self.cfg.stall_timeout_s  # read again: a PATCH can change it while the stream runs
            await asyncio.wait({src.ended}, timeout=min(1.0, stall_s / 4))
            if not src.ended.done() and src.idle_s > stall_s:
                # said now, not once the source's thread has been closed (it may be stuck in a read)
                self._set_state(State.STALLED, f"no frame for {stall_s:g} s", "stalled")
                raise TimeoutError
        src.ended.result()
        return not self._stop.is_set()

    def _accepted(self, frame: Frame) -> None:
        """The queue took a frame (called on the loop, for frames of every source)."""
        if self.state is not State.LIVE:
            self._live_since = time.monotonic()  # attempts are forgiven after reconnect.reset_after_s of this
            self._set_state(State.LIVE)
        self.frames += 1
        self.last_frame_ts = frame.capture_ts
        self._sampled.inc()
        if frame.discontinuity:
            self.event("discontinuity", {"seq": frame.seq, "pts_s": frame.pts_s})

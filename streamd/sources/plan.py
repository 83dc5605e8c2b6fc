"""Sampler-aware decoding: which packets a PyAV source decodes, so that it decodes only what the sampler needs.

Every packet is still demuxed (timestamps, stall detection and discontinuities see all of them); what this plans
is which ones reach the decoder. The mode in effect is one of:

- `all`: every packet is decoded (the configured `all`, or `auto` while the GOP is not stable: the first GOPs after
  each connect, an input without timestamps, one without keyframes, keys not decodable alone).
- `keyframes`: only key packets are decoded (FFmpeg's `skip_frame = NONKEY` besides), and only those the sampler
  wants: a keyframe is taken for a due time when it lies at most half a GOP before it (or anywhere after it), so
  each due time gets the keyframe nearest to it. A record says the PTS of the keyframe used: it differs from the
  due time by at most half the GOP when the GOP is regular, by at most one GOP when it changed. The decoder is
  drained after each keyframe, so the frame is published at once rather than behind the decoder's reorder delay.
  At an fps above the keyframe rate a keyframe serves at most one due time: fewer records than due times.
- `gop` (mixed): each GOP is decoded from its keyframe up to its last due frame (the next due time falls at or
  after the next keyframe, predicted as the last one plus the longest of the last GOPS intervals), then nothing
  until the next keyframe. Every frame up to there is decoded, so the frame used is the one `all` uses.

`auto` chooses at each keyframe from the last GOPS keyframe intervals (so it follows an encoder restart that
changes the GOP), and only when they agree within one frame (a stable GOP; scene-cut keyframes and dynamic-GOP
encoders make it unstable): `keyframes` when the sampling period is at least the GOP (fps <= keyframe rate), else
`gop`; `all` while the GOP is not stable. `fps: null` (every frame) decodes everything.

Keys that are not independently decodable (intra refresh: the packets flagged as keys are recovery points, whose
frame is no keyframe and which the decoder does not output after a reset): seen on the decoded frame at a key's
PTS while decoding everything, on a key in `keyframes` mode that gives no frame, or as a stretch of packets
longer than the period plus two GOPs in which nothing was published (the watchdog). Any of them switches the plan
to `all` for good (a `decode_mode` event with a `reason`); the due time of a key that gave no frame stays due.
While the plan decodes everything, packets alone are no progress for stall detection (`packets_are_progress`).

Forward timestamp jumps are watched here, on every packet's DTS (the sampler sees only decoded frames, whose gaps
are no jump any more); backward ones are seen by the sampler on the decoded frames.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from streamd.config import DecodeMode, StreamConfig
from streamd.log import get_logger
from streamd.sampling import Decision, FpsSampler

log = get_logger("streamd.source.plan")

KEY_THREADS = 1  # FFmpeg threads per stream where little is decoded (benchmarks/density.py measures it)
ONE_THREAD_MAX_FPS = 2.0  # auto: one thread up to this sampling rate (more threads: more CPU and memory per stream)
GOP_SLACK = 0.99  # auto: keyframes only when the period is at least this share of the measured GOP
GOPS = 3  # auto: the keyframe intervals that must agree (within one frame) before any skipping
_SKIP = {"all": "DEFAULT", "gop": "DEFAULT", "keyframes": "NONKEY"}
_NO = Decision(False)


def decode_threads(cfg: StreamConfig, fps: float | None) -> int:
    """Decoder threads for a connection (set before the codec opens; 0 = FFmpeg decides): `decode_threads` when set,
    else one for `keyframes`, and for `auto` at up to ONE_THREAD_MAX_FPS: with many streams, FFmpeg's frame
    threads cost each stream more CPU (flushing a GOP's tail waits for them, they decode ahead of the due frame)
    and memory (frames per thread) for no gain, the streams being decoded side by side anyway."""
    if cfg.decode_threads:
        return cfg.decode_threads
    if cfg.decode is DecodeMode.KEYFRAMES or (cfg.decode is DecodeMode.AUTO and fps is not None
                                              and fps <= ONE_THREAD_MAX_FPS):
        return KEY_THREADS
    return 0


def mode_reporter(stream_id: str, out: Any, on_event: Any) -> Any:
    """`on_mode` for a plan: logs the change and publishes a `decode_mode` event (from the loop: `out` is the
    stream's FrameQueue)."""

    def report(fields: dict[str, Any]) -> None:
        log.info("decode mode", stream=stream_id, **fields)
        out.call_threadsafe(lambda f: on_event("decode_mode", f), fields)

    return report


def make_plan(cfg: StreamConfig, sampler: FpsSampler, on_mode: Any = None) -> "DecodePlan | None":
    """The plan for a source's decoder, or None where every frame is decoded (`decode: all`, `fps: null`)."""
    if cfg.decode is DecodeMode.ALL or sampler.period_s is None:
        sampler.watch_forward = True
        return None
    return DecodePlan(cfg.decode, sampler, on_mode)


class DecodePlan:
    """For one source; `attach` gives it each new codec context (a connection, a looped file, a run of HLS
    segments): the measured GOP and the last keyframe carry over. `on_mode(fields)` is called (in the decoder
    thread) when the mode in effect changes. The decoder thread calls `skip(packet)` for every packet, then
    `decode(packet)` for those not skipped, then `offer(pts_s)` for each decoded frame."""

    def __init__(self, mode: DecodeMode, sampler: FpsSampler, on_mode: Any = None):
        self.mode = mode
        self.sampler = sampler
        sampler.watch_forward = False  # forward jumps: watched here, on the packets
        self._on_mode = on_mode or (lambda fields: None)
        self._ctx: Any = None
        self._tb = 1 / 90_000
        self._offset_s = 0.0
        self._jump_ticks = 0.0
        self.active = "keyframes" if mode is DecodeMode.KEYFRAMES else "all"  # all | gop | keyframes
        self.gop_s: float | None = None  # the longest of the last GOPS keyframe intervals (None: fewer measured)
        self.stable = False  # the last GOPS intervals agree within one frame
        self.keys_independent = True  # False once a key's frame was seen not to decode alone (for good)
        self._intervals: deque[float] = deque(maxlen=GOPS)
        self._frame_s = 0.04  # one frame's duration (from the packets')
        self._key_ticks: deque[int] = deque(maxlen=2)  # the last keys' PTS ticks (their frames are checked)
        self._since_s: float | None = None  # the last published frame's PTS (or where watching began)
        self.keys_decoded = 0
        self._key_s: float | None = None  # the last keyframe's PTS
        self._decoding = self.active != "keyframes"  # non-key packets reach the decoder
        # keyframes: the key taken, its decision and the due time before it (restored if it gives no frame)
        self._taken: tuple[float, Decision, float | None] | None = None
        self._last_dts: int | None = None

    def attach(self, ctx: Any, tb_s: float, offset_s: float = 0.0) -> None:
        """A new codec context (not opened yet) with time base `tb_s`; `offset_s` is added to its timestamps (a
        looping file's timeline keeps increasing)."""
        self._ctx, self._tb, self._offset_s = ctx, tb_s, offset_s
        self._jump_ticks = self.sampler.jump_s / tb_s
        self._last_dts = None
        self._taken = None
        self._since_s = None
        self._key_ticks.clear()
        if self.active != "all":
            ctx.skip_frame = _SKIP[self.active]

    # -- per packet ---------------------------------------------------------------------------------------
    def skip(self, packet: Any) -> bool:
        """True when `packet` is not decoded. Watches forward DTS jumps; plans at each keyframe."""
        dts = packet.dts
        if dts is not None:
            last = self._last_dts
            self._last_dts = dts
            if last is not None and (dts - last > self._jump_ticks or dts < last):
                self._restart(forward=dts > last)
        if packet.duration:
            self._frame_s = packet.duration * self._tb
        if self.active != "all":
            self._watch(packet)
        if packet.is_keyframe:
            return not self._keyframe(packet)
        return not self._decoding

    @property
    def packets_are_progress(self) -> bool:
        """Whether a packet read counts as progress for stall detection: while frames are skipped (decoding
        everything, the decoded frames are the progress; the watchdog covers what skipping hides)."""
        return self.active != "all"

    def decode(self, packet: Any) -> list[Any]:
        """Decode `packet`; a keyframe in `keyframes` mode comes out at once (the decoder drained and reset)."""
        if self.active != "keyframes":
            frames = self._ctx.decode(packet)
            if self.keys_independent and self._key_ticks:
                for vf in frames:
                    if vf.pts in self._key_ticks and not vf.key_frame:
                        self._not_independent("a key's frame is no keyframe (intra refresh: a recovery point)")
            return frames
        frames = self._ctx.decode(packet)
        frames += self._ctx.decode(None)
        self._ctx.flush_buffers()
        taken = self._taken
        if not frames and taken is not None and packet.is_keyframe:
            self._taken = None
            self.sampler.retract(taken[2], taken[1].discontinuity)  # its due time is due again
            self._not_independent("a key decoded alone gave no frame (intra refresh: a recovery point)")
        return frames

    # -- per decoded frame -----------------------------------------------------------------------------------
    def offer(self, pts_s: float) -> Decision:
        """The sampler's decision for a decoded frame (in `gop` mode, the rest of the GOP is skipped after its
        last due frame)."""
        if self.active == "keyframes":
            taken = self._taken
            if taken is not None and abs(pts_s - taken[0]) < 1e-6:
                self._taken = None
                self._since_s = pts_s
                return taken[1]
            return _NO  # a frame left in the decoder from before keyframes mode began
        decision = self.sampler.offer(pts_s)
        if not decision.keep:
            return decision
        self._since_s = pts_s
        if self.active == "gop" and self._key_s is not None and self.gop_s is not None:
            due = self.sampler.next_due_s
            if due is not None and due + 0.002 >= self._key_s + self.gop_s:
                self._decoding = False  # nothing more is due before the next keyframe
                self._ctx.flush_buffers()
        return decision

    # -- planning ---------------------------------------------------------------------------------------------
    def _restart(self, forward: bool) -> None:
        """A timestamp jump: the GOP is measured again; a forward jump is a discontinuity (backward ones are seen
        by the sampler on the next decoded frame)."""
        self._key_s = None
        self._since_s = None
        if forward:
            self.sampler.mark_discontinuity()

    def _watch(self, packet: Any) -> None:
        """The watchdog: packets flow while frames are skipped, yet nothing was published for longer than a due
        time can wait for its frame (the period plus the GOP, with a GOP of margin): decode everything."""
        ticks = packet.pts if packet.pts is not None else packet.dts
        if ticks is None or self.gop_s is None or self.sampler.period_s is None:
            return
        t = ticks * self._tb + self._offset_s
        if self._since_s is None or t < self._since_s:
            self._since_s = t
        elif t - self._since_s > self.sampler.period_s + 2 * self.gop_s + self._frame_s:
            self._not_independent(f"no frame published for {t - self._since_s:.1f} s while packets arrived")

    def _not_independent(self, reason: str) -> None:
        """Keys are not decodable on their own here: everything is decoded from now on (for good)."""
        if not self.keys_independent:
            return
        self.keys_independent = False
        self._decoding = True
        if self.active == "all":  # seen while decoding everything: said once all the same
            self.active = ""
        self._set("all", reason)

    def _keyframe(self, packet: Any) -> bool:
        ticks = packet.pts if packet.pts is not None else packet.dts
        if ticks is None:  # nothing to plan with: everything is decoded
            self._set("all")
            self._decoding = True
            return True
        self._key_ticks.append(ticks)
        key_s = ticks * self._tb + self._offset_s
        if self._key_s is not None and key_s > self._key_s:
            self._intervals.append(key_s - self._key_s)
            self.gop_s = max(self._intervals) if len(self._intervals) == GOPS else None
            self.stable = self.gop_s is not None and self.gop_s - min(self._intervals) <= self._frame_s * 1.01
        self._key_s = key_s
        period = self.sampler.period_s
        if not self.keys_independent:
            self._set("all")
        elif self.mode is DecodeMode.KEYFRAMES:
            self._set("keyframes")
        elif period is None or self.gop_s is None or not self.stable:
            self._set("all")
        else:
            self._set("keyframes" if period >= self.gop_s * GOP_SLACK else "gop")
        if self.active != "keyframes":
            self._decoding = True
            return True
        self._decoding = False
        due = self.sampler.next_due_s
        decision = self.sampler.offer(key_s, self.gop_s / 2 if self.gop_s else 0.0)
        if not decision.keep:
            return False
        self._taken = (key_s, decision, due)
        self.keys_decoded += 1
        return True

    def _set(self, active: str, reason: str | None = None) -> None:
        if active == self.active:
            return
        self.active = active
        self._since_s = None
        if self._ctx is not None:
            self._ctx.skip_frame = _SKIP[active]
        fields: dict[str, Any] = {"mode": active, "gop_s": None if self.gop_s is None else round(self.gop_s, 3)}
        if reason is not None:
            fields["reason"] = reason
            log.warning("keys not independently decodable: decoding everything", reason=reason)
        self._on_mode(fields)

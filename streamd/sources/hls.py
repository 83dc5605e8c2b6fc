"""HLS followed by streamd itself: playlists parsed with `m3u8`, every fetch (playlists, variants, segments, keys,
init sections, each redirect hop) through the stream's egress policy (streamd/egress.py), segment bytes handed to
PyAV. FFmpeg never fetches anything, so a playlist line or a redirect cannot lead it to an address the policy
refuses.

- A segment is decoded at most once per stream: the last media sequence number handed over is kept in the
  runner's `hls_state`, across playlist reloads and reconnects. A numbering that starts again (an encoder restart:
  the newest segment more than _REORDER_WINDOW behind, or EXT-X-DISCONTINUITY-SEQUENCE lower) is followed from
  `hls.start` again, its first segment flagged a discontinuity, once there is evidence: a segment URI at a number
  already handed over that changed, or the playlist still behind on the next reload. One such playlist alone (an
  older copy from a lagging CDN edge) is ignored. A live playlist that stops growing yields no
  frames: the runner's watchdog marks it `stalled` and nothing is republished.
- `#EXT-X-ENDLIST` is a recording: every segment once, then a clean end (`stopped`, code `ended`).
- `#EXT-X-DISCONTINUITY`, and a media-sequence gap (segments fell off the playlist before we fetched them), flag
  the next frame. `#EXT-X-PROGRAM-DATE-TIME` gives `capture_ts` (`capture_source: source`), else the receive time.
- The playlist is reloaded at the target duration, half of it when it did not change (RFC 8216 6.3.4).
- Master playlists: the variant by bandwidth (`hls.variant`, `hls.max_bandwidth`); one that leads back to a
  playlist already on the way, or nests deeper than `hls.max_nesting`, fails with `playlist_loop`. A variant that
  answers an HTTP error (an expired token) sends the follower back to the master playlist.
- AES-128 segments are decrypted (key through the policy; IV from the tag or the media sequence number); the last
  _MAX_KEYS keys used are kept.
- The stream's `ffmpeg_options` user_agent / referer go with every fetch; its `headers` (credentials) only to the
  configured URL's own scheme/host/port: a playlist that names another host (a segment, key, init section,
  variant or redirect there) gets only User-Agent / Referer sent to it (StreamEgress.request's `origin`).

The fetching runs on the event loop, playlist parsing in a worker thread (and only when the playlist's bytes
changed; one over `hls.max_playlist_entries` is refused before it is parsed); decoding runs in one thread per source, fed through a hand-off queue of at
most two segments (memory stays bounded; a slow pipeline slows the fetching, never the loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

import av
import m3u8
from av.video.reformatter import VideoReformatter

from streamd.batching import FrameQueue
from streamd.config import DropPolicy, StreamConfig
from streamd.egress import EgressError, StreamEgress
from streamd.errors import SourceError
from streamd.frames import Frame
from streamd.log import get_logger, redact_url
from streamd.sampling import FpsSampler
from streamd.sources import SourceRef
from streamd.sources.formats import open_options
from streamd.sources.base import EventFn
from streamd.sources.hls_feed import END, Feed, Segment, aes128_decrypt
from streamd.sources.httpio import http_headers
from streamd.sources.plan import decode_threads, make_plan, mode_reporter

log = get_logger("streamd.source.hls")

_MAX_BAD_SEGMENTS = 3  # undecodable segments in a row that end a connection (corrupt_input)
# a live playlist whose newest segment is this many media sequence numbers behind the last one handed over (or whose
# discontinuity sequence went down) restarted its numbering; within it, an older copy of the playlist (a lagging
# CDN edge) is only deduplicated
_REORDER_WINDOW = 3
# a playlist behind like that is taken for a restart only on evidence: a segment URI at a sequence number handed over
# that differs from the one seen (the last _MAX_URIS kept), or the playlist still behind on the next reload (on the
# _STALE_RELOADS-th when the URIs it shares match); once alone it is an older copy and ignored
_MAX_URIS = 64
_STALE_RELOADS = 3
_MAX_KEYS = 4  # AES-128 keys kept per connection, the least recently used dropped (keys rotate on a live stream)


_OPEN_OPTIONS = {"probesize": "32", "analyzeduration": "0"}  # no read-ahead probing: the codec comes with the data
# swscale threads for the RGB conversion: 1, the decoder thread converts each frame itself (bit for bit the pixels
# of PyAV's default, which splits each frame over one swscale thread per core: the decoder thread then waits for a
# worker that competes for the cores with FFmpeg's frame threads and the event loop). Measured on 2 cores: 1 stream
# 2-7 % more frames/s than the default, 8 streams the same (benchmarks/RESULTS.md, HLS follower); more cores: not.
SWS_THREADS = 1


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError("the playlist is not UTF-8 text", code="invalid_playlist") from None


def _too_many(n: int, limit: int) -> SourceError:
    return SourceError(f"the playlist lists {n} entries, over hls.max_playlist_entries ({limit})", code="too_large")


def _parse(data: bytes, final: str, max_entries: int) -> m3u8.M3U8:
    """A playlist's bytes parsed (in a worker thread: m3u8 takes ~30 us an entry, a 4 MiB playlist seconds). The
    entries are counted first (lines that start with #EXTINF or #EXT-X-STREAM-INF, a scan in C), so a playlist over
    hls.max_playlist_entries is refused without being parsed."""
    n = data.count(b"\n#EXTINF") + data.count(b"\n#EXT-X-STREAM-INF")
    if n > max_entries:
        raise _too_many(n, max_entries)
    text = _text(data)
    if not text.lstrip().startswith("#EXTM3U"):
        raise SourceError(f"{redact_url(final)} is not an HLS playlist (no #EXTM3U)", code="invalid_playlist")
    try:
        pl = m3u8.loads(text, uri=final)
    except Exception as e:  # noqa: BLE001 - m3u8 raises plain exceptions for bad lines
        raise SourceError(f"cannot parse the playlist {redact_url(final)}: {e}", code="invalid_playlist") from None
    n = len(pl.segments) + len(pl.playlists)
    if n > max_entries:  # entries the cheap count missed (indented tags, lone CR line ends)
        raise _too_many(n, max_entries)
    return pl


class HlsSource:
    def __init__(self, cfg: StreamConfig, ref: SourceRef, sampler: FpsSampler, seq: itertools.count,
                 out: FrameQueue[Frame], loop: asyncio.AbstractEventLoop, egress: StreamEgress,
                 state: dict[str, Any], on_event: EventFn):
        self.cfg = cfg
        self.ref = ref
        self.sampler = sampler
        self._seq = seq
        self._out = out
        self._egress = egress
        self._state = state
        self._on_event = on_event
        self.ended: asyncio.Future[None] = loop.create_future()
        self.frames_decoded = 0
        self._stop = threading.Event()
        self._handoff: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._progress_t = time.monotonic()
        self._waiting = False
        self._keys: OrderedDict[str, bytes] = OrderedDict()  # key URI -> key, at most _MAX_KEYS
        # the configured User-Agent / Referer / headers (ffmpeg_options) go with every fetch, the credential ones
        # only to the configured URL's origin (passed as `origin=`): never to another host a playlist names
        self._headers = http_headers(cfg.ffmpeg_options) or None
        self._parsed: dict[str, tuple[bytes, str, m3u8.M3U8]] = {}  # url -> (digest of its bytes, final url, parsed)
        self._maps: dict[str, bytes] = {}
        self._feed = Feed(self._handoff, self._stop)
        self.plan = make_plan(cfg, sampler, mode_reporter(cfg.id, out, on_event))  # None: every frame decoded
        self._thread = threading.Thread(target=self._decode_loop, name=f"hls-{cfg.id}", daemon=True)
        self._thread.start()
        self._task = loop.create_task(self._follow_guarded(), name=f"hls-follow:{cfg.id}")

    @property
    def segments(self) -> int:
        """Segments handed to the decoder so far."""
        return self._feed.count

    @property
    def idle_s(self) -> float:
        return 0.0 if self._waiting else time.monotonic() - self._progress_t

    async def aclose(self) -> None:
        self._stop.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._thread.join, 2.0)

    def _end(self, error: SourceError | None) -> None:
        if self.ended.done():
            return
        if error is None or self._stop.is_set():
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)

    # -- fetching (event loop) ----------------------------------------------------------------------------
    async def _follow_guarded(self) -> None:
        try:
            await self._follow()
            item: Any = END
        except asyncio.CancelledError:
            return
        except SourceError as e:
            item = e
        except Exception as e:  # noqa: BLE001 - any failure ends this connection with a reason
            item = SourceError(f"HLS: {type(e).__name__}: {e}")
        await self._hand(item)

    async def _hand(self, item: Any) -> None:
        """Put an item on the hand-off queue without blocking the loop."""
        while not self._stop.is_set():
            try:
                self._handoff.put_nowait(item)
                self._waiting = False
                return
            except queue.Full:
                self._waiting = True  # the decoder is behind: not a stall of the source
                await asyncio.sleep(0.02)
        self._waiting = False

    async def _playlist(self, url: str) -> tuple[m3u8.M3U8, str]:
        """Fetch and parse a playlist. Parsing runs in a worker thread, never on the event loop; a playlist whose
        bytes did not change since its last load is not parsed again (a live playlist is reloaded every target
        duration, half of it while unchanged)."""
        h = self.cfg.hls
        data, final = await self._egress.fetch(url, max_bytes=h.max_playlist_bytes, timeout_s=self.cfg.open_timeout_s,
                                               headers=self._headers, origin=self.ref.url)
        digest = hashlib.blake2b(data, digest_size=16).digest()  # ~1 ms for 2 MiB
        cached = self._parsed.get(url)
        if cached is not None and cached[0] == digest and cached[1] == final:
            return cached[2], final
        pl = await asyncio.to_thread(_parse, data, final, h.max_playlist_entries)
        if len(self._parsed) >= 4:
            self._parsed.clear()
        self._parsed[url] = (digest, final, pl)
        return pl, final

    async def _media_playlist(self) -> tuple[m3u8.M3U8, str]:
        """Fetch the stream's playlist, following master -> variant; returns the media playlist and its URL. The
        variant found is reloaded from then on; when it answers an HTTP error (an expired token: 403), the master
        playlist is read again, once per call (a variant that fails again ends the connection: the reconnect
        backoff paces the next try, which starts from the master)."""
        stored = self._state.get("media_url")
        if stored:
            try:
                return await self._resolve(stored)
            except EgressError as e:
                if e.code != "http_status":
                    raise
                log.warning("HLS variant playlist failed: reading the master playlist again", stream=self.cfg.id,
                            error=str(e))
                self._state.pop("media_url", None)
        return await self._resolve(self.ref.url)

    async def _resolve(self, url: str) -> tuple[m3u8.M3U8, str]:
        h = self.cfg.hls
        seen: list[str] = []
        while True:
            if url in seen:
                raise SourceError(f"the playlist {redact_url(url)} refers back to itself", permanent=True,
                                  code="playlist_loop")
            if len(seen) > h.max_nesting:
                raise SourceError(f"playlists nest deeper than hls.max_nesting ({h.max_nesting})", permanent=True,
                                  code="playlist_loop")
            seen.append(url)
            pl, final = await self._playlist(url)
            if final != url and final in seen:
                raise SourceError(f"the playlist {redact_url(url)} redirects back to itself", permanent=True,
                                  code="playlist_loop")
            if not pl.is_variant:
                if url != self.ref.url:
                    self._state["media_url"] = url  # reload the variant itself from now on
                return pl, final
            url = self._variant(pl)

    def _variant(self, pl: m3u8.M3U8) -> str:
        h = self.cfg.hls
        options = [(p.stream_info.bandwidth or 0, p.absolute_uri) for p in pl.playlists if p.uri]
        if not options:
            raise SourceError("the master playlist lists no variant", code="invalid_playlist")
        within = [o for o in options if h.max_bandwidth is None or o[0] <= h.max_bandwidth] or \
            [min(options)]  # none fits the cap: the lowest
        return (min(within) if h.variant == "lowest" else max(within))[1]

    async def _follow(self) -> None:
        h = self.cfg.hls
        last_pl = None
        while not self._stop.is_set():
            pl, final = await self._media_playlist()
            if not pl.segments and pl.is_endlist:
                raise SourceError("the playlist has no segments", permanent=True, code="invalid_playlist")
            self._state.setdefault("live", not pl.is_endlist)  # a job refuses a live playlist (or bounds it)
            if pl.is_endlist and self.cfg.drop_policy is None:
                self._out.set_policy(DropPolicy.WAIT)  # a recording: every frame, like a file
            msn0 = int(pl.media_sequence or 0)
            dseq = int(pl.discontinuity_sequence or 0)
            last = self._state.get("last_msn")
            uris: dict[int, str] = self._state.setdefault("msn_uris", {})  # msn -> URI of segments handed over
            restarted = False
            if last is not None and (msn0 + len(pl.segments) - 1 < last - _REORDER_WINDOW
                                     or dseq < self._state.get("discontinuity_sequence", dseq)):
                verdict = self._restart_or_stale(pl, msn0)
                if verdict == "stale":  # an older copy (a lagging CDN edge): nothing in it is new
                    log.info("HLS playlist behind the last segment ignored", stream=self.cfg.id, last=last,
                             media_sequence=msn0, discontinuity_sequence=dseq)
                    last_pl = pl
                    await asyncio.sleep(max(0.1, float(pl.target_duration or 2) / 2))
                    continue
                # the numbering started again (an encoder restart): follow the new one, a discontinuity
                log.warning("HLS media sequence restarted", stream=self.cfg.id, last=last, media_sequence=msn0,
                            discontinuity_sequence=dseq, evidence=verdict)
                self._state.pop("last_msn", None)
                uris.clear()
                last, restarted = None, True
            self._state["behind_reloads"] = 0
            self._state["discontinuity_sequence"] = dseq
            todo = list(enumerate(pl.segments))
            if last is None:
                if not pl.is_endlist and h.start == "live_edge":
                    todo = todo[-h.live_edge_segments:]
            else:
                todo = [(i, s) for i, s in todo if msn0 + i > last]
            for i, seg in todo:
                msn = msn0 + i
                gap = (last is not None and msn > last + 1) or restarted
                restarted = False
                data = await self._segment(seg, msn, final)
                pdt = seg.current_program_date_time
                await self._hand(Segment(msn, data, bool(seg.discontinuity) or gap,
                                          pdt.timestamp() if pdt is not None else None))
                self._state["last_msn"] = last = msn
                uris[msn] = seg.absolute_uri
                while len(uris) > _MAX_URIS:
                    del uris[next(iter(uris))]  # the oldest (insertion order: ascending msn)
                if self._stop.is_set():
                    return
            if pl.is_endlist:
                return
            target = float(pl.target_duration or 2)
            wait = target if pl is not last_pl else target / 2  # the same object: the same bytes (_playlist)
            last_pl = pl
            await asyncio.sleep(max(0.1, wait))

    def _restart_or_stale(self, pl: m3u8.M3U8, msn0: int) -> str:
        """A playlist behind the last segment handed over (its newest more than _REORDER_WINDOW back, or a lower
        discontinuity sequence): an encoder restart or an older copy from a lagging CDN edge? "uri_changed" (a
        restart) when a segment it lists at a sequence number already handed over has another URI; "stale" when
        the ones it shares match, or it shares none and this is the first such reload in a row; a restart
        ("repeated") when the playlist is still behind on the next reload (or, with matching URIs, the
        _STALE_RELOADS-th: an encoder that names segments by their number)."""
        uris: dict[int, str] = self._state.get("msn_uris", {})
        shared = [(uris[msn0 + i], s.absolute_uri) for i, s in enumerate(pl.segments) if msn0 + i in uris]
        if any(a != b for a, b in shared):
            return "uri_changed"
        behind = self._state["behind_reloads"] = self._state.get("behind_reloads", 0) + 1
        if behind >= (_STALE_RELOADS if shared else 2):
            return "repeated"
        return "stale"

    async def _segment(self, seg: Any, msn: int, base: str) -> bytes:
        h = self.cfg.hls
        data, _ = await self._egress.fetch(seg.absolute_uri, max_bytes=h.max_segment_bytes, timeout_s=h.segment_timeout_s,
                                           headers=self._headers, origin=self.ref.url)
        init = seg.init_section
        if init is not None and init.uri:
            uri = init.absolute_uri
            if uri not in self._maps:
                self._maps.clear()
                self._maps[uri], _ = await self._egress.fetch(uri, max_bytes=h.max_segment_bytes,
                                                              timeout_s=h.segment_timeout_s, headers=self._headers,
                                                              origin=self.ref.url)
            data = self._maps[uri] + data if self._maps[uri] else data
            if init.byterange:
                raise SourceError("EXT-X-MAP byte ranges are not supported", permanent=True,
                                  code="invalid_playlist")
        key = seg.key
        if key is not None and key.method and key.method.upper() != "NONE":
            if key.method.upper() != "AES-128":
                raise SourceError(f"HLS encryption {key.method} is not supported (AES-128 is)", permanent=True,
                                  code="invalid_playlist")
            data = await self._decrypt(data, key, msn)
        if seg.byterange:
            raise SourceError("EXT-X-BYTERANGE segments are not supported", permanent=True, code="invalid_playlist")
        return data

    async def _decrypt(self, data: bytes, key: Any, msn: int) -> bytes:
        uri = key.absolute_uri
        secret = self._keys.get(uri)
        if secret is None:
            secret, _ = await self._egress.fetch(uri, max_bytes=64, timeout_s=self.cfg.hls.segment_timeout_s,
                                                 headers=self._headers, origin=self.ref.url)
            if len(secret) != 16:
                raise SourceError(f"the AES-128 key is {len(secret)} bytes, not 16", code="invalid_playlist")
            self._keys[uri] = secret
            while len(self._keys) > _MAX_KEYS:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(uri)
        return aes128_decrypt(data, secret, key.iv, msn)

    # -- decoding (thread) --------------------------------------------------------------------------------
    # MPEG-TS segments that arrive back to back are read as one stream by one long-lived demuxer and decoder (as
    # FFmpeg's own HLS demuxer does): no per-segment probing, no decoder restart. A run of segments ends at a
    # discontinuity, at the end, or when no new segment came for FLUSH_IDLE_S (the live edge: what the decoder
    # holds back goes out then). Other segments (fMP4 with their init section) get a demuxer each.
    def _decode_loop(self) -> None:
        error: SourceError | None = None
        self._rgb = VideoReformatter()
        self._marks: list[tuple[float, float | None]] = []  # (first pts of a segment, its program date time)
        self._bad_run = 0  # undecodable segments in a row
        self._tb = 1 / 90_000
        feed = self._feed
        try:
            while not self._stop.is_set():
                if not feed.begin():
                    break
                if feed.discontinuity:
                    self.sampler.mark_discontinuity()
                    self._marks.clear()
                if not self._decode_run(feed):
                    break
            if isinstance(feed.final, SourceError):
                error = feed.final
            elif feed.final is END and self.segments and not self.frames_decoded:
                error = SourceError(f"corrupt input: none of the {self.segments} HLS segments is decodable video",
                                    permanent=True, code="corrupt_input")
        except SourceError as e:
            error = e
        except Exception as e:  # noqa: BLE001
            error = SourceError(f"HLS decode: {type(e).__name__}: {e}")
        self._out.call_threadsafe(self._end, error)

    def _decode_run(self, feed: Feed) -> bool:
        """Demux and decode one run of segments from the feed. False when stopping."""
        try:
            if feed.ts:
                container = av.open(feed, mode="r", format="mpegts", options=_OPEN_OPTIONS)
            else:
                container = av.open(feed.whole(), mode="r", options=open_options(True))  # media containers only
        except av.error.FFmpegError as e:
            feed.drain()
            for seg in feed.settle_all():
                log.warning("undecodable HLS segment skipped", stream=self.cfg.id, msn=seg.msn, error=str(e))
                self._skipped(seg, "not a media segment")
            return True
        try:
            if not container.streams.video:
                raise SourceError("no video stream in the HLS segment", code="no_video")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            ctx.thread_type = "AUTO"
            threads = decode_threads(self.cfg, self.sampler.period_s and 1 / self.sampler.period_s)
            if threads:
                ctx.thread_count = threads
            self._tb = float(stream.time_base or 1 / 90_000)
            plan = self.plan
            if plan is not None:  # frames the sampler does not need are not decoded (sources/plan.py)
                plan.attach(ctx, self._tb)
            try:
                for packet in container.demux(stream):
                    if self._stop.is_set():
                        return False
                    if packet.size == 0:
                        continue
                    seg, first, done = feed.locate(packet.pos)
                    for d in done:
                        self._skipped(d, "no decodable packet") if not d.packets else self._decoded(d)
                    if seg is not None:
                        seg.packets += 1
                        if first and packet.pts is not None:
                            self._marks.append((packet.pts * self._tb, seg.pdt))
                            del self._marks[:-8]
                    if plan is not None:
                        if plan.packets_are_progress:  # frames are skipped: packets are the progress
                            self._progress_t = time.monotonic()
                        if plan.skip(packet):
                            continue
                    try:
                        frames = ctx.decode(packet) if plan is None else plan.decode(packet)
                    except av.error.InvalidDataError:
                        continue  # a damaged packet: skipped, the decoder goes on
                    if not self._emit(frames):
                        return False
            except av.error.InvalidDataError as e:  # a damaged segment: what decoded is kept, the rest skipped
                log.warning("HLS segment partly undecodable", stream=self.cfg.id, error=str(e))
                feed.drain()
            self._progress_t = time.monotonic()
            try:
                if not self._emit(ctx.decode(None)):
                    return False
            except av.error.FFmpegError:
                pass
        finally:
            container.close()
        for d in feed.settle_all():
            self._skipped(d, "no decodable packet") if not d.packets else self._decoded(d)
        return True

    def _decoded(self, seg: Segment) -> None:
        self._bad_run = 0

    def _skipped(self, seg: Segment, reason: str) -> None:
        self._on_event("segment_skipped", {"media_sequence": seg.msn, "reason": reason})
        self._bad_segment(seg)

    def _bad_segment(self, seg: Segment) -> None:
        """One more undecodable segment: a feed of nothing but such segments is `corrupt_input`, not `live`."""
        self._bad_run += 1
        if self._bad_run >= _MAX_BAD_SEGMENTS:
            raise SourceError(f"corrupt input: {self._bad_run} HLS segments in a row are not decodable video "
                              f"(last: media sequence {seg.msn})", code="corrupt_input",
                              permanent=not self._state.get("decoded"))  # never any video: retrying is no use

    def _emit(self, frames: Any) -> bool:
        for vf in frames:
            if self._stop.is_set():
                return False
            self.frames_decoded += 1
            self._state["decoded"] = True
            self._progress_t = time.monotonic()
            pts = (vf.pts or 0) * self._tb
            decision = (self.plan or self.sampler).offer(pts)
            if not decision.keep:
                continue
            seg_pts, pdt = next(((p, d) for p, d in reversed(self._marks) if p <= pts + 1e-6),
                                self._marks[0] if self._marks else (pts, None))
            if pdt is not None:
                capture, source = pdt + (pts - seg_pts), "source"
            else:
                capture, source = time.time(), "receive"
            image = self._rgb.reformat(vf, format="rgb24", threads=SWS_THREADS).to_ndarray()
            if self.sampler.scene is not None:  # sampling: scene
                decision = self.sampler.scene.gate(pts, image, decision.discontinuity)
                if not decision.keep:
                    continue
            frame = Frame(stream_id=self.cfg.id, seq=next(self._seq), pts_s=pts, capture_ts=capture, image=image,
                          discontinuity=decision.discontinuity, capture_source=source)
            self._waiting = True
            queued = self._out.put_threadsafe(frame, self._stop)
            self._waiting = False
            if not queued:
                return False
        return True


__all__ = ["HlsSource", "EgressError"]

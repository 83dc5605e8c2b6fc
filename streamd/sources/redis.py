"""Redis frame-stream source: frames pushed by the user into a Redis stream, read through a consumer group.

Entry fields: ``image`` (JPEG/PNG bytes, or raw pixels with ``shape`` "H,W[,C]" and ``dtype``, e.g. uint8;
``color`` "bgr" if the raw pixels are BGR), optional ``ts`` (capture time, epoch seconds) and ``pts`` (seconds);
other fields are passed through as metadata. On start the consumer first re-reads its own pending entries, then
new ones; entries idle in other (dead) consumers' pending lists are claimed. An entry that fails
`max_deliveries` times is copied to ``<key>:dead`` with the reason and acknowledged, in one MULTI/EXEC.
On a Redis Cluster every command touches one key, except that pair: it is one MULTI/EXEC when ``<key>`` carries a
hash tag (``frames:{cam1}``: ``frames:{cam1}:dead`` is in its slot); otherwise the dead letter is written first and
the entry acknowledged after (at least once: a failure between the two leaves it pending, and a later delivery
may write a second dead letter for it).
The only blocking call is XREADGROUP (bounded by `block_ms`); image decoding runs in a worker thread.
On another server than the daemon's own, every connection (each reconnect too) resolves the host through the
stream's egress policy and connects to the checked address (streamd.redis_clients.PolicedConnection); a refusal
ends the connection attempt with the policy's EgressError (`egress_refused`), like any other source's.
Entries are acknowledged on the server they came from: on the daemon's own Redis in the MULTI/EXEC of their results
(the sink); on another server by the sink after their results were written (`InputRef.server`), and entries
skipped or dead-lettered here on this source's own client. An entry on another server that is read again (its own
pending list after a restart, a claim) and is marked in `streamd:{<stream_id>}:acking` on the daemon's own Redis
(its result was written, and the daemon stopped before acknowledging it) is acknowledged without a second result.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import math
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from streamd.config import RedisInputConfig, StreamConfig
from streamd.errors import FrameDecodeError, ImageTooLarge, SourceError
from streamd.frames import Frame, InputRef
from streamd import keys
from streamd.keys import dead_letter_key, same_slot
from streamd.log import get_logger, redact_text
from streamd.redis_clients import egress_error, is_cluster, is_other_server
from streamd.sampling import FpsSampler
from streamd.sources.base import EventFn, Settlement

log = get_logger("streamd.source.redis")


def default_consumer_name() -> str:
    return f"streamd-{socket.gethostname()}"


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 3840 * 2160


def _shape(raw: bytes) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in raw.decode("ascii").replace("x", ",").split(",") if x.strip())
    except (ValueError, UnicodeDecodeError):
        raise FrameDecodeError("shape is not a list of integers (H,W[,C])") from None
    if len(dims) not in (2, 3):
        raise FrameDecodeError("shape must be H,W or H,W,C")
    if any(d <= 0 for d in dims):
        raise FrameDecodeError("shape has a dimension that is not positive")
    if len(dims) == 3 and dims[2] not in (1, 3, 4):
        raise FrameDecodeError("shape's channel count must be 1, 3 or 4")
    return dims


def _dtype(raw: bytes) -> np.dtype:
    try:
        dtype = np.dtype(raw.decode("ascii"))
    except (TypeError, ValueError, UnicodeDecodeError, SyntaxError):
        raise FrameDecodeError("dtype is not a numpy dtype") from None
    if dtype.kind not in "buif" or dtype.fields is not None or dtype.subdtype is not None:  # no text, void, dates
        raise FrameDecodeError("dtype must be a plain numeric type (bool, int, uint or float)")
    return dtype


def _over_budget(h: int, w: int, max_pixels: int) -> FrameDecodeError | None:
    if h * w > max_pixels:
        return ImageTooLarge(f"image is {w}x{h}, over redis_input.max_pixels ({max_pixels})", w, h, max_pixels)
    return None


def _raw(data: bytes, fields: dict[bytes, bytes], shape_raw: bytes, max_pixels: int) -> np.ndarray:
    shape = _shape(shape_raw)
    dtype = _dtype(fields.get(b"dtype", b"uint8"))
    too_big = _over_budget(shape[0], shape[1], max_pixels)
    if too_big:
        raise too_big
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise FrameDecodeError("raw image size does not match shape and dtype")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    if fields.get(b"color", b"rgb").lower() == b"bgr":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def _identify(data: bytes) -> Any:
    """PIL's own opening (Image._open_core) over IMAGE_FORMATS only, without `PIL.Image.open`, which other libraries
    replace: Ultralytics' replacement imports (and with internet even pip-installs) a HEIF plugin whenever an image
    is not identified, so hostile bytes would get "ModuleNotFoundError" as their reason, or worse."""
    from PIL import Image, UnidentifiedImageError

    Image.init()  # the plugins of IMAGE_FORMATS registered (once)
    fp = io.BytesIO(data)
    prefix = data[:16]
    for fmt in IMAGE_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None:
            ok = accept(prefix)
            if not ok or isinstance(ok, str):  # a string: "looks like it, but cannot be read" (PIL's convention)
                continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError("not identified")


def _encoded(data: bytes, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with _identify(data) as im:
            w, h = im.size  # from the header: nothing decoded yet
            too_big = _over_budget(h, w, max_pixels)
            if too_big:
                raise too_big
            return np.asarray(im.convert("RGB"))
    except FrameDecodeError:
        raise
    except UnidentifiedImageError:
        raise FrameDecodeError("cannot decode image: not a JPEG, PNG, WEBP, BMP or TIFF image") from None
    except Image.DecompressionBombError:
        raise FrameDecodeError("cannot decode image: over PIL's decompression-bomb limit") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise FrameDecodeError("cannot decode image: truncated or corrupt image data") from None


def decode_image(fields: dict[bytes, bytes], image_field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an entry's image into HxWx3 uint8 RGB, within `max_pixels`. Raises FrameDecodeError with a stable
    reason (no addresses, no values from the entry: dead letters can be grouped by it), whatever goes wrong."""
    data = fields.get(image_field.encode())
    if not data:
        raise FrameDecodeError(f"missing field {image_field!r}")
    shape_raw = fields.get(b"shape")
    try:
        if shape_raw is not None:
            return _raw(data, fields, shape_raw, max_pixels)
        return _encoded(data, max_pixels)
    except FrameDecodeError:
        raise
    except MemoryError:
        raise FrameDecodeError("cannot decode image: out of memory") from None
    except Exception as e:  # noqa: BLE001 - a decoder bug must not take the stream down
        raise FrameDecodeError(f"cannot decode image: {type(e).__name__}") from None


def _float(fields: dict[bytes, bytes], name: bytes) -> float | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        raise FrameDecodeError(f"{name.decode()} is not a number") from None
    if not math.isfinite(v):  # NaN / inf would reach every JSON consumer of the results
        raise FrameDecodeError(f"{name.decode()} is not a finite number")
    return v


_MARKS_TIMEOUT_S = 2.0  # the check of entries read again against the daemon's own Redis (its acking marks)


class RedisFrameSource:
    def __init__(
        self,
        cfg: StreamConfig,
        client: aioredis.Redis,
        key: str,
        sampler: FpsSampler,
        seq: itertools.count,
        consumer: str,
        inflight: Settlement,
        on_event: EventFn,
        own_client: Callable[[], aioredis.Redis] | None = None,
    ):
        self.cfg = cfg
        self.icfg: RedisInputConfig = cfg.redis_input
        self.r = client
        self._server = client if is_other_server(client) else None  # its entries are acknowledged on it (the sink)
        self._own_client = own_client  # the daemon's own Redis (its acking marks), for an input on another server
        self.key = key
        self.sampler = sampler
        self._seq = seq
        self.consumer = consumer
        self._inflight = inflight  # entries handed to the pipeline and not yet settled by the sink
        inflight.source = self  # a frame that failed in a stage is failed through this connection
        self._on_event = on_event
        self._pending: list[tuple[bytes, dict[bytes, bytes], int]] = []
        self._backlog_done = False
        self._last_claim = 0.0
        self._claim_cursor = "0-0"
        self._backlog_cursor: bytes | str = "0"
        self._backlog_again = False  # the backlog's check failed (the own Redis down): read on, that page later
        self._marks_down_until = 0.0  # the own Redis failed a check: no claim or backlog page until then
        self._group_ready = False
        self.created_group = False  # this source made the consumer group (removed with an API stream)
        self._closed = False
        self.frames_decoded = 0

    def __aiter__(self) -> "RedisFrameSource":
        return self

    async def aclose(self) -> None:
        self._closed = True

    async def __anext__(self) -> Frame:
        while not self._closed:
            try:
                if not self._pending:
                    await self._fill()
            except RedisError as e:
                refused = egress_error(e)  # the server's address refused at connect time: the policy's reason
                if refused is not None:
                    raise refused from None
                raise SourceError(f"redis: {redact_text(str(e)) or type(e).__name__}") from None
            while self._pending:
                entry_id, fields, deliveries = self._pending.pop(0)
                frame = await self._to_frame(entry_id, fields, deliveries)
                if frame is not None:
                    return frame
        raise StopAsyncIteration

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.r.xgroup_create(self.key, self.icfg.group, id=self.icfg.start_id, mkstream=True)
            self.created_group = True
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def _fill(self) -> None:
        await self._ensure_group()
        if self._backlog_again and time.monotonic() >= self._marks_down_until:
            self._backlog_done = self._backlog_again = False  # the page whose check failed, again
        if not self._backlog_done:  # our own pending entries first (a restart), paged through to the end
            resp = await self.r.xreadgroup(self.icfg.group, self.consumer, {self.key: self._backlog_cursor},
                                           count=self.icfg.read_count)
            page = resp[0][1] if resp else []
            if not page:
                self._backlog_done = True
            else:
                # deleted entries have no fields; entries still in the pipeline are settled by it
                entries = [(i, f) for i, f in page if f and i.decode() not in self._inflight]
                checked = await self._unpublished(entries)
                if checked is None:  # the own Redis is down: this page again later, new entries meanwhile
                    self._backlog_done = True
                    self._backlog_again = True
                else:
                    self._backlog_cursor = page[-1][0]
                    if checked:
                        self._pending.extend(await self._with_counts(checked))
                    return
        now = time.monotonic()
        # idle entries of other (dead) consumers: every page at once, then again after claim_idle_ms / 2
        if (self._claim_cursor != "0-0" or now - self._last_claim >= self.icfg.claim_idle_ms / 2000) \
                and now >= self._marks_down_until:
            if self._claim_cursor == "0-0":
                self._last_claim = now
            claimed = await self._claim()
            if claimed:
                self._pending.extend(claimed)
                return
            if self._claim_cursor != "0-0":
                return  # a page of nothing usable: the next one at once
        block = min(self.icfg.block_ms, max(1, self.icfg.claim_idle_ms // 2))
        resp = await self.r.xreadgroup(
            self.icfg.group, self.consumer, {self.key: ">"}, count=self.icfg.read_count, block=block
        )
        for _key, entries in resp or []:
            self._pending.extend((i, f, 1) for i, f in entries)

    async def _claim(self) -> list[tuple[bytes, dict[bytes, bytes], int]]:
        resp = await self.r.xautoclaim(
            self.key, self.icfg.group, self.consumer, self.icfg.claim_idle_ms, self._claim_cursor,
            count=max(self.icfg.read_count, 100),
        )
        cursor, entries = resp[0], resp[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries = await self._unpublished([(i, f) for i, f in entries if f and i.decode() not in self._inflight])
        if entries is None:  # the own Redis is down: claimed again once idle; this pass ends here
            self._claim_cursor = "0-0"
            return []
        return await self._with_counts(entries) if entries else []

    async def _unpublished(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[bytes, dict]] | None:
        """An input on another server: of entries read again, those whose results were written already (marked in
        the stream's acking hash on the daemon's own Redis) are acknowledged here, and the rest returned. None: the
        daemon's own Redis could not be asked (the entries stay pending, not delivered now)."""
        if self._server is None or self._own_client is None or not entries:
            return entries
        own = self._own_client()
        mark = keys.acking_key(self.cfg.id)
        fields = [keys.acking_field(self.key, self.icfg.group, i.decode()) for i, _ in entries]
        try:
            async with asyncio.timeout(_MARKS_TIMEOUT_S):  # a paused own Redis holds up no read for long
                marked = await own.hmget(mark, fields)
        except (RedisError, OSError, TimeoutError) as e:
            # the daemon's own Redis is down: these entries are left pending (claimed again once idle), and the
            # input reads on (its results wait in the sink); never a failure of the stream
            log.info("entries read again left pending: the daemon's own Redis is unreachable", stream=self.cfg.id,
                     entries=len(entries), error=redact_text(str(e)) or type(e).__name__)
            self._marks_down_until = time.monotonic() + self.icfg.claim_idle_ms / 2000
            return None
        done = [(i, fld) for (i, _), fld, m in zip(entries, fields, marked) if m is not None]
        if not done:
            return entries
        await self.r.xack(self.key, self.icfg.group, *(i for i, _ in done))
        try:
            await own.hdel(mark, *(fld for _, fld in done))
        except (RedisError, OSError):
            pass  # a mark left behind (its entry is acknowledged): the hash's expiry bounds it
        log.info("entries whose results were written already acknowledged", stream=self.cfg.id, entries=len(done))
        return [e for e, m in zip(entries, marked) if m is None]

    async def _with_counts(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[bytes, dict, int]]:
        ids = [i for i, _ in entries]
        rows = await self.r.xpending_range(self.key, self.icfg.group, min=min(ids), max=max(ids), count=len(ids) * 4 + 16)
        counts = {row["message_id"]: int(row["times_delivered"]) for row in rows}
        return [(i, f, counts.get(i, 1)) for i, f in entries]

    async def _to_frame(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> Frame | None:
        eid = entry_id.decode()
        try:
            ts = _float(fields, b"ts")
            pts = _float(fields, b"pts")
        except FrameDecodeError as e:
            await self.fail(InputRef(self.key, self.icfg.group, eid, deliveries), str(e), fields)
            return None
        if ts is None:
            ts = int(eid.split("-")[0]) / 1000.0
        pts = ts if pts is None else pts
        decision = self.sampler.offer(pts)
        if not decision.keep:  # sampled out: acknowledged without a result
            await self.r.xack(self.key, self.icfg.group, eid)
            return None
        try:
            image = await asyncio.to_thread(decode_image, fields, self.icfg.image_field, self.icfg.max_pixels)
        except FrameDecodeError as e:
            await self.fail(InputRef(self.key, self.icfg.group, eid, deliveries), str(e), fields)
            return None
        self.frames_decoded += 1
        if self.sampler.scene is not None:  # sampling: scene (each daemon of a consumer group judges its share)
            decision = self.sampler.scene.gate(pts, image, decision.discontinuity)
            if not decision.keep:
                await self.r.xack(self.key, self.icfg.group, eid)
                return None
        self._inflight.add(eid)
        meta = {
            k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in fields.items()
            if k not in (self.icfg.image_field.encode(), b"shape", b"dtype", b"ts", b"pts", b"color") and len(v) < 1024
        }
        return Frame(
            stream_id=self.cfg.id,
            seq=next(self._seq),
            pts_s=pts,
            capture_ts=ts,
            image=image,
            ref=InputRef(self.key, self.icfg.group, eid, deliveries, handle=self._inflight, server=self._server),
            discontinuity=decision.discontinuity,
            meta=meta or None,
        )

    async def skip(self, ref: InputRef) -> None:
        """Acknowledge an entry without a result (its frame was dropped on purpose); Redis down: it stays pending
        and is delivered again."""
        try:
            await self.r.xack(self.key, ref.group, ref.entry_id)
        except (RedisError, OSError) as e:
            log.warning("could not acknowledge a dropped entry", stream=self.cfg.id, entry=ref.entry_id,
                        error=str(e) or type(e).__name__)

    async def fail(self, ref: InputRef, reason: str, fields: dict[bytes, bytes] | None = None) -> bool:
        """Record a failed delivery. After `max_deliveries` the entry goes to the dead-letter stream and is
        acknowledged (one MULTI/EXEC); before that it stays pending and is retried after `claim_idle_ms`.
        Returns True when the entry was dead-lettered."""
        self._inflight.discard(ref.entry_id)
        if ref.deliveries < self.icfg.max_deliveries:
            log.info("frame entry failed, will retry", stream=self.cfg.id, entry=ref.entry_id,
                     deliveries=ref.deliveries, reason=reason)
            return False
        if fields is None:
            resp = await self.r.xrange(self.key, ref.entry_id, ref.entry_id)
            fields = resp[0][1] if resp else {}
        dead = {k: v for k, v in fields.items()}
        dead.update({
            b"dead.reason": reason.encode(),
            b"dead.source_key": self.key.encode(),
            b"dead.entry_id": ref.entry_id.encode(),
            b"dead.deliveries": str(ref.deliveries).encode(),
            b"dead.stream_id": self.cfg.id.encode(),
            b"dead.ts": repr(time.time()).encode(),
        })
        dead_key = dead_letter_key(self.key)
        if not is_cluster(self.r) or same_slot(dead_key, self.key):  # always one slot on a single Redis
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.xadd(dead_key, dead, maxlen=10_000, approximate=True)
                pipe.xack(self.key, ref.group, ref.entry_id)
                await pipe.execute()
        else:  # a cluster, an input key without a hash tag: the dead letter, then the acknowledgement
            await self.r.xadd(dead_key, dead, maxlen=10_000, approximate=True)
            await self.r.xack(self.key, ref.group, ref.entry_id)
        log.warning("frame entry dead-lettered", stream=self.cfg.id, entry=ref.entry_id, reason=reason)
        self._on_event("dead_letter", {"entry_id": ref.entry_id, "reason": reason, "deliveries": ref.deliveries})
        return True

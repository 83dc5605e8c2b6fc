"""Publishes result records and events to Redis streams (XADD MAXLEN ~), and acknowledges Redis inputs in the
same MULTI/EXEC as their result.

Records wait in one bounded in-memory buffer. While Redis is reachable a full buffer makes producers wait
(nothing is lost); while it is not, the daemon keeps running, the sink retries with exponential backoff and
jitter, and a full buffer drops its oldest records (counted). An input entry whose record was dropped is simply
not acknowledged, so Redis delivers it again: no input is ever acknowledged without its result.

Under load the sink waits a little for fuller batches (until `publish_batch` records are buffered or the oldest
has waited `publish_max_wait_ms`); after a quiet spell a record goes at once. A batch is packed with hiredis and
written on the sink's own connection in one go: no pipeline object, no pool, no per-command callbacks on the hot
path.

On a Redis Cluster (a `RedisCluster` client) a batch is split by slot and node instead (streamd.sinks.cluster): an
input entry is acknowledged in the MULTI/EXEC of its result only when its key is in the result's slot (tagged with
the stream id, `frames:{<stream_id>}`); otherwise after its result was written (at least once: a failure between
the two delivers the entry again, and it gets a second result).

An input entry on another Redis server than the daemon's own (`redis://host:port/...#key`) is acknowledged on that
server, after its result was written (streamd.sinks.redis.ServerAcks): at least once, since no MULTI/EXEC spans two
servers a crash between the two writes delivers the entry again). Its result's MULTI/EXEC also marks the entry in
`streamd:{<stream_id>}:acking` (removed once acknowledged), and the input skips (and acknowledges) an entry it
reads again that is marked there: no second result after a restart either (not on a Redis Cluster, whose writer
marks nothing: there such an entry gets a second result, its `input.deliveries` above 1).
While the daemon runs, an entry whose result is written stays in its input's pipeline set until acknowledged, so a
reconnected input does not read it again; an acknowledgement that fails (that server down) is retried with backoff,
per server, without holding back anyone's results.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.exceptions import RedisError, ResponseError

from streamd import jsonsafe, keys
from streamd.config import RedisConfig
from streamd.frame_store import FrameStore
from streamd.frames import PREDICT_PREFIX, InputRef, Work
from streamd.log import get_logger
from streamd.metrics import Metrics
from streamd.redis_clients import egress_error, is_cluster
from streamd.sinks.cluster import ClusterWriter, ack_failed

log = get_logger("streamd.sink")

_MULTI, _EXEC = pack_command(("MULTI",)), pack_command(("EXEC",))
_UNMARK_MAX = 100_000  # marks of acknowledged entries kept for removal while the daemon's own Redis fails


# a result write in fleet mode: only while the stream's lease still holds the writer's token (fencing)
# KEYS: lease, results, lease:last; ARGV: token, maxlen, fields... A lease key that is missing (expired while Redis was
# away) still lets its holder write while nobody took the stream since and it was not released (lease:last is still
# the writer's token; the fleet's renewal takes the key again): results buffered during an outage are published.
FENCED_XADD = ("local v = redis.call('GET', KEYS[1]) "
               "if v ~= ARGV[1] and (v or redis.call('GET', KEYS[3]) ~= ARGV[1]) then "
               "return 0 end "
               "return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))")  # its entry id
# a key set under the same fence (a stream's end record, written after its last result). KEYS: lease, key, lease:last;
# ARGV: token, value
FENCED_SET = ("local v = redis.call('GET', KEYS[1]) "
              "if v ~= ARGV[1] and (v or redis.call('GET', KEYS[3]) ~= ARGV[1]) then "
              "return 0 end "
              "return redis.call('SET', KEYS[2], ARGV[2])")


@dataclass(slots=True)
class Pending:
    key: str
    maxlen: int
    fields: dict[str, Any]  # the entry; a result's "record" field is encoded when it is sent
    result: dict[str, Any] | None = None  # a result record (not the frame: its image is freed once buffered)
    ack: InputRef | None = None  # an input entry on the daemon's own Redis: acknowledged with the record
    server_ack: InputRef | None = None  # one on another server: acknowledged there once the record is written
    queued_t: float = 0.0  # time.monotonic() when it was buffered
    event: bool = False  # a state/gap/dead-letter event: kept in the buffer's reserved share, dropped last
    fence: tuple[str, str] | None = None  # (lease key, token): written only while the lease holds it (fleet)
    written: bool = False  # Redis Cluster: in Redis already (a retried batch skips it)
    acked: bool = False  # Redis Cluster: its input entry acknowledged already
    stored: Any = None  # the frame kept in the frame store (streamd.frame_store): told its entry id once written
    value: str | None = None  # not an entry: `key` is set to this (a stream's end record)
    then: Callable[[], None] | None = None  # called once it was written (not when refused by its fence)

    @property
    def stream_id(self) -> str:
        sid = self.fields.get("stream_id", "")
        return sid if isinstance(sid, str) else str(sid)


def result_record(w: Work) -> dict[str, Any]:
    """The documented result record (schema_version 1); `publish_ts` is set when it is sent."""
    f = w.frame
    rec: dict[str, Any] = {
        "schema_version": keys.SCHEMA_VERSION,
        "stream_id": f.stream_id,
        "seq": f.seq,
        "pts_s": round(f.pts_s, 6),
        "capture_ts": round(f.capture_ts, 6),
        "capture_ts_source": f.capture_source,
        "publish_ts": None,
        "width": f.width,
        "height": f.height,
        "discontinuity": f.discontinuity,
        "outputs": w.outputs,
        "prompt_versions": w.prompt_versions,
        "timings_ms": w.timings_ms,
        "error": w.error,
    }
    if f.ref is not None:
        rec["input"] = {"key": f.ref.key, "entry_id": f.ref.entry_id, "deliveries": f.ref.deliveries}
    if f.meta:
        rec["meta"] = f.meta
    return rec


_json = jsonsafe.encoder(separators=(",", ":"))  # never NaN/Infinity: a stray one becomes null


def _settle(ref: InputRef) -> None:
    """The input entry's fate is sealed (acknowledged with its result, or dropped and to be delivered again): its
    input stops counting it as in the pipeline."""
    if ref.handle is not None:
        ref.handle.settled(ref)


def _encode(p: Pending, now: float) -> None:
    if p.result is not None:
        p.result["publish_ts"] = round(now, 6)
        p.fields["record"] = _json(p.result)


def _write_args(p: Pending) -> tuple[Any, ...]:
    """A record's write: XADD, or in fleet mode the fenced XADD (one Lua call over the lease and the results stream,
    which share the stream's hash tag: one Cluster slot); a value record's SET, fenced alike."""
    if p.value is not None:
        if p.fence is not None:
            return ("EVAL", FENCED_SET, 3, p.fence[0], p.key, p.fence[0] + ":last", p.fence[1], p.value)
        return ("SET", p.key, p.value)
    if p.fence is not None:
        return ("EVAL", FENCED_XADD, 3, p.fence[0], p.key, p.fence[0] + ":last", p.fence[1], p.maxlen,
                *chain(*p.fields.items()))
    return ("XADD", p.key, "MAXLEN", "~", p.maxlen, "*", *chain(*p.fields.items()))


class RedisSink:
    def __init__(
        self,
        client: aioredis.Redis,
        cfg: RedisConfig,
        metrics: Metrics,
    ):
        self.r = client
        self.cfg = cfg
        self.metrics = metrics
        # fleet mode: the lease (key, token) a stream's results must still hold when written, and who to tell when
        # a write was refused because the lease moved on
        self.fence_for: Callable[[str], tuple[str, str] | None] | None = None
        self.on_fenced: Callable[[str, str], None] | None = None  # (stream, the refused lease token)
        self.fenced = 0  # records (results, events) refused because their stream's lease had moved on
        self.member: str | None = None  # fleet mode: this daemon's id, written into each result (`daemon`)
        self.frames: FrameStore | None = None  # recent frames (snapshots): each told its result's entry id
        self._buf: deque[Pending] = deque()
        self._ready = asyncio.Event()
        self._full = asyncio.Event()  # publish_batch records are buffered
        self._space = asyncio.Event()
        # the sink's own connection (it connects when first used); a round trip is timed as a whole, so the
        # connection has no socket timeout of its own (redis-py would run every write as a task with a timer)
        self._cluster: ClusterWriter | None = None
        self._conn: Any = None
        self._timeout_s: float | None = None
        if is_cluster(client):  # the cluster client's pipelines, split by node (streamd.sinks.cluster)
            self._cluster = ClusterWriter(client, _write_args)
        else:
            pool = client.connection_pool
            self._timeout_s = pool.connection_kwargs.get("socket_timeout")
            self._conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._sent_at = -math.inf  # time.monotonic() when the last send began
        self._idle = asyncio.Event()
        self._idle.set()
        self.healthy = True
        self.last_error: str | None = None
        self.published = 0
        self.overflowed = 0
        self.results_by_stream: dict[str, int] = {}
        self.catching_up = False  # an outage's backlog is still being published (set while down, cleared when empty)
        self._events = 0  # events in the buffer
        self._lost: dict[str, dict[str, int]] = {}  # dropped to overflow during this outage, per stream and kind
        self._queued = 0  # records ever buffered
        self._gone = 0  # of those, published or dropped (the buffer is FIFO: the first `_gone` are done)
        self._progress = asyncio.Event()
        self._server_acks: dict[int, ServerAcks] = {}  # input entries to acknowledge on other servers, per client

    # -- producers ------------------------------------------------------------------------------------------
    async def publish_results(self, works: list[Work]) -> None:
        for w in works:
            while self.healthy and len(self._buf) >= self.cfg.buffer_max_records:
                self._space.clear()
                await self._space.wait()
            f = w.frame
            fields = {"schema_version": keys.SCHEMA_VERSION, "stream_id": f.stream_id, "seq": f.seq}
            # leased streams only (never Redis inputs): a refused write must not take an XACK through with it
            fence = self.lease_fence(f.stream_id) if f.ref is None else None
            rec = result_record(w)
            if self.member is not None:
                rec["daemon"] = self.member
            stored = self.frames.add(f) if self.frames is not None else None
            own = f.ref is not None and f.ref.server is None
            self._append(Pending(keys.results_key(f.stream_id), self.cfg.results_maxlen, fields, rec,
                                 f.ref if own else None, fence=fence, stored=stored,
                                 server_ack=None if own else f.ref))

    def lease_fence(self, stream_id: str) -> tuple[str, str] | None:
        """Fleet mode: the lease (key, token) a leased stream's record must still hold when written (its results,
        the events of its frames); None otherwise. Only for leased streams (never a Redis input's)."""
        return self.fence_for(stream_id) if self.fence_for is not None else None

    def event(self, stream_id: str, kind: str, fields: dict[str, Any] | None = None,
              fence: tuple[str, str] | None = None) -> None:
        """Queue an event; never waits (events are small and rare). A predict request's frame (a stream id with
        PREDICT_PREFIX) is answered to its caller, never published: what stages say of it is dropped here. `fence`
        (fleet mode, a leased stream's event): written only while that lease holds, like a result; a refused event
        is dropped and counted as a fenced record."""
        if stream_id.startswith(PREDICT_PREFIX):
            return
        p = self._event(stream_id, kind, fields)
        p.fence = fence
        self._append(p)

    def set_after(self, stream_id: str, key: str, value: str, fence: tuple[str, str] | None,
                  then: Callable[[], None] | None = None) -> None:
        """Queue `SET key value` behind every record buffered so far (the buffer is written in order: it is written
        after them), under `fence` like a result; `then()` once it was written (not when its fence refused it)."""
        self._append(Pending(key, 0, {"stream_id": stream_id}, event=True, fence=fence, value=value, then=then))

    def _event(self, stream_id: str, kind: str, fields: dict[str, Any] | None) -> Pending:
        body = {"type": kind, "ts": round(time.time(), 6), "stream_id": stream_id, **(fields or {})}
        rec = {"schema_version": keys.SCHEMA_VERSION, "stream_id": stream_id, "type": kind, "event": _json(body)}
        return Pending(keys.events_key(stream_id), self.cfg.events_maxlen, rec, event=True)

    def record(self, key: str, maxlen: int, record: dict[str, Any]) -> None:
        """Queue a JSON record for any stream key (VLM answers); never waits."""
        rec = {"schema_version": keys.SCHEMA_VERSION, "stream_id": record.get("stream_id", ""),
               "record": _json(record)}
        self._append(Pending(key, maxlen, rec))

    def _append(self, p: Pending) -> None:
        if len(self._buf) >= self.cfg.buffer_max_records:
            self._drop_one()
        p.queued_t = time.monotonic()
        self._buf.append(p)
        self._events += p.event
        self._queued += 1
        self._idle.clear()
        self._ready.set()
        if len(self._buf) >= self.cfg.publish_batch:
            self._full.set()

    def _drop_one(self) -> None:
        """The buffer is full (Redis down): drop the oldest result, keeping events while they fit in their
        reserved share (`events_reserved`); the loss is logged, counted and published once Redis is back."""
        reserve = self.cfg.buffer_max_records * self.cfg.events_reserved
        i = 0
        if self._events <= reserve and self._events < len(self._buf):
            i = next(k for k, x in enumerate(self._buf) if not x.event)
        old = self._buf[i]
        del self._buf[i]
        self._events -= old.event
        self._done(1)
        self.overflowed += 1
        self.metrics.buffer_overflow.inc()
        if not self._lost:  # the first loss of this outage
            log.warning("outage buffer full: dropping the oldest records (events last)",
                        buffer_max_records=self.cfg.buffer_max_records, stream=old.stream_id)
        lost = self._lost.setdefault(old.stream_id, {"results": 0, "events": 0})
        lost["events" if old.event else "results"] += 1
        if old.ack is not None or old.server_ack is not None:
            _settle(old.ack or old.server_ack)  # not acknowledged: Redis will deliver it again

    def _report_losses(self) -> None:
        """Redis is back: one `records_dropped` event per stream that lost records to the full buffer."""
        lost, self._lost = self._lost, {}
        for sid, n in lost.items():
            log.warning("records dropped during the Redis outage", stream=sid, **n)
            if sid:  # over the buffer's bound by one event per stream: a report must not cause another loss
                p = self._event(sid, "records_dropped", {**n, "reason": "outage buffer full "
                                f"(redis.buffer_max_records={self.cfg.buffer_max_records})"})
                p.queued_t = time.monotonic()
                self._buf.append(p)
                self._events += 1
                self._queued += 1

    def __len__(self) -> int:
        return len(self._buf)

    async def wait_idle(self) -> None:
        """Wait until everything buffered has been published."""
        await self._idle.wait()

    async def flushed(self, timeout_s: float) -> bool:
        """Wait until every record buffered before this call has been published (or dropped), however busy the
        sink stays with later ones; False when `timeout_s` passed first (Redis down). A removed stream waits for
        this, so nothing of it appears after its DELETE returned."""
        target = self._queued
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._gone < target:
                    self._progress.clear()
                    await self._progress.wait()
        return self._gone >= target

    def _done(self, n: int) -> None:
        self._gone += n
        self._progress.set()

    async def aclose(self) -> None:
        # what is left goes now (every server at once, one bound for all), or is delivered again after a restart
        bound = min(2.0, self.cfg.retry_max_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound + 0.5):
                await asyncio.gather(*(acks.aclose(bound) for acks in self._server_acks.values()),
                                     return_exceptions=True)
        self._server_acks.clear()
        if self._conn is None:
            return  # Redis Cluster: the client's connections are its owner's to close
        with contextlib.suppress(Exception):  # closing a dead connection
            await self._conn.disconnect()

    # -- publisher ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Publish until cancelled. Never raises on Redis errors: it backs off and retries."""
        delay = self.cfg.retry_initial_s
        while True:
            if not self._buf:
                self.catching_up = False
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._linger()
            n = min(len(self._buf), self.cfg.publish_batch)
            batch = [self._buf[i] for i in range(n)]
            try:
                await self._send(batch)
            except (RedisError, OSError) as e:
                self.metrics.publish_errors.inc()
                if self.healthy:
                    log.warning("redis unreachable, buffering records", error=str(e) or type(e).__name__,
                                buffered=len(self._buf))
                self.healthy = False
                self.catching_up = True
                self.last_error = str(e) or type(e).__name__
                self._space.set()  # producers stop waiting: the buffer now drops its oldest
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if not self.healthy:
                log.info("redis reachable again, publishing buffered records", buffered=len(self._buf))
                self._report_losses()
            self.healthy = True
            self.last_error = None
            delay = self.cfg.retry_initial_s
            for p in batch:  # still at the front, unless overflow trimmed it during the send
                if self._buf and self._buf[0] is p:
                    self._buf.popleft()
                    self._events -= p.event
                    self._done(1)
                if p.ack is not None:
                    _settle(p.ack)
                elif p.server_ack is not None:
                    self._ack_on_server(p.stream_id, p.server_ack)
            self.published += n
            self.metrics.buffered.set(len(self._buf))
            self._space.set()

    async def _linger(self) -> None:
        """While busy, wait for a fuller batch: until `publish_batch` records are buffered or the oldest has waited
        `publish_max_wait_ms`. Busy: the previous send began less than that long ago. After a quiet spell (or while
        Redis is down) a record goes at once."""
        max_wait_s = self.cfg.publish_max_wait_ms / 1000.0
        now = time.monotonic()
        if now - self._sent_at >= max_wait_s or len(self._buf) >= self.cfg.publish_batch or not self.healthy:
            return
        wait_s = self._buf[0].queued_t + max_wait_s - now
        if wait_s <= 0:
            return
        self._full.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._full.wait()

    async def _send(self, batch: list[Pending]) -> None:
        if self._cluster is not None:
            return await self._send_cluster(self._cluster, batch)
        self._sent_at = time.monotonic()
        now = time.time()
        # an acknowledgement goes in one MULTI/EXEC with its result; an entry on another server is marked there
        tx = any(p.ack is not None or p.server_ack is not None for p in batch)
        cmds = [_MULTI] if tx else []
        for p in batch:
            _encode(p, now)
            cmds.append(pack_command(_write_args(p)))
            if p.ack is not None:
                cmds.append(pack_command(("XACK", p.ack.key, p.ack.group, p.ack.entry_id)))
            elif p.server_ack is not None:
                a = p.server_ack
                cmds.append(pack_command(("HSET", keys.acking_key(p.stream_id),
                                          keys.acking_field(a.key, a.group, a.entry_id), "1")))
                # the hash lives while marks are written: one left behind (a failed removal) goes with it
                cmds.append(pack_command(("PEXPIRE", keys.acking_key(p.stream_id), keys.ACKING_TTL_MS)))
        if tx:
            cmds.append(_EXEC)
        replies = await self._roundtrip(cmds)
        replies = replies[-1] if tx else replies  # EXEC's array (an error reply at top level raised already)
        writes = []
        i = 0
        for p in batch:
            writes.append(replies[i])
            if p.ack is not None and isinstance(replies[i + 1], Exception):
                ack_failed(p, replies[i + 1])
            i += 1 + (p.ack is not None) + 2 * (p.server_ack is not None)
        error = next((r for r in writes if isinstance(r, Exception)), None)
        if error is not None:
            raise error
        done: dict[str, int] = {}  # results per stream
        for p, reply in zip(batch, writes):
            self._account(p, reply, now, done)
        self._count(done)

    async def _send_cluster(self, writer: ClusterWriter, batch: list[Pending]) -> None:
        """Redis Cluster: what of the batch is not in Redis yet, split by slot and node (streamd.sinks.cluster)."""
        self._sent_at = time.monotonic()
        now = time.time()
        for p in batch:
            if not p.written:
                _encode(p, now)
        done: dict[str, int] = {}
        try:
            await writer.write(batch, lambda p, reply: self._account(p, reply, now, done))
        finally:
            self._count(done)

    def _account(self, p: Pending, reply: Any, now: float, done: dict[str, int]) -> None:
        """A record's write answered `reply`: count it (or its fencing)."""
        if p.fence is not None and reply == 0:  # the lease moved on: not written, and never will be
            self.fenced += 1
            self.metrics.results_fenced.labels(p.stream_id).inc()
            if self.on_fenced is not None:
                self.on_fenced(p.stream_id, p.fence[1])
            return
        if p.then is not None:
            try:
                p.then()
            except Exception:  # noqa: BLE001 - the sink goes on whatever its callers do
                log.exception("a written record's callback failed", stream=p.stream_id)
        if p.stored is not None and isinstance(reply, (bytes, str)) and self.frames is not None:
            self.frames.written(p.stored, reply.decode() if isinstance(reply, bytes) else reply)
        if p.result is not None:
            sid = p.result["stream_id"]
            done[sid] = done.get(sid, 0) + 1
            self.metrics.stream(sid).e2e_latency.observe(max(0.0, now - p.result["capture_ts"]))

    def _ack_on_server(self, stream_id: str, ref: InputRef) -> None:
        """`ref`'s result is written: acknowledge its entry on its own server (in the background, retried)."""
        acks = self._server_acks.get(id(ref.server))
        if acks is None or acks.client is not ref.server:
            marks = None if self._cluster is not None else self.r  # a cluster's writer marks nothing
            acks = self._server_acks[id(ref.server)] = ServerAcks(ref.server, self.cfg, marks)
        acks.add(stream_id, ref)

    @property
    def server_acks_pending(self) -> int:
        """Input entries on other servers whose results are written and that are not acknowledged there yet."""
        return sum(len(a) for a in self._server_acks.values())

    def forget_stream(self, stream_id: str) -> None:
        """A deleted stream's result count goes with it (a new stream of that id counts from zero)."""
        self.results_by_stream.pop(stream_id, None)

    def _count(self, done: dict[str, int]) -> None:
        for sid, n in done.items():
            self.results_by_stream[sid] = self.results_by_stream.get(sid, 0) + n
            self.metrics.stream(sid).processed.inc(n)

    async def _roundtrip(self, cmds: list[bytes]) -> list[Any]:
        """Write packed commands on the sink's connection and read every reply, within the client's socket
        timeout."""
        conn = self._conn
        try:
            async with asyncio.timeout(self._timeout_s):
                await conn.send_packed_command(cmds)  # (re)connects when needed
                return [await conn.read_response(disable_decoding=True) for _ in cmds]
        except BaseException:
            await conn.disconnect()  # unread replies must never answer the next batch
            raise


class ServerAcks:
    """Acknowledges input entries on one other Redis server (a Redis input's client), after their results were
    written on the daemon's own Redis. Acknowledgements wait in a set and go in batches, one XACK per (key, group),
    on a task of their own: while that server is down they are retried with exponential backoff and jitter, and the
    results of every stream go on being written. An entry stays in its input's pipeline set (`Settlement`) until it
    is acknowledged, so a reconnected input does not read it again (no second result while the daemon runs). Once
    acknowledged, its mark in `streamd:{<stream_id>}:acking` (set with its result) is removed on `marks` (the
    daemon's own Redis; None: nothing was marked)."""

    def __init__(self, client: Any, cfg: RedisConfig, marks: Any = None):
        self.client = client
        self.cfg = cfg
        self.marks = marks
        self._refs: dict[tuple[str, str, str], tuple[str, InputRef]] = {}
        self._unmark: dict[str, set[str]] = {}  # marks to remove (kept while the daemon's own Redis fails)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self.last_error: str | None = None
        self.acked = 0

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, stream_id: str, ref: InputRef) -> None:
        self._refs[(ref.key, ref.group, ref.entry_id)] = (stream_id, ref)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        delay = self.cfg.retry_initial_s
        while True:
            if not self._refs:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._flush()
            except (RedisError, OSError) as e:
                refused = egress_error(e)
                err = str(refused or e) or type(e).__name__
                if self.healthy:
                    log.warning("input entries not acknowledged on their server yet: retrying", error=err,
                                pending=len(self._refs))
                self.healthy, self.last_error = False, err
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if not self.healthy:
                log.info("input entries acknowledged on their server again")
            self.healthy, self.last_error = True, None
            delay = self.cfg.retry_initial_s

    async def _flush(self) -> None:
        by_group: dict[tuple[str, str], list[tuple[str, InputRef]]] = {}
        for sid, ref in self._refs.values():
            by_group.setdefault((ref.key, ref.group), []).append((sid, ref))
        async with self.client.pipeline(transaction=False) as pipe:
            for (key, group), rs in by_group.items():
                pipe.xack(key, group, *(r.entry_id for _, r in rs))
            replies = await pipe.execute(raise_on_error=False)
        conn_error = next((r for r in replies if isinstance(r, (RedisError, OSError))
                           and not isinstance(r, ResponseError)), None)
        if conn_error is not None:
            raise conn_error
        unmark = self._unmark  # per stream, the marks of entries settled (and of earlier removals that failed)
        for ((key, group), rs), reply in zip(by_group.items(), replies):
            if isinstance(reply, Exception):  # NOGROUP, WRONGTYPE, NOPERM: no retry could acknowledge them
                log.warning("input entries not acknowledged", key=key, entries=len(rs), error=str(reply))
            # a mark answers an entry read again from its group's pending list: with no group or no stream there
            # (NOGROUP, WRONGTYPE) none ever is, and the mark goes too; otherwise (NOPERM) it is kept for the next
            # daemon (the hash's expiry bounds it)
            unmarked = not isinstance(reply, Exception) or str(reply).startswith(("NOGROUP", "WRONGTYPE"))
            for sid, r in rs:
                if self._refs.get((r.key, r.group, r.entry_id), (None, None))[1] is r:
                    del self._refs[(r.key, r.group, r.entry_id)]
                _settle(r)
                if unmarked:
                    unmark.setdefault(sid, set()).add(keys.acking_field(key, group, r.entry_id))
            self.acked += len(rs)
        if self.marks is not None and unmark:
            try:
                for sid in list(unmark):
                    await self.marks.hdel(keys.acking_key(sid), *unmark[sid])
                    del unmark[sid]
            except (RedisError, OSError) as e:  # removed with the next flush; the hash's expiry bounds the rest
                log.warning("acknowledged entries' marks not removed", error=str(e) or type(e).__name__)
                while sum(len(f) for f in unmark.values()) > _UNMARK_MAX:
                    unmark.pop(next(iter(unmark)))
        else:
            unmark.clear()

    async def aclose(self, timeout_s: float) -> None:
        """Acknowledge what is left (within `timeout_s`), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._refs:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout_s):
                    await self._flush()

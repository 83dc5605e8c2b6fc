"""Results as Server-Sent Events (GET /api/v1/streams/{id}/results/live): one reader per watched stream fans new
result entries out to every connected client, so 50 viewers cost one blocking XREAD, not 50 (and never the API's
Redis pool). Each event's `id` is the Redis entry id: a client that reconnects with `Last-Event-ID` (or `?after=`)
first gets what it missed (paged from Redis, at most the stream's MAXLEN), then the live ones, each once, in order.

A caught-up client's events are written to its connection by the reader itself, as it reads them (each event
encoded once, HTTP chunk included, for every client): no task wakes per client per record. A client whose
connection holds more than its transport's high-water mark unsent is handed back to its own handler, which waits
for it to drain; meanwhile the reader queues its events. A client that falls `QUEUE` entries behind is ended (it
resumes with Last-Event-ID), so a slow client never makes the daemon buffer without bound; one whose connection does
not drain within WRITE_TIMEOUT_S (it reads nothing: its TCP window is shut) is aborted, so it cannot hold a
MAX_CLIENTS slot until TCP gives up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11
from redis.exceptions import RedisError

from streamd import keys
from streamd.api.errors import ApiError
from streamd.api.results import entry_id, id_key
from streamd.api.streams import _stream
from streamd.api.context import CFG
from streamd.api.context import streams as _streams
from streamd.api.middleware import cors_headers
from streamd.log import get_logger

log = get_logger("streamd.api")

QUEUE = 256  # entries a client may lag behind before it is disconnected
BLOCK_MS = 2000  # one XREAD's block (below the client's socket timeout)
READ_COUNT = 100
CATCH_UP_PAGE = 100
KEEPALIVE_S = 15.0
WRITE_TIMEOUT_S = 15.0  # a client whose connection does not drain for that long (a stalled reader) is dropped
READY_TIMEOUT_S = 5.0
MAX_CLIENTS = 500  # SSE connections per daemon (past it: 503 busy)


def _event(eid: str, data: bytes) -> bytes:
    return b"id: " + eid.encode() + b"\nevent: result\ndata: " + data.replace(b"\n", b"") + b"\n\n"


def _item(key: tuple[int, int], event: bytes) -> tuple[tuple[int, int], bytes, bytes]:
    """An event as the feed hands it out: its entry's id key, the SSE bytes, and the same as one HTTP/1.1 chunk
    (what a chunked response writes for it), both made once for every client."""
    return key, event, b"%x\r\n%b\r\n" % (len(event), event)


KEEPALIVE = _item((-1, -1), b": keep-alive\n\n")  # an SSE comment: written whatever the client's last id


class Client:
    """One connection's place in a feed. While `direct` is its transport (it is caught up, its connection drained),
    the feed writes each event to it as it reads it; otherwise the feed appends the event to `queue` (at most QUEUE:
    past that the client is ended and removed) and wakes its handler, which writes what is queued itself."""

    __slots__ = ("queue", "wake", "direct", "high", "chunked", "ended")

    def __init__(self) -> None:
        self.queue: deque[tuple[tuple[int, int], bytes, bytes]] = deque()
        self.wake = asyncio.Event()
        self.direct: asyncio.WriteTransport | None = None
        self.high = 0  # the direct transport's high-water mark: holding more unsent, it is behind
        self.chunked = True  # how the feed frames a direct write (HTTP/1.1 chunks; HTTP/1.0: the bytes as they are)
        self.ended = False

    def end(self) -> None:
        self.ended = True
        self.direct = None
        self.wake.set()


class Feed:
    """New entries of one Redis stream, read by one task and handed to every subscriber."""

    def __init__(self, client: Any, key: str):
        self.client = client
        self.key = key
        self.subs: set[Client] = set()
        self.start_id: str | None = None  # the newest entry when the feed started: it delivers what follows
        self.last_id: str | None = None  # the last entry handed to the subscribers (start_id before any)
        self.ready = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        delay = 0.2
        quiet_since = time.monotonic()
        while True:
            try:
                if self.start_id is None:
                    newest = await self.client.xrevrange(self.key, "+", "-", count=1)
                    self.start_id = self.last_id = last = newest[0][0].decode() if newest else "0-0"
                    self.ready.set()
                reply = await self.client.xread({self.key: last}, count=READ_COUNT, block=BLOCK_MS)
                delay = 0.2
                if not reply and time.monotonic() - quiet_since >= KEEPALIVE_S:  # idle connections stay open
                    quiet_since = time.monotonic()
                    self._send(KEEPALIVE)
            except (RedisError, OSError) as e:
                log.warning("live results: Redis read failed, retrying", key=self.key, error=str(e) or type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for _key, entries in reply or ():
                quiet_since = time.monotonic()
                for eid, fields in entries:
                    self.last_id = last = eid.decode()  # before the fan-out: a new subscriber reads up to it
                    self._send(_item(id_key(last), _event(last, fields.get(b"record", b"null"))))

    def _send(self, item: tuple[tuple[int, int], bytes, bytes]) -> None:
        for c in list(self.subs):
            t = c.direct
            if t is not None:
                if t.get_write_buffer_size() <= c.high and not t.is_closing():
                    t.write(item[2] if c.chunked else item[1])  # in order after what its handler wrote
                    continue
                c.direct = None  # gone, or its connection holds more than its high-water mark: its handler takes over
            if len(c.queue) >= QUEUE:  # too slow: it ends, and may resume with Last-Event-ID
                self.subs.discard(c)
                c.end()
            else:
                c.queue.append(item)
                c.wake.set()


class LiveFeeds:
    """The feeds of the streams someone watches; a feed stops when its last subscriber leaves."""

    def __init__(self, client: Callable[[], Any], max_clients: int = MAX_CLIENTS):
        self._client = client
        self.max_clients = max_clients
        self.feeds: dict[str, Feed] = {}
        self.clients = 0
        self._closed = False

    @contextlib.asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[tuple[Feed, Client, str]]:
        """The feed, a Client that gets every entry after the boundary (the third item, an entry id): the caller
        reads up to the boundary from Redis itself (catch-up, the newest entry)."""
        if self._closed:
            raise ApiError(503, "not_ready", "the daemon is stopping", headers={"Retry-After": "1"})
        if self.clients >= self.max_clients:
            raise ApiError(503, "busy", f"{self.max_clients} live connections already", {"max": self.max_clients},
                           headers={"Retry-After": "5"})
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed(self._client(), key)
        c = Client()
        feed.subs.add(c)
        boundary = feed.last_id  # read with the add, no await between: every entry after it reaches c
        self.clients += 1
        try:
            try:
                await asyncio.wait_for(feed.ready.wait(), READY_TIMEOUT_S)
            except TimeoutError:
                raise ApiError(503, "redis_unavailable", "Redis is unreachable; try again",
                               headers={"Retry-After": "1"}) from None
            yield feed, c, boundary or feed.start_id or "0-0"  # not ready when added: c gets all after start_id
        finally:
            self.clients -= 1
            c.direct = None
            feed.subs.discard(c)
            if not feed.subs and self.feeds.get(key) is feed:
                del self.feeds[key]
                feed.task.cancel()

    async def close(self, app: web.Application | None = None) -> None:
        """The API stops: every live response ends (so shutdown never waits for them)."""
        self._closed = True
        for feed in list(self.feeds.values()):
            for c in list(feed.subs):
                c.queue.clear()
                c.end()
            feed.task.cancel()


LIVE = web.AppKey("live_feeds", LiveFeeds)


class _Stalled(Exception):
    """A client that accepted no data for WRITE_TIMEOUT_S: its connection is aborted, its slot freed."""


def _writer(request: web.Request, resp: web.StreamResponse,
            stream: AbstractStreamWriter) -> Callable[[bytes | None], Any]:
    """resp.write (or, given None, waiting for the connection to drain below its low-water mark) with a deadline:
    one that cannot finish within WRITE_TIMEOUT_S (the client's TCP window and our buffers are full: it reads
    nothing) aborts the connection, so a slow reader cannot hold its MAX_CLIENTS slot until TCP gives up."""

    async def write(data: bytes | None) -> None:
        try:  # a timeout scope, not wait_for: no task per write
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await (stream.drain() if data is None else resp.write(data))
        except TimeoutError:
            log.info("live results: a client read nothing for WRITE_TIMEOUT_S, dropped", path=request.path,
                     timeout_s=WRITE_TIMEOUT_S)
            if request.transport is not None:
                request.transport.abort()
            raise _Stalled from None

    return write


async def results_live(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: `event: result`, `id: <entry id>`, `data: <the result record>`. Resumes after
    `Last-Event-ID` (or `?after=`); without either, the newest result first, then each new one. `?timeout_s=`
    ends the response after that long (the client reconnects with Last-Event-ID)."""
    sid = _stream(request)
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    after = entry_id(raw, "Last-Event-ID" if "Last-Event-ID" in request.headers else "after") if raw else None
    try:
        timeout_s = float(request.query.get("timeout_s", "0"))
    except ValueError:
        timeout_s = -1.0
    if not 0 <= timeout_s <= 86_400:  # NaN too
        raise ApiError(422, "invalid_query", "timeout_s is a number of seconds from 0 (no limit) to 86400",
                       {"path": "timeout_s"})
    key = keys.results_key(sid)
    client = _streams(request).redis
    async with request.app[LIVE].subscribe(key) as (feed, sub, boundary):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no",  # CORS set before the headers go out
                                           **cors_headers(request, request.app[CFG])})
        if request.version >= HttpVersion11:
            resp.enable_chunked_encoding()  # what aiohttp does anyway; said here: the feed frames its direct writes so
        stream = await resp.prepare(request)  # the headers go out now
        if request.method == "HEAD" or stream is None:  # headers only: a body would poison a keep-alive connection
            return resp
        sub.chunked = getattr(stream, "chunked", resp.chunked)  # the writer's framing (none for a bodiless reply)
        write = _writer(request, resp, stream)
        last = id_key(after) if after is not None else (0, 0)
        with contextlib.suppress(TimeoutError, ConnectionResetError, _Stalled):
            async with asyncio.timeout(timeout_s or None):
                # what the client missed (or the newest one), up to the boundary: the feed queues what follows
                if after is None:
                    entries = await client.xrevrange(key, boundary, "-", count=1)
                else:
                    entries = []
                    cursor = after
                    while id_key(cursor) < id_key(boundary):
                        chunk = await client.xrange(key, f"({cursor}", boundary, count=CATCH_UP_PAGE)
                        if not chunk:
                            break
                        await write(b"".join(_event(e[0].decode(), e[1].get(b"record", b"null"))
                                                  for e in chunk))
                        cursor = chunk[-1][0].decode()
                        last = id_key(cursor)
                for eid_b, fields in entries:
                    await write(_event(eid_b.decode(), fields.get(b"record", b"null")))
                    last = id_key(eid_b.decode())
                while True:
                    if sub.queue:  # what the feed queued while this handler wrote (all of it in one write)
                        items = list(sub.queue)
                        sub.queue.clear()
                        out = []
                        for item in items:
                            if item is KEEPALIVE:
                                out.append(item[1])
                            elif item[0] > last:
                                out.append(item[1])
                                last = item[0]
                        if out:
                            await write(b"".join(out))
                        continue
                    transport = request.transport
                    if sub.ended or transport is None or transport.is_closing():
                        break
                    if id_key(feed.last_id or "0-0") < last:  # ahead of the feed (a Last-Event-ID to come): the
                        sub.wake.clear()  # feed's direct writes do not filter, so this handler does until it is past
                        await sub.wake.wait()
                        continue
                    sub.high = transport.get_write_buffer_limits()[1]  # where asyncio pauses its writer
                    if transport.get_write_buffer_size() > sub.high:
                        await write(None)  # behind: wait until it drains (the feed queues meanwhile)
                        continue
                    # caught up: the feed writes each new event to the connection itself until it hands back
                    # (the connection is behind or gone, or the client ended); nothing waits on it per record
                    sub.wake.clear()
                    sub.direct = transport
                    await sub.wake.wait()
        return resp

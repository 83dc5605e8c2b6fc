"""Results as Server-Sent Events (GET /api/v1/streams/{id}/results/live): one reader per watched stream fans new
result entries out to every connected client, so 50 viewers cost one blocking XREAD, not 50 (and never the API's
Redis pool). Each event's `id` is the Redis entry id: a client that reconnects with `Last-Event-ID` (or `?after=`)
first gets what it missed (paged from Redis, at most the stream's MAXLEN), then the live ones, each once, in order.
A client that falls `QUEUE` entries behind is disconnected (it resumes with Last-Event-ID), so a slow client
never makes the daemon buffer without bound; one whose write does not finish within WRITE_TIMEOUT_S (it reads
nothing: its TCP window is shut) is aborted, so it cannot hold a MAX_CLIENTS slot until TCP gives up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
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
WRITE_TIMEOUT_S = 15.0  # a client that takes longer to accept one write (a stalled reader) is dropped
READY_TIMEOUT_S = 5.0
MAX_CLIENTS = 500  # SSE connections per daemon (past it: 503 busy)
_END = object()
KEEPALIVE = ((-1, -1), b": keep-alive\n\n")  # an SSE comment: written whatever the client's last id


class Feed:
    """New entries of one Redis stream, read by one task and handed to every subscriber's bounded queue."""

    def __init__(self, client: Any, key: str):
        self.client = client
        self.key = key
        self.subs: set[asyncio.Queue[Any]] = set()
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
                    self._send((id_key(last), _event(last, fields.get(b"record", b"null"))))  # encoded once for all

    def _send(self, item: Any) -> None:
        for q in list(self.subs):
            try:
                q.put_nowait(item)
            except asyncio.QueueFull:  # too slow: it ends, and may resume with Last-Event-ID
                self.subs.discard(q)
                q.get_nowait()
                q.put_nowait(_END)


class LiveFeeds:
    """The feeds of the streams someone watches; a feed stops when its last subscriber leaves."""

    def __init__(self, client: Callable[[], Any], max_clients: int = MAX_CLIENTS):
        self._client = client
        self.max_clients = max_clients
        self.feeds: dict[str, Feed] = {}
        self.clients = 0
        self._closed = False

    @contextlib.asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[tuple[Feed, asyncio.Queue[Any], str]]:
        """The feed, a queue that gets every entry after the boundary (the third item, an entry id): the caller
        reads up to the boundary from Redis itself (catch-up, the newest entry)."""
        if self._closed:
            raise ApiError(503, "not_ready", "the daemon is stopping", headers={"Retry-After": "1"})
        if self.clients >= self.max_clients:
            raise ApiError(503, "busy", f"{self.max_clients} live connections already", {"max": self.max_clients},
                           headers={"Retry-After": "5"})
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed(self._client(), key)
        q: asyncio.Queue[Any] = asyncio.Queue(QUEUE)
        feed.subs.add(q)
        boundary = feed.last_id  # read with the add, no await between: every entry after it reaches q
        self.clients += 1
        try:
            try:
                await asyncio.wait_for(feed.ready.wait(), READY_TIMEOUT_S)
            except TimeoutError:
                raise ApiError(503, "redis_unavailable", "Redis is unreachable; try again",
                               headers={"Retry-After": "1"}) from None
            yield feed, q, boundary or feed.start_id or "0-0"  # not ready when added: q gets all after start_id
        finally:
            self.clients -= 1
            feed.subs.discard(q)
            if not feed.subs and self.feeds.get(key) is feed:
                del self.feeds[key]
                feed.task.cancel()

    async def close(self, app: web.Application | None = None) -> None:
        """The API stops: every live response ends (so shutdown never waits for them)."""
        self._closed = True
        for feed in list(self.feeds.values()):
            for q in list(feed.subs):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(_END)
            feed.task.cancel()


LIVE = web.AppKey("live_feeds", LiveFeeds)


class _Stalled(Exception):
    """A client that accepted no data for WRITE_TIMEOUT_S: its connection is aborted, its slot freed."""


def _writer(request: web.Request, resp: web.StreamResponse) -> Callable[[bytes], Any]:
    """resp.write with a deadline: a write that cannot finish within WRITE_TIMEOUT_S (the client's TCP window and
    our buffers are full: it reads nothing) aborts the connection, so a slow reader cannot hold its MAX_CLIENTS
    slot until TCP gives up."""

    async def write(data: bytes) -> None:
        try:  # a timeout scope, not wait_for: no task per write (one write per record per client adds up)
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await resp.write(data)
        except TimeoutError:
            log.info("live results: a client read nothing for WRITE_TIMEOUT_S, dropped", path=request.path,
                     timeout_s=WRITE_TIMEOUT_S)
            if request.transport is not None:
                request.transport.abort()
            raise _Stalled from None

    return write


def _event(eid: str, data: bytes) -> bytes:
    return b"id: " + eid.encode() + b"\nevent: result\ndata: " + data.replace(b"\n", b"") + b"\n\n"


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
    async with request.app[LIVE].subscribe(key) as (feed, q, boundary):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no",  # CORS set before the headers go out
                                           **cors_headers(request, request.app[CFG])})
        await resp.prepare(request)
        last = id_key(after) if after is not None else (0, 0)
        write = _writer(request, resp)
        with contextlib.suppress(TimeoutError, ConnectionResetError, _Stalled):
            async with asyncio.timeout(timeout_s or None):
                # what the client missed (or the newest one), up to the boundary: the queue has what follows
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
                    items = [await q.get()]  # the feed sends a keep-alive comment when nothing came for a while
                    while not q.empty():  # whatever else is there goes in the same write
                        items.append(q.get_nowait())
                    out = []
                    for item in items:
                        if item is _END:
                            break
                        if item is KEEPALIVE:
                            out.append(item[1])
                        elif item[0] > last:
                            out.append(item[1])
                            last = item[0]
                    if out:
                        await write(b"".join(out))
                    if any(item is _END for item in items):
                        break
        return resp

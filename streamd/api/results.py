"""Results without Redis: a stream's results, events and VLM answers paged from its Redis streams
(GET /api/v1/streams/{id}/results|events|vlm?after=<entry id>&limit=N), and its latest frame from the frame store
(GET /api/v1/streams/{id}/snapshot.jpg, annotated with its result record when ?overlay=true)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web

from streamd import keys
from streamd.api import overlay
from streamd.api.context import streams as _streams
from streamd.api.errors import ApiError, json_response
from streamd.api.streams import _stream

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_ENTRY_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
DIGITS = re.compile(r"[0-9]+")  # a query integer: ASCII digits only (str.isdigit() is true for "²", int() fails)
_U64 = (1 << 64) - 1
# what each kind of record is kept under: its Redis key and the entry field holding its JSON
KINDS: dict[str, tuple[Any, bytes]] = {"results": (keys.results_key, b"record"),
                                       "events": (keys.events_key, b"event"),
                                       "vlm": (keys.vlm_key, b"record")}


def entry_id(raw: str, what: str = "after") -> str:
    """A Redis stream entry id (`<ms>-<seq>`, or `<ms>`), normalised; else 400 invalid_cursor."""
    m = _ENTRY_ID.fullmatch(raw.strip())
    if m is None or int(m.group(1)) > _U64 or int(m.group(2) or 0) > _U64:
        raise ApiError(400, "invalid_cursor", f"{what} is not a Redis stream entry id (<ms>-<seq>, e.g. "
                       "1718000000000-0)", {"path": what})
    return f"{int(m.group(1))}-{int(m.group(2) or 0)}"


def id_key(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


def limit_of(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:  # ASCII: '²'.isdigit() is true
        raise ApiError(422, "invalid_query", f"limit is an integer from 1 to {MAX_LIMIT}", {"path": "limit"})
    return int(raw)


def decode(fields: dict[bytes, bytes], field: bytes) -> Any:
    raw = fields.get(field)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


async def page(client: Any, key: str, field: bytes, after: str | None, limit: int) -> list[dict[str, Any]]:
    """Entries after `after` (oldest first), or the newest `limit` when `after` is None."""
    if after is None:
        entries = list(reversed(await client.xrevrange(key, "+", "-", count=limit)))
    else:
        entries = await client.xrange(key, f"({after}", "+", count=limit)
    return [{"id": eid.decode(), "record": decode(fields, field)} for eid, fields in entries]


def _paged(kind: str) -> Any:
    key_of, field = KINDS[kind]

    async def handler(request: web.Request) -> web.Response:
        sid = _stream(request)
        after = entry_id(request.query["after"]) if "after" in request.query else None
        limit = limit_of(request)
        entries = await page(_streams(request).redis, key_of(sid), field, after, limit)
        nxt = entries[-1]["id"] if entries else after
        return json_response({"stream_id": sid, "kind": kind, "entries": entries, "next_after": nxt,
                              "more": len(entries) == limit})

    handler.__name__ = f"stream_{kind}"
    handler.__doc__ = f"GET /api/v1/streams/{{id}}/{kind}: paged, oldest first after `after`; without it the newest."
    return handler


stream_results = _paged("results")
stream_events = _paged("events")
stream_vlm = _paged("vlm")

BOOLS = {"true": True, "1": True, "false": False, "0": False}
WRITTEN_WAIT_S = 1.0  # the newest frame's result record is written within milliseconds of the frame being kept


async def snapshot(request: web.Request) -> web.Response:
    """The stream's newest kept frame (with a written result record when there is one), or the frame of result
    `entry`; `overlay=true` draws that record on it (in a thread). Headers name the frame: X-Streamd-Entry-Id,
    X-Streamd-Seq, X-Streamd-Capture-Ts."""
    sid = _stream(request)
    flag = request.query.get("overlay", "false").lower()
    if flag not in BOOLS:
        raise ApiError(422, "invalid_query", "overlay is true or false", {"path": "overlay"})
    d = _streams(request)
    store = d.frames
    if "entry" in request.query:
        eid = entry_id(request.query["entry"], "entry")
        sf = store.get(sid, eid) if store is not None else None
        if sf is None:
            raise ApiError(404, "frame_not_found", f"the frame of result {eid} is no longer kept",
                           {"entry": eid})
    else:
        sf = None if store is None else store.latest(sid, written=True) or store.latest(sid)
        if sf is None:
            where = "" if sid in d.runners else " (it runs on another daemon: ask that one)"
            raise ApiError(404, "frame_not_found", f"no frame of stream {sid!r} is kept yet{where}")
    try:
        jpeg = await store.jpeg(sf)
    except LookupError:
        raise ApiError(404, "frame_not_found", "the frame was dropped meanwhile") from None
    if BOOLS[flag]:
        record = None
        if await sf.wait_written(WRITTEN_WAIT_S):
            entries = await d.redis.xrange(keys.results_key(sid), sf.entry_id, sf.entry_id, count=1)
            record = decode(entries[0][1], b"record") if entries else None
        jpeg = await asyncio.to_thread(overlay.draw, jpeg, record, store.quality)
    headers = {"Cache-Control": "no-store", "X-Streamd-Seq": str(sf.seq),
               "X-Streamd-Capture-Ts": f"{sf.capture_ts:.6f}"}
    if sf.entry_id is not None:
        headers["X-Streamd-Entry-Id"] = sf.entry_id
    return web.Response(body=jpeg, content_type="image/jpeg", headers=headers)

"""Following result and event streams: pretty lines for humans, JSON lines for programs."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from streamd import keys
from streamd.redis_clients import is_cluster

BLOCK_MS = 500  # how long one XREAD waits for new entries
READ_COUNT = 100  # entries per stream key and XREAD


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_short(x)}" for k, x in v.items())
    if isinstance(v, list):
        if v and all(isinstance(x, dict) and "label" in x for x in v):
            return "[" + ", ".join(
                f"{x['label']}" + (f"#{x['track_id']}" if "track_id" in x else "") + f" {x.get('confidence', 0):.2f}"
                for x in v) + "]"
        return f"[{len(v)}]"
    return str(v)


def pretty(kind: str, rec: dict[str, Any]) -> str:
    if kind == "events":
        extra = {k: v for k, v in rec.items() if k not in ("type", "ts", "stream_id", "schema_version")}
        return f"[{rec.get('stream_id')}] event {rec.get('type')}: {_short(extra)}"
    lat = (rec.get("publish_ts", 0) - rec.get("capture_ts", 0)) * 1000
    outs = "  ".join(f"{name}: {_short(out)}" for name, out in (rec.get("outputs") or {}).items())
    err = f"  ERROR {rec['error']}" if rec.get("error") else ""
    return (f"[{rec.get('stream_id')}] #{rec.get('seq')} pts={rec.get('pts_s', 0):.2f}s "
            f"{rec.get('width')}x{rec.get('height')}  {outs}  latency={lat:.0f}ms{err}")


def decode_entry(kind: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    raw = fields.get(b"record" if kind == "results" else b"event", b"{}")
    return json.loads(raw)


async def read_new(client: aioredis.Redis | RedisCluster, cursors: dict[str, str]) -> list[Any]:
    """New entries after each key's cursor, as XREAD's `[key, entries]` pairs. One XREAD on a single Redis; on a
    Redis Cluster, where one command's keys must share a hash slot, one XREAD per slot (a stream's results and
    events share one), all sent at once, so an idle tail still waits BLOCK_MS per round, not BLOCK_MS per slot."""
    if not is_cluster(client):
        return await client.xread(cursors, block=BLOCK_MS, count=READ_COUNT) or []
    groups: dict[int, dict[str, str]] = {}
    for k, cursor in cursors.items():
        groups.setdefault(keys.slot(k), {})[k] = cursor
    replies = await asyncio.gather(*(client.xread(g, block=BLOCK_MS, count=READ_COUNT) for g in groups.values()))
    return [pair for reply in replies for pair in reply or []]


async def follow(
    client: aioredis.Redis | RedisCluster,
    streams: list[str],
    kinds: tuple[str, ...] = ("results",),
    as_json: bool = False,
    from_start: bool = False,
    count: int | None = None,
    out: TextIO = sys.stdout,
    until: float | None = None,
) -> int:
    """Print entries as they arrive; returns how many were printed. `streams` empty = every stream found."""
    cursors: dict[str, str] = {}
    printed = 0
    last_scan = 0.0

    async def discover() -> None:
        names = streams
        if not names:
            found = set()
            for kind in kinds:
                async for k in client.scan_iter(match=f"streamd:{{*}}:{kind}", count=500):
                    found.add(k.decode())
            keys_ = sorted(found)
        else:
            keys_ = [keys.results_key(s) if kind == "results" else keys.events_key(s) for s in names for kind in kinds]
        for k in keys_:
            cursors.setdefault(k, "0" if from_start else "$")

    while count is None or printed < count:
        if until is not None and time.monotonic() >= until:
            break
        if time.monotonic() - last_scan > 2 or not cursors:
            await discover()
            last_scan = time.monotonic()
            if not cursors:
                await asyncio.sleep(0.5)
                continue
        for key, entries in await read_new(client, cursors):
            k = key.decode()
            kind = "events" if k.endswith(":events") else "results"
            for eid, fields in entries:
                cursors[k] = eid.decode()
                rec = decode_entry(kind, fields)
                line = json.dumps({"kind": kind, "id": eid.decode(), **rec}) if as_json else pretty(kind, rec)
                print(line, file=out, flush=True)
                printed += 1
                if count is not None and printed >= count:
                    return printed
    return printed

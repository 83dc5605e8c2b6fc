"""Following result and event streams: pretty lines for humans, JSON lines for programs."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

import redis.asyncio as aioredis

from streamd import keys


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


async def follow(
    client: aioredis.Redis,
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
        resp = await client.xread(cursors, block=500, count=100)
        for key, entries in resp or []:
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

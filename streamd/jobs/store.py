"""Jobs in Redis: a job's document (`streamd:{job:<id>}:job`, JSON) and its records (`streamd:{job:<id>}:records`,
a stream consumers can read like a stream's results), both expiring `jobs.ttl_s` after the job's last change; the
index `streamd:jobs:index` (job id by creation time) is pruned of expired jobs as pages meet them, and expires
itself when no job was made for twice the TTL."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from streamd import jsonsafe, keys

_json = jsonsafe.encoder(separators=(",", ":"))


class JobStore:
    def __init__(self, client: aioredis.Redis, ttl_s: float, records_maxlen: int):
        self.r = client
        self.ttl_ms = int(ttl_s * 1000)
        self.maxlen = records_maxlen

    async def save(self, doc: dict[str, Any], new: bool = False) -> None:
        """Write the job's document (its TTL starts again); `new`: also index it."""
        jid = doc["id"]
        async with self.r.pipeline(transaction=False) as p:
            p.set(keys.job_key(jid), _json(doc), px=self.ttl_ms)
            p.pexpire(keys.job_records_key(jid), self.ttl_ms)
            if new:
                p.zadd(keys.JOBS_INDEX_KEY, {jid: doc["created_ts"]})
                p.pexpire(keys.JOBS_INDEX_KEY, 2 * self.ttl_ms)  # no job for twice the TTL: the index goes too
            await p.execute()

    async def add_records(self, job_id: str, records: list[dict[str, Any]]) -> None:
        key = keys.job_records_key(job_id)
        async with self.r.pipeline(transaction=False) as p:
            for rec in records:
                p.xadd(key, {"record": _json(rec)}, maxlen=self.maxlen, approximate=True)
            p.pexpire(key, self.ttl_ms)
            await p.execute()

    async def request_cancel(self, job_id: str) -> None:
        """Ask whichever daemon runs the job to cancel it (it looks every SAVE_EVERY_S)."""
        await self.r.set(keys.job_cancel_key(job_id), "1", px=self.ttl_ms)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.r.exists(keys.job_cancel_key(job_id)))

    async def get(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.r.get(keys.job_key(job_id))
        return json.loads(raw) if raw is not None else None

    async def records(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Up to `limit` records after the entry id `after` (None: from the first), and the cursor of the next page
        (None at the end)."""
        start = f"({after}" if after else "-"
        entries = await self.r.xrange(keys.job_records_key(job_id), start, "+", count=limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        out = [json.loads(f[b"record"]) for _, f in entries]
        nxt = entries[-1][0].decode() if more and entries else None
        return out, nxt

    async def page(self, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """Jobs newest first: (how many the index holds, the page). Only the page's documents are read; ids whose
        document expired leave the index as a page meets them (and the page is filled from the ids after them)."""
        out: list[dict[str, Any]] = []
        start = offset
        for _ in range(8):  # a page that meets expired ids reads on; bounded
            ids = [i.decode() for i in await self.r.zrevrange(keys.JOBS_INDEX_KEY, start, start + limit - 1)]
            if not ids:
                break
            async with self.r.pipeline(transaction=False) as p:  # one GET each (a job has its own hash slot)
                for i in ids:
                    p.get(keys.job_key(i))
                docs = await p.execute()
            gone = [i for i, d in zip(ids, docs) if d is None]
            if gone:
                await self.r.zrem(keys.JOBS_INDEX_KEY, *gone)
            out += [json.loads(d) for d in docs if d is not None]
            if len(out) >= limit or len(ids) < limit:
                break
            start += len(ids) - len(gone)
        return int(await self.r.zcard(keys.JOBS_INDEX_KEY)), out[:limit]

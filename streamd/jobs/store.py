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


# Every write of a job's keys is fenced by its lease (`<member>|<token>`, streamd:{job:<id>}:lease, the job's slot):
# a daemon whose lease another daemon took (it was paused or cut off past jobs.lease_ttl_s) writes nothing more. A
# missing lease (expired while Redis was away, or a restarted redis-server) is taken again by its holder's write.
_FENCE = "local v = redis.call('GET', KEYS[1]) if v and v ~= ARGV[1] then return 0 end "
# KEYS: lease, spec; ARGV: token, lease_px, ttl_ms (the spec lives as long as the job runs, past jobs.ttl_s too)
_RENEW = _FENCE + "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) redis.call('PEXPIRE', KEYS[2], ARGV[3]) return 1"
# KEYS: lease, job, records, spec; ARGV: token, document, ttl_ms, lease_px, drop_spec
_SAVE = _FENCE + """redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
if ARGV[5] == '1' then redis.call('DEL', KEYS[4]) end
return 1"""
# KEYS: lease, records; ARGV: token, maxlen, ttl_ms, record...
_RECORDS = _FENCE + """for i = 4, #ARGV do redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'record', ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1"""
RECORDS_PER_CALL = 500


class LeaseLost(Exception):
    """Another daemon holds the job's lease now: this one writes nothing more for it."""


class JobStore:
    def __init__(self, client: aioredis.Redis, ttl_s: float, records_maxlen: int, lease_ttl_s: float = 15.0):
        self.r = client
        self.ttl_ms = int(ttl_s * 1000)
        self.lease_ms = int(lease_ttl_s * 1000)
        self.maxlen = records_maxlen

    async def save(self, doc: dict[str, Any], token: str, new: bool = False) -> None:
        """Write the job's document (its TTL starts again) under its lease `token` (LeaseLost: another daemon's
        now); `new`: also index it. A job not ended is in the active set (watched for a lost daemon); an ended
        one leaves it, its lease is kept as long as its document (no stale writer after it) and its spec goes."""
        jid, ended = doc["id"], doc["state"] in ("done", "failed", "cancelled")
        ok = await self.r.eval(_SAVE, 4, keys.job_lease_key(jid), keys.job_key(jid), keys.job_records_key(jid),
                               keys.job_spec_key(jid), token, _json(doc), self.ttl_ms,
                               self.ttl_ms if ended else self.lease_ms, "1" if ended else "0")
        if not ok:
            raise LeaseLost(jid)
        async with self.r.pipeline(transaction=False) as p:
            if new:
                p.zadd(keys.JOBS_INDEX_KEY, {jid: doc["created_ts"]})
                p.pexpire(keys.JOBS_INDEX_KEY, 2 * self.ttl_ms)  # no job for twice the TTL: the index goes too
            if ended:
                p.zrem(keys.JOBS_ACTIVE_KEY, jid)
            else:
                p.zadd(keys.JOBS_ACTIVE_KEY, {jid: doc["created_ts"]})
                p.pexpire(keys.JOBS_ACTIVE_KEY, 2 * self.ttl_ms)
            await p.execute()

    async def save_spec(self, job_id: str, spec: dict[str, Any]) -> None:
        """What another daemon needs to run the job again (the source as given: a URL's credentials too, as a
        stream added through the API keeps them in Redis); removed when the job ends."""
        await self.r.set(keys.job_spec_key(job_id), _json(spec), px=self.ttl_ms)

    async def spec(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.r.get(keys.job_spec_key(job_id))
        return json.loads(raw) if raw is not None else None

    async def add_records(self, job_id: str, records: list[dict[str, Any]], token: str) -> None:
        """Append records under the job's lease (LeaseLost: another daemon's now; none of them written)."""
        for i in range(0, len(records), RECORDS_PER_CALL):
            chunk = [_json(rec) for rec in records[i:i + RECORDS_PER_CALL]]
            ok = await self.r.eval(_RECORDS, 2, keys.job_lease_key(job_id), keys.job_records_key(job_id), token,
                                   self.maxlen, self.ttl_ms, *chunk)
            if not ok:
                raise LeaseLost(job_id)

    async def renew(self, job_id: str, token: str) -> bool:
        """Extend the job's lease (taken again if it is missing); False: another daemon holds it."""
        return bool(await self.r.eval(_RENEW, 2, keys.job_lease_key(job_id), keys.job_spec_key(job_id), token,
                                      self.lease_ms, self.ttl_ms))

    async def claim(self, job_id: str, token: str) -> bool:
        """Take a job whose lease is gone (its daemon lost); False: another daemon was first."""
        return bool(await self.r.set(keys.job_lease_key(job_id), token, nx=True, px=self.lease_ms))

    async def unowned(self, skip: set[str], page: int = 1000) -> list[str]:
        """Jobs not ended whose lease is gone (their daemon stopped renewing it), oldest first; `skip`: ours. The
        whole active set, `page` ids at a time."""
        out: list[str] = []
        start = 0
        while True:
            got = [i.decode() for i in await self.r.zrange(keys.JOBS_ACTIVE_KEY, start, start + page - 1)]
            start += len(got)
            ids = [i for i in got if i not in skip]
            if ids:
                async with self.r.pipeline(transaction=False) as p:
                    for i in ids:
                        p.exists(keys.job_lease_key(i))
                    held = await p.execute()
                out += [i for i, h in zip(ids, held) if not h]
            if len(got) < page:
                return out

    async def forget(self, job_id: str) -> None:
        """A job in the active set whose document expired."""
        await self.r.zrem(keys.JOBS_ACTIVE_KEY, job_id)

    async def restart_records(self, job_id: str, token: str) -> None:
        """A retry starts with no records (those of the attempt before go; see streamd/jobs/__init__.py)."""
        if not await self.r.eval(_FENCE + "redis.call('DEL', KEYS[2]) return 1", 2, keys.job_lease_key(job_id),
                                 keys.job_records_key(job_id), token):
            raise LeaseLost(job_id)

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

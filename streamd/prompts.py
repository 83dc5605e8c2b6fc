"""Versioned prompts, kept in Redis so that a restarted daemon, or a second one, sees the same prompts.

A prompt is identified by its kind (`vlm`: text with an optional output schema; `vocabulary`: phrases for
open-vocabulary detection) and its scope (`global`, `pipeline:<name>`, `stream:<id>`; the most specific wins).
Every update creates a new version (1, 2, 3 ... per prompt) in one Lua script, so concurrent writers never get the
same version. Rollback creates a new version with an old version's content. Changes are announced on a pub/sub
channel; each daemon keeps a cache that stages read at frame boundaries (no Redis round trip per frame).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamd.log import RepeatedLog, get_logger

log = get_logger("streamd.prompts")

KINDS = ("vlm", "vocabulary")
CHANNEL = "streamd:prompts:changed"
INDEX = "streamd:prompts:index"
SCOPE_RE = re.compile(r"^(global|pipeline:[A-Za-z0-9_.:-]{1,128}|stream:[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})$")

_PUT = """
local v = redis.call('INCR', KEYS[1])
local rec = '{"version":' .. v .. ',' .. string.sub(ARGV[1], 2)
redis.call('HSET', KEYS[2], v, rec)
redis.call('SET', KEYS[3], v)
return rec
"""


def prompt_id(kind: str, scope: str) -> str:
    return f"{kind}|{scope}"


def _keys(pid: str) -> tuple[str, str, str]:
    base = f"streamd:prompt:{{{pid}}}"
    return f"{base}:seq", f"{base}:versions", f"{base}:current"


class PromptNotFound(KeyError):
    pass


class PromptStore:
    def __init__(self, client: aioredis.Redis):
        self.r = client
        self._put = client.register_script(_PUT)

    async def put(self, kind: str, scope: str, body: dict[str, Any], author: str, note: str | None = None,
                  rolled_back_from: int | None = None) -> dict[str, Any]:
        pid = prompt_id(kind, scope)
        rec = {"kind": kind, "scope": scope, **body, "author": author, "note": note, "created_ts": time.time()}
        if rolled_back_from is not None:
            rec["rolled_back_from"] = rolled_back_from
        raw = await self._put(keys=list(_keys(pid)), args=[json.dumps(rec, separators=(",", ":"))])
        await self.r.sadd(INDEX, pid)
        await self.r.publish(CHANNEL, pid)
        return json.loads(raw)

    async def current(self, kind: str, scope: str) -> dict[str, Any]:
        _, versions, current = _keys(prompt_id(kind, scope))
        v = await self.r.get(current)
        if v is None:
            raise PromptNotFound(prompt_id(kind, scope))
        raw = await self.r.hget(versions, v)
        return json.loads(raw)

    async def version(self, kind: str, scope: str, version: int) -> dict[str, Any]:
        _, versions, _ = _keys(prompt_id(kind, scope))
        raw = await self.r.hget(versions, str(version))
        if raw is None:
            raise PromptNotFound(f"{prompt_id(kind, scope)} v{version}")
        return json.loads(raw)

    async def history(self, kind: str, scope: str, offset: int = 0, limit: int = 50) -> tuple[int, list[dict]]:
        """Newest first. Returns (total versions, page)."""
        seq, versions, _ = _keys(prompt_id(kind, scope))
        total = int(await self.r.get(seq) or 0)
        if total == 0:
            raise PromptNotFound(prompt_id(kind, scope))
        wanted = [str(v) for v in range(total - offset, max(total - offset - limit, 0), -1)]
        raws = await self.r.hmget(versions, wanted) if wanted else []
        return total, [json.loads(x) for x in raws if x is not None]

    async def rollback(self, kind: str, scope: str, version: int, author: str, note: str | None = None) -> dict:
        old = await self.version(kind, scope, version)
        body = {k: old[k] for k in ("text", "schema", "phrases") if k in old}
        return await self.put(kind, scope, body, author, note or f"rollback to version {version}",
                              rolled_back_from=version)

    async def all_current(self) -> list[dict[str, Any]]:
        pids = sorted(x.decode() for x in await self.r.smembers(INDEX))
        out = []
        for pid in pids:
            kind, _, scope = pid.partition("|")
            try:
                out.append(await self.current(kind, scope))
            except PromptNotFound:
                continue
        return out


class PromptCache:
    """Current prompts of every scope, in memory; refreshed from pub/sub and every `refresh_s`."""

    def __init__(self, store: PromptStore, refresh_s: float = 5.0, log_every_s: float = 30.0):
        self.store = store
        self.refresh_s = refresh_s
        self._outage = RepeatedLog(log, log_every_s)  # an outage is retried every second, logged far less often
        self._current: dict[str, dict[str, Any]] = {}
        self.loaded = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End `run()` within a second (redis-py's get_message can swallow a cancellation)."""
        self._stop.set()

    def resolve(self, kind: str, stream_id: str, pipeline: str) -> dict[str, Any] | None:
        """The most specific current prompt of `kind` for a stream: stream, then pipeline, then global."""
        c = self._current
        return (c.get(prompt_id(kind, f"stream:{stream_id}")) or c.get(prompt_id(kind, f"pipeline:{pipeline}"))
                or c.get(prompt_id(kind, "global")))

    def set(self, rec: dict[str, Any]) -> None:
        pid = prompt_id(rec["kind"], rec["scope"])
        old = self._current.get(pid)
        if old is None or old["version"] < rec["version"]:
            self._current[pid] = rec

    async def refresh(self) -> None:
        for rec in await self.store.all_current():
            self.set(rec)
        self.loaded.set()

    async def run(self) -> None:
        """Follow changes until stopped; survives Redis outages (retries)."""
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            pubsub = self.store.r.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                await self.refresh()
                self._outage.over("prompt cache has Redis back")
                last = loop.time()
                while not self._stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        if loop.time() - last >= self.refresh_s:
                            await self.refresh()
                            last = loop.time()
                        continue
                    kind, _, scope = msg["data"].decode().partition("|")
                    try:
                        self.set(await self.store.current(kind, scope))
                    except PromptNotFound:
                        pass
            except (RedisError, OSError) as e:
                self._outage.warning("prompt cache lost Redis, retrying", error=str(e) or type(e).__name__)
                try:
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                except TimeoutError:
                    pass
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass

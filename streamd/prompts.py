"""Versioned prompts, kept in Redis so that a restarted daemon, or a second one, sees the same prompts.

A prompt is identified by its kind (`vlm`: text with an optional output schema; `vocabulary`: phrases for
open-vocabulary detection) and its scope (`global`, `pipeline:<name>`, `stream:<id>`; the most specific wins).
Every update creates a new version (1, 2, 3 ... per prompt) in one Lua script, so concurrent writers never get the
same version. Rollback creates a new version with an old version's content. A delete is a version too (a tombstone,
`deleted: true`), so history keeps every version and a later update goes on counting. A write may be conditional on
the current version (`if_match`, checked in the same script). Changes are announced on a pub/sub channel; each
daemon keeps a cache that stages read at frame boundaries (no Redis round trip per frame).

Redis Cluster: a prompt's three keys share the hash tag `{<kind>|<scope>}` (one slot, so the write script runs
there); every other command touches one key; the pub/sub channel works on any node (Redis Cluster forwards
PUBLISH to every node).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from streamd.follow import ChangeFollower
from streamd.keys import PROMPTS_CHANNEL, PROMPTS_INDEX_KEY, prompt_keys
from streamd.log import get_logger

log = get_logger("streamd.prompts")

KINDS = ("vlm", "vocabulary")
CHANNEL = PROMPTS_CHANNEL
INDEX = PROMPTS_INDEX_KEY
SCOPE_RE = re.compile(r"^(global|pipeline:[A-Za-z0-9_.:-]{1,128}|stream:[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})$")

# KEYS: seq, versions, current. ARGV[1]: the record (a JSON object, without its version); ARGV[2]: the condition ('':
# none, '*': a live prompt, ',3,4,': a live prompt at one of these versions); ARGV[3]: '1' for a delete (a tombstone
# needs a live prompt). Returns {'ok', record} or {'missing' | 'deleted' | 'precondition', current version or ''}.
_WRITE = """
local cur = redis.call('GET', KEYS[3])
local live = false
if cur then
  local old = redis.call('HGET', KEYS[2], cur)
  live = old and cjson.decode(old)['deleted'] ~= true
end
if ARGV[3] == '1' and not live then
  if cur then return {'deleted', cur} end
  return {'missing', ''}
end
if ARGV[2] ~= '' and (not live or (ARGV[2] ~= '*' and not string.find(ARGV[2], ',' .. cur .. ',', 1, true))) then
  return {'precondition', live and cur or ''}
end
local v = redis.call('INCR', KEYS[1])
local rec = '{"version":' .. v .. ',' .. string.sub(ARGV[1], 2)
redis.call('HSET', KEYS[2], v, rec)
redis.call('SET', KEYS[3], v)
return {'ok', rec}
"""


def prompt_id(kind: str, scope: str) -> str:
    return f"{kind}|{scope}"


def _keys(pid: str) -> tuple[str, str, str]:
    return prompt_keys(pid)  # one slot: the write script's keys


class PromptNotFound(KeyError):
    pass


class PromptDeleted(PromptNotFound):
    """The current version is a tombstone (`record`): no prompt at this scope until the next update."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(prompt_id(record["kind"], record["scope"]))
        self.record = record


class PreconditionFailed(Exception):
    """`if_match` did not hold: `current` is the live prompt's version (None: no live prompt)."""

    def __init__(self, current: int | None):
        super().__init__(f"current version: {current}")
        self.current = current


class RollbackToDeletion(ValueError):
    """A rollback named a tombstone version (a delete is `delete`, not a rollback)."""


IfMatch = str | Iterable[int] | None  # None: no condition; "*": a live prompt; versions: a live prompt at one


def _condition(if_match: IfMatch) -> str:
    if if_match is None:
        return ""
    if isinstance(if_match, str):
        if if_match != "*":
            raise ValueError("if_match is None, '*' or versions")
        return "*"
    return "," + "".join(f"{int(v)}," for v in if_match)  # no versions: matches nothing


class PromptStore:
    def __init__(self, client: aioredis.Redis):
        self.r = client
        self._write = client.register_script(_WRITE)

    async def put(self, kind: str, scope: str, body: dict[str, Any], author: str, note: str | None = None,
                  rolled_back_from: int | None = None, if_match: IfMatch = None) -> dict[str, Any]:
        """A new version. With `if_match`, only while the current version is a live prompt it names (else
        PreconditionFailed), checked atomically with the write."""
        rec = {"kind": kind, "scope": scope, **body, "author": author, "note": note, "created_ts": time.time()}
        if rolled_back_from is not None:
            rec["rolled_back_from"] = rolled_back_from
        return await self._versioned(kind, scope, rec, if_match, delete=False)

    async def delete(self, kind: str, scope: str, author: str, note: str | None = None,
                     if_match: IfMatch = None) -> dict[str, Any]:
        """A tombstone version (`deleted: true`): no prompt at this scope until the next update; history keeps
        every version. PromptNotFound when there never was one, PromptDeleted when it is deleted already."""
        rec = {"kind": kind, "scope": scope, "deleted": True, "author": author, "note": note,
               "created_ts": time.time()}
        return await self._versioned(kind, scope, rec, if_match, delete=True)

    async def _versioned(self, kind: str, scope: str, rec: dict[str, Any], if_match: IfMatch,
                         delete: bool) -> dict[str, Any]:
        pid = prompt_id(kind, scope)
        status, value = await self._write(keys=list(_keys(pid)), args=[
            json.dumps(rec, separators=(",", ":")), _condition(if_match), "1" if delete else "0"])
        status, value = (x.decode() if isinstance(x, bytes) else str(x) for x in (status, value))
        if status == "missing":
            raise PromptNotFound(pid)
        if status == "deleted":
            raise PromptDeleted(await self.version(kind, scope, int(value)))
        if status == "precondition":
            raise PreconditionFailed(int(value) if value else None)
        await self.r.sadd(INDEX, pid)
        await self.r.publish(CHANNEL, pid)
        return json.loads(value)

    async def current(self, kind: str, scope: str, include_deleted: bool = False) -> dict[str, Any]:
        """The current version; a tombstone raises PromptDeleted unless `include_deleted`."""
        _, versions, current = _keys(prompt_id(kind, scope))
        v = await self.r.get(current)
        if v is None:
            raise PromptNotFound(prompt_id(kind, scope))
        rec = json.loads(await self.r.hget(versions, v))
        if rec.get("deleted") and not include_deleted:
            raise PromptDeleted(rec)
        return rec

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

    async def rollback(self, kind: str, scope: str, version: int, author: str, note: str | None = None,
                       if_match: IfMatch = None) -> dict:
        """A new version with an old version's content (also after a delete: the prompt is back). A tombstone
        version raises RollbackToDeletion."""
        old = await self.version(kind, scope, version)
        if old.get("deleted"):
            raise RollbackToDeletion(f"version {version} of {prompt_id(kind, scope)} is a deletion")
        body = {k: old[k] for k in ("text", "schema", "phrases") if k in old}
        return await self.put(kind, scope, body, author, note or f"rollback to version {version}",
                              rolled_back_from=version, if_match=if_match)

    async def all_current(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        """The current version of every prompt; deleted ones (tombstones) only with `include_deleted`."""
        pids = sorted(x.decode() for x in await self.r.smembers(INDEX))
        out = []
        for pid in pids:
            kind, _, scope = pid.partition("|")
            try:
                out.append(await self.current(kind, scope, include_deleted))
            except PromptNotFound:
                continue
        return out


class PromptCache(ChangeFollower):
    """Current prompts of every scope, in memory; refreshed from pub/sub and every `refresh_s` (streamd.follow). A
    deleted prompt's tombstone is kept (so an older version never comes back) and means no prompt at its scope."""

    channel = PROMPTS_CHANNEL
    what = "prompt cache"

    def __init__(self, store: PromptStore, refresh_s: float = 5.0, log_every_s: float = 30.0):
        super().__init__(store.r, log, refresh_s, log_every_s)
        self.store = store
        self._current: dict[str, dict[str, Any]] = {}

    def resolve(self, kind: str, stream_id: str, pipeline: str) -> dict[str, Any] | None:
        """The most specific current prompt of `kind` for a stream: stream, then pipeline, then global (a deleted
        one skipped); None when there is none (the stage's configured prompt applies)."""
        for scope in (f"stream:{stream_id}", f"pipeline:{pipeline}", "global"):
            rec = self._current.get(prompt_id(kind, scope))
            if rec is not None and not rec.get("deleted"):
                return rec
        return None

    def set(self, rec: dict[str, Any]) -> None:
        pid = prompt_id(rec["kind"], rec["scope"])
        old = self._current.get(pid)
        if old is None or old["version"] < rec["version"]:
            self._current[pid] = rec

    async def read_all(self) -> None:
        for rec in await self.store.all_current(include_deleted=True):
            self.set(rec)

    async def on_message(self, data: str) -> None:
        kind, _, scope = data.partition("|")
        try:
            self.set(await self.store.current(kind, scope, include_deleted=True))
        except PromptNotFound:
            pass
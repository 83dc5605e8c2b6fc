"""Versioned live changes of pipelines, kept in Redis like prompts (streamd.prompts): a restarted daemon, and every
other daemon on the same Redis, runs a pipeline with the models switched through the API.

A pipeline's version holds its *changes*: stage name -> the options that differ from the pipeline as configured
(`{"detect": {"model": "yolov8n.yaml"}}`), with author, note and time. Version 0 is the pipeline as configured (no
changes; never stored). Every change writes a whole new version (1, 2, 3 ... per pipeline) in one Lua script,
conditional on the version it was made from, so two daemons never both think their change is current; a rollback
writes an old version's changes as a new version. Changes are announced on a pub/sub channel; each daemon keeps a
cache (`PipelineVersions`) that it reads when it builds a pipeline and follows to switch the pipelines it runs.

Redis Cluster: a pipeline's three keys share the hash tag `{<pipeline>}` (the script runs on that slot).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from streamd.follow import ChangeFollower
from streamd.keys import PIPELINES_CHANNEL, PIPELINES_INDEX_KEY, pipeline_keys
from streamd.log import get_logger

log = get_logger("streamd.pipeline_versions")

# KEYS: seq, versions, current. ARGV[1]: the record (a JSON object without its version); ARGV[2]: the version the
# change was made from ('0': none stored yet; '': any). Returns {'ok', record} or {'changed', current version}.
_WRITE = """
local cur = redis.call('GET', KEYS[3]) or '0'
if ARGV[2] ~= '' and ARGV[2] ~= cur then return {'changed', cur} end
local v = redis.call('INCR', KEYS[1])
local rec = '{"version":' .. v .. ',' .. string.sub(ARGV[1], 2)
redis.call('HSET', KEYS[2], v, rec)
redis.call('SET', KEYS[3], v)
return {'ok', rec}
"""

Changes = dict[str, dict[str, Any]]  # stage name -> options that differ from the configured pipeline


class VersionNotFound(KeyError):
    pass


class PipelineChanged(Exception):
    """The pipeline got another version while this change was prepared (another daemon's change)."""

    def __init__(self, current: int):
        super().__init__(f"the pipeline changed meanwhile (version {current})")
        self.current = current


def configured(name: str) -> dict[str, Any]:
    """Version 0: the pipeline as configured."""
    return {"pipeline": name, "version": 0, "stages": {}, "author": None, "note": "as configured",
            "created_ts": None}


class PipelineStore:
    def __init__(self, client: aioredis.Redis):
        self.r = client
        self._write = client.register_script(_WRITE)

    async def put(self, name: str, stages: Changes, author: str, note: str | None, base: int,
                  rolled_back_from: int | None = None) -> dict[str, Any]:
        """A new version holding `stages`, if the current version is still `base` (else PipelineChanged)."""
        rec: dict[str, Any] = {"pipeline": name, "stages": stages, "author": author, "note": note,
                               "created_ts": time.time()}
        if rolled_back_from is not None:
            rec["rolled_back_from"] = rolled_back_from
        status, value = await self._write(keys=list(pipeline_keys(name)), args=[
            json.dumps(rec, separators=(",", ":")), str(base)])
        status, value = (x.decode() if isinstance(x, bytes) else str(x) for x in (status, value))
        if status == "changed":
            raise PipelineChanged(int(value))
        await self.r.sadd(PIPELINES_INDEX_KEY, name)
        await self.r.publish(PIPELINES_CHANNEL, name)
        return json.loads(value)

    async def current(self, name: str) -> dict[str, Any]:
        _, versions, current = pipeline_keys(name)
        v = await self.r.get(current)
        if v is None:
            return configured(name)
        raw = await self.r.hget(versions, v)
        rec = _record(name, raw)
        if rec is None:  # evicted, deleted by hand, or not a version record: as configured, and the daemon runs on
            log.warning("the current pipeline version's record is missing or invalid in Redis: the pipeline runs "
                        "as configured", pipeline=name, version=v.decode() if isinstance(v, bytes) else str(v),
                        record="missing" if raw is None else "invalid")
            return configured(name)
        return rec

    async def version(self, name: str, version: int) -> dict[str, Any]:
        if version == 0:
            return configured(name)
        raw = await self.r.hget(pipeline_keys(name)[1], str(version))
        rec = _record(name, raw)
        if rec is None:
            if raw is not None:
                log.warning("a pipeline version's record is invalid in Redis", pipeline=name, version=version)
            raise VersionNotFound(f"{name} v{version}")
        return rec

    async def history(self, name: str, offset: int = 0, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
        """Newest first, version 0 (as configured) last. Returns (total versions, 0 included; page)."""
        seq, versions, _ = pipeline_keys(name)
        stored = int(await self.r.get(seq) or 0)
        wanted = list(range(stored - offset, max(stored - offset - limit, -1), -1))
        raws = await self.r.hmget(versions, [str(v) for v in wanted if v > 0]) if any(v > 0 for v in wanted) else []
        page = [rec for rec in (_record(name, x) for x in raws) if rec is not None]
        if wanted and wanted[-1] == 0:
            page.append(configured(name))
        return stored + 1, page

    async def all_current(self) -> list[dict[str, Any]]:
        names = sorted(x.decode() for x in await self.r.smembers(PIPELINES_INDEX_KEY))
        return [await self.current(n) for n in names]


def _record(name: str, raw: Any) -> dict[str, Any] | None:
    """A stored version record, or None when it is missing or not one (not JSON, no version number, stages not
    an object of objects)."""
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except (TypeError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(rec, dict):
        return None
    version, stages = rec.get("version"), rec.get("stages")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or not isinstance(stages, dict) \
            or not all(isinstance(k, str) and isinstance(v, dict) for k, v in stages.items()):
        return None
    rec["pipeline"] = name
    for key in ("author", "note", "created_ts"):
        rec.setdefault(key, None)
    return rec


class PipelineVersions(ChangeFollower):
    """The current version of every changed pipeline, in memory; follows the change channel (and reads everything
    again every `refresh_s`: streamd.follow). `on_change(record)` is called for each newer version it learns of that
    way (a daemon's own change is `set` by the daemon first, so it is not reported back to it)."""

    channel = PIPELINES_CHANNEL
    what = "pipeline versions"

    def __init__(self, store: PipelineStore, on_change: Callable[[dict[str, Any]], None],
                 refresh_s: float = 5.0, log_every_s: float = 30.0):
        super().__init__(store.r, log, refresh_s, log_every_s)
        self.store = store
        self.on_change = on_change
        self._current: dict[str, dict[str, Any]] = {}

    def get(self, name: str) -> dict[str, Any]:
        return self._current.get(name) or configured(name)

    def set(self, rec: dict[str, Any]) -> bool:
        """Keep `rec` if it is newer than the version known; True if it was."""
        old = self._current.get(rec["pipeline"])
        if old is not None and old["version"] >= rec["version"]:
            return False
        self._current[rec["pipeline"]] = rec
        return True

    def _learn(self, rec: dict[str, Any]) -> None:
        if self.set(rec):
            self.on_change(rec)

    async def read_all(self) -> None:
        for rec in await self.store.all_current():
            self._learn(rec)

    async def on_message(self, data: str) -> None:
        self._learn(await self.store.current(data))
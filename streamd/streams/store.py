"""Streams added through the control API, kept in one Redis hash (`keys.API_STREAMS_KEY`: id -> stream config as
JSON), so that a restarted daemon, or a second one, runs them too.

The daemon writes an entry only after its stream was accepted and started, and deletes it before stopping the
stream. Loading never fails: an entry that no longer parses comes back as a placeholder config with the reason,
and the daemon shows that stream as failed (fix it with PATCH, or remove it with DELETE). Redis errors are raised
(`RedisError`, `OSError`) for the caller to decide.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from streamd import keys
from streamd.config import StreamConfig
from streamd.errors import StreamdError
from streamd.keys import API_STREAMS_KEY
from streamd.log import get_logger

log = get_logger("streamd.streams")


class StoredStreams:
    def __init__(self, client: aioredis.Redis):
        self.r = client

    async def load(self) -> list[tuple[StreamConfig, str | None]]:
        """Every stored stream, by id: (config, None), or (placeholder config, why the entry is unusable)."""
        raw = await self.r.hgetall(API_STREAMS_KEY)
        out = []
        for sid, body in sorted(raw.items()):
            try:
                out.append((StreamConfig.model_validate_json(body), None))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "<entry>"
                out.append((placeholder(sid.decode(errors="replace"), body), f"invalid stored entry: {where}: "
                                                                           f"{err['msg']}"))
        return out

    async def save(self, s: StreamConfig) -> None:
        # only the fields the client set: defaults apply again when loaded (a Redis input without `fps` keeps
        # giving every entry a result after a restart)
        await self.r.hset(API_STREAMS_KEY, s.id, s.model_dump_json(exclude_unset=True))

    async def delete(self, stream_id: str) -> None:
        await self.r.hdel(API_STREAMS_KEY, stream_id)

    async def forget_marks(self, stream_id: str) -> None:
        """A deleted stream's acking marks (a Redis input on another server) go with it; Redis down: its hash
        expires (keys.ACKING_TTL_MS)."""
        try:
            await self.r.delete(keys.acking_key(stream_id))
        except (RedisError, OSError) as e:
            log.warning("a deleted stream's acking marks not removed", stream=stream_id,
                        error=str(e) or type(e).__name__)


def placeholder(stream_id: str, body: bytes) -> StreamConfig:
    """A config that only carries what a failed stream shows (id, url, pipeline); never started."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    url, pipeline = data.get("url"), data.get("pipeline")
    return StreamConfig.model_construct(id=stream_id, url=url if isinstance(url, str) else "",
                                        pipeline=pipeline if isinstance(pipeline, str) else "default")


class StreamExists(StreamdError):
    def __init__(self, stream_id: str):
        super().__init__(f"stream {stream_id!r} exists")


class StreamNotFound(StreamdError):
    def __init__(self, stream_id: str):
        super().__init__(f"no stream {stream_id!r}")

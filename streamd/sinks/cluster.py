"""The result sink's writes on a Redis Cluster (streamd.sinks.redis keeps its one-connection path for a single
Redis).

A batch goes in one pipeline that redis-py's cluster client splits by node (so each key's records stay in order).
A record whose input entry is in its own slot (an input key tagged with the stream id, `frames:{<stream_id>}`) is
written with its acknowledgement in one Lua call (ACKED_XADD: atomic, like the MULTI/EXEC on a single Redis; redis-py
runs a cluster MULTI/EXEC one command per round trip, which made that path 15x slower). A record whose input key is
in another slot is acknowledged after it was written, in a second round: at least once, so a crash or an outage
between the two rounds delivers the entry again and it gets a second result (same `input.entry_id`). A record
written in a batch that failed elsewhere is marked `written` (and `acked`) and is not written again when the batch
is retried.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from streamd import keys
from streamd.log import get_logger

if TYPE_CHECKING:
    from streamd.sinks.redis import Pending


log = get_logger("streamd.sink")


def ack_failed(p: Pending, error: Exception) -> None:
    """An XACK answered an error (WRONGTYPE: the input key is no longer a stream): no retry could acknowledge the
    entry, and retrying would write its result again and hold every other stream's records back; logged only (also
    on a single Redis)."""
    log.warning("input entry not acknowledged", key=p.ack.key if p.ack else None, stream=p.stream_id,
                error=str(error))

WriteArgs = Callable[["Pending"], tuple[Any, ...]]  # a record's XADD (or fenced EVAL) command
Written = Callable[["Pending", Any], None]  # told once per record, with the write's reply


# a result and its input entry's acknowledgement, in one slot, atomically. KEYS: results, input; ARGV: group, entry
# id, maxlen, the entry's fields. An XACK that fails (WRONGTYPE: the input key is no longer a stream) leaves the
# result written and is not an error: nothing could acknowledge the entry, and a retry would write the result again
ACKED_XADD = ("local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4)) "
              "redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[2]) return id")


def _ack_beside(p: Pending) -> bool:
    """Its input entry is in its slot: acknowledged in the Lua call that writes it."""
    return p.ack is not None and keys.same_slot(p.key, p.ack.key)


def _acked_xadd(p: Pending) -> tuple[Any, ...]:
    assert p.ack is not None and p.fence is None  # a fenced result never carries an acknowledgement
    return ("EVAL", ACKED_XADD, 2, p.key, p.ack.key, p.ack.group, p.ack.entry_id, p.maxlen, *chain(*p.fields.items()))


class ClusterWriter:
    def __init__(self, client: RedisCluster, write_args: WriteArgs):
        self.r = client
        self._args = write_args

    async def write(self, batch: list[Pending], written: Written) -> None:
        """Write what of `batch` is not written yet, calling `written(record, reply)` once per record written; raise
        the first error after every part had its try (the caller retries the batch)."""
        todo = [p for p in batch if not p.written]
        error = await self._write(todo, written) if todo else None
        late = [p for p in batch if p.written and p.ack is not None and not p.acked]
        if late:  # results in another slot than their input: acknowledged once written
            try:
                await self._acks(late)
            except Exception as e:  # noqa: BLE001 - the first error is raised below
                error = error or e
        if error is not None:
            raise error

    async def _write(self, ps: list[Pending], written: Written) -> Exception | None:
        pipe = self.r.pipeline(transaction=False)
        beside = [_ack_beside(p) for p in ps]
        for p, acked in zip(ps, beside):
            pipe.execute_command(*(_acked_xadd(p) if acked else self._args(p)))
        replies = await pipe.execute(raise_on_error=False)
        error = None
        for p, acked, reply in zip(ps, beside, replies):
            if isinstance(reply, Exception):
                error = error or reply
                continue
            p.written = True
            p.acked = acked
            written(p, reply)
        return error

    async def _acks(self, ps: list[Pending]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for p in ps:
            assert p.ack is not None
            pipe.execute_command("XACK", p.ack.key, p.ack.group, p.ack.entry_id)
        replies = await pipe.execute(raise_on_error=False)
        error = None
        for p, reply in zip(ps, replies):
            if isinstance(reply, ResponseError):  # WRONGTYPE: no retry can acknowledge it
                ack_failed(p, reply)
                p.acked = True
            elif isinstance(reply, Exception):
                error = error or reply
            else:
                p.acked = True
        if error is not None:
            raise error

"""Consumer groups the daemon's Redis inputs created: a deleted stream's group goes with it, unless another stream
still reads the same key with the same group (the entries themselves are the user's and stay)."""

from __future__ import annotations

from collections.abc import Iterable

from streamd.log import get_logger
from streamd.streams.supervisor import State, StreamRunner

log = get_logger("streamd.streams")


class ConsumerGroups:
    def __init__(self) -> None:
        self._made: set[tuple[str, str, str]] = set()  # (server url, key, group) our inputs created

    async def drop(self, runner: StreamRunner, others: Iterable[StreamRunner]) -> None:
        src = runner.redis_source
        if src is None or runner.ref is None:
            return
        group = runner.cfg.redis_input.group
        ident = (runner.ref.url, src.key, group)
        if not (src.created_group or ident in self._made):
            return  # the group was there before streamd: not ours to remove
        self._made.add(ident)  # the last stream reading it removes it
        for other in others:
            o = other.redis_source
            if other.ref is not None and other.ref.kind == "redis" and other.ref.key == src.key \
                    and other.ref.url == runner.ref.url and other.cfg.redis_input.group == group \
                    and other.state not in (State.STOPPED, State.FAILED) and (o is None or o is not src):
                return
        try:
            await src.r.xgroup_destroy(src.key, group)
            self._made.discard(ident)
            log.info("consumer group removed", stream=runner.cfg.id, key=src.key, group=group)
        except Exception as e:  # noqa: BLE001 - Redis down: the group stays, nothing else is affected
            log.warning("consumer group not removed", stream=runner.cfg.id, error=str(e))

"""A daemon's streams in fleet mode (`fleet.enabled`): every stream that needs an owner (cameras, HLS, files: not
Redis frame inputs, whose consumer group already splits them) is offered to the fleet (streamd/fleet.py) and runs
here only while this daemon holds its lease. A stream taken over from another daemon continues its `seq` after
the last published result, starts with a discontinuity, and says so in a `state` event (`owner_changed`)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from streamd import keys
from streamd.config import StreamConfig
from streamd.errors import SourceError, StreamdError
from streamd.fleet import Fleet, Lease, lease_key
from streamd.log import get_logger
from streamd.sources import parse_reference
from streamd.streams.load import LoadMeter

if TYPE_CHECKING:
    from streamd.streams.manager import StreamManager

log = get_logger("streamd.fleet")
_NO_LEASE = "-"  # a token no lease ever holds: a stream's results written after its lease went are refused


class CapacityExhausted(StreamdError):
    def __init__(self, streams: int, capacity: float, overloaded: list[str]):
        why = f" ({', '.join(overloaded)} over the load limit)" if overloaded else ""
        super().__init__(f"the fleet has {streams} streams and room for {capacity:g}{why}: no room for another")
        self.streams, self.capacity, self.overloaded = streams, capacity, overloaded


def leased(s: StreamConfig) -> bool:
    """Whether the stream needs an owner (Redis frame inputs are shared through their consumer group)."""
    try:
        return parse_reference(s.url).kind != "redis"
    except SourceError:
        return True


class FleetStreams:
    def __init__(self, streams: "StreamManager", client: Any, version: str):
        self.d = streams
        self.cfgs: dict[str, tuple[StreamConfig, str]] = {}  # leased streams this daemon knows: (config, origin)
        self.fleet = Fleet(client, streams.cfg.fleet, streams.api_url, version, self._acquired, self._released,
                           self._load, streams.metrics)
        streams.sink.fence_for = self._fence
        streams.sink.on_fenced = self.fleet.fenced
        streams.sink.member = self.fleet.member_id
        fc = streams.cfg.fleet
        self.load = LoadMeter(fc.max_busy, fc.max_drop_fraction, tau_s=max(3.0, 3 * fc.renew_s))
        self._reserved: set[str] = set()  # admitted, not offered yet

    @property
    def member_id(self) -> str:
        return self.fleet.member_id

    def leases_kind(self, s: StreamConfig) -> bool:
        return leased(s)

    def _members(self) -> dict[str, dict[str, Any]]:
        """The live members as their heartbeats say (a heartbeat older than three renew intervals is a member that
        stopped: its key has not expired yet, but placement counts it out already), this daemon as it is now."""
        now, stale = time.time(), max(3 * self.d.cfg.fleet.renew_s, 1.0)
        members = {m: rec for m, rec in self.fleet.members.items()
                   if now - float(rec.get("heartbeat") or 0) <= stale}
        members[self.member_id] = {"max_streams": self.d.cfg.fleet.max_streams, "streams": sorted(self.fleet.leases),
                                   "load": self.load.report()}
        return members

    def overloaded(self) -> list[str]:
        return sorted(m for m, rec in self._members().items() if (rec.get("load") or {}).get("overloaded"))

    def capacity(self) -> float | None:
        """Streams the live members can run in all: each its `fleet.max_streams`, or, while it is over its measured
        load limit, only the streams it runs now. None: a member with room has no limit."""
        total = 0.0
        for rec in self._members().values():
            if (rec.get("load") or {}).get("overloaded"):
                total += len(rec.get("streams") or [])
            elif rec.get("max_streams") is None:
                return None
            else:
                total += float(rec["max_streams"])
        return total

    def full(self, extra: int = 0) -> bool:
        cap = self.capacity()
        return cap is not None and len(set(self.cfgs) | self._reserved) + extra > cap

    def admit(self, stream_id: str) -> None:
        """Raises CapacityExhausted when one more stream would exceed what the fleet can run; otherwise holds a
        place for it until `unreserve` (so two requests at once on this daemon cannot both take the last place).
        Across daemons admission is as good as the last renew interval's view: a stream admitted by two daemons
        at once beyond the capacity waits as `pending`."""
        if self.full(1):
            raise CapacityExhausted(len(self.cfgs), self.capacity() or 0.0, self.overloaded())
        self._reserved.add(stream_id)

    def unreserve(self, stream_id: str) -> None:
        self._reserved.discard(stream_id)

    def offer(self, s: StreamConfig, origin: str) -> None:
        """A stream of the config file or the API: start it here (not leased) or let the fleet place it."""
        if not leased(s):
            self.d.add_stream(s, origin)
            return
        self.cfgs[s.id] = (s, origin)
        self.fleet.want(s.id, everywhere=origin == "api")

    async def withdraw(self, stream_id: str) -> None:
        """The stream was deleted: nobody should own it any more."""
        self.cfgs.pop(stream_id, None)
        self.fleet.unwant(stream_id)
        await self.fleet.release(stream_id, "stream deleted")

    async def run(self, sync_s: float | None = None) -> None:
        """The fleet's loop, and every `sync_s` the streams other daemons' APIs added or deleted."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.fleet.run(), name="fleet")
            tg.create_task(self._sync_loop(sync_s or self.d.cfg.fleet.renew_s), name="fleet-sync")

    async def _sync_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except (RedisError, OSError) as e:
                log.warning("fleet sync failed", error=str(e) or type(e).__name__)

    async def sync(self) -> None:
        stored = {s.id: s for s, problem in await self.d.store.load() if problem is None}
        for sid, s in stored.items():
            known = self.cfgs.get(sid)
            if known is None and sid not in self.d.runners or known is not None and known[0] != s:
                if known is not None:  # changed through another daemon's API: the owner restarts it
                    await self.fleet.release(sid, "changed through the API")
                self.d.api_stream_ids.add(sid)
                self.offer(s, "api")
        for sid in [sid for sid, (_, origin) in self.cfgs.items() if origin == "api" and sid not in stored]:
            self.d.api_stream_ids.discard(sid)
            await self.withdraw(sid)

    async def leave(self) -> None:
        await self.fleet.leave()

    # -- the fleet's callbacks -----------------------------------------------------------------------------------
    async def _acquired(self, sid: str, lease: Lease, previous: str | None) -> None:
        s, origin = self.cfgs[sid]
        last = await self._last_seq(sid)
        runner = self.d.add_stream(s, origin)
        runner.continue_seq(last + 1)
        if previous is not None and previous != self.member_id:
            runner.sampler.mark_discontinuity()
            runner.event("state", {"from": runner.state.value, "to": runner.state.value, "reason":
                                   f"owner changed: {previous} -> {self.member_id}", "reason_code": "owner_changed",
                                   "owner": self.member_id, "previous_owner": previous})

    async def _released(self, sid: str, why: str) -> None:
        if sid in self.d.runners:
            await self.d.remove_stream(sid)

    async def _last_seq(self, sid: str) -> int:
        entries = await self.d.redis.xrevrange(keys.results_key(sid), count=1)
        if not entries:
            return -1
        fields = entries[0][1]
        try:
            return int(fields.get(b"seq", b"-1"))
        except ValueError:
            return -1

    def _fence(self, sid: str) -> tuple[str, str] | None:
        if sid not in self.cfgs:
            return None  # not a leased stream (a Redis input)
        return lease_key(sid), self.fleet.token(sid) or _NO_LEASE

    def _load(self) -> dict[str, Any]:
        """This daemon's heartbeat load (every renew interval): what it runs, and its measured load."""
        runners = self.d.runners
        self.load.sample(self.d.pipelines, runners)
        if self.fleet.overloaded != self.load.overloaded:
            log.warning("load limit " + ("reached: taking no new stream" if self.load.overloaded else "cleared"),
                        **self.load.report())
        self.fleet.overloaded = self.load.overloaded
        return {"streams": {sid: {"state": runners[sid].state.value, "fps_out": round(runners[sid].fps_out, 2)}
                            for sid in self.fleet.leases if sid in runners},
                "owned": len(self.fleet.leases), "running": len(runners), **self.load.report()}

    def remote(self, sid: str) -> dict[str, Any] | None:
        """What the fleet says of a stream another daemon owns: owner, state, rate, last heartbeat."""
        for m, rec in self.fleet.members.items():
            st = rec.get("load", {}).get("streams", {}).get(sid)
            if st is not None:
                return {"owner": m, "owner_address": rec.get("address"), **st, "heartbeat": rec.get("heartbeat")}
        return None


__all__ = ["FleetStreams", "leased"]

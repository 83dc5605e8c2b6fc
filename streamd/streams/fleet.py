"""A daemon's streams in fleet mode (`fleet.enabled`): every stream that needs an owner (cameras, HLS, files: not
Redis frame inputs, whose consumer group already splits them) is offered to the fleet (streamd/fleet.py) and runs
here only while this daemon holds its lease. A stream taken over from another daemon continues its `seq` after
the last published result, starts with a discontinuity, and says so in a `state` event (`owner_changed`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from streamd import keys
from streamd.config import StreamConfig
from streamd.errors import SourceError, StreamdError
from streamd.fleet import Fleet, Lease, lease_key
from streamd.log import get_logger
from streamd.sources import parse_reference
from streamd.streams.load import LoadMeter
from streamd.streams.supervisor import State, StreamRunner

if TYPE_CHECKING:
    from streamd.streams.manager import StreamManager

log = get_logger("streamd.fleet")
_NO_LEASE = "-"  # a token no lease ever holds: a stream's results written after its lease went are refused


def fingerprint(s: StreamConfig) -> str:
    """The stream's configuration, hashed: an end recorded for one configuration does not hold for another."""
    return hashlib.sha256(json.dumps(s.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:32]


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
                           self._load, streams.metrics, self._ended_elsewhere)
        streams.sink.fence_for = self._fence
        streams.sink.on_fenced = self.fleet.fenced
        streams.sink.member = self.fleet.member_id
        fc = streams.cfg.fleet
        self.load = LoadMeter(fc.max_busy, fc.max_drop_fraction, tau_s=max(3.0, 3 * fc.renew_s))
        self._reserved: set[str] = set()  # admitted, not offered yet
        self._finishing: set[asyncio.Task[None]] = set()  # leases of ended streams being given back
        self._changing: dict[str, int] = {}  # stream -> this daemon's API changes of it under way
        self._syncs: list[set[str]] = []  # per sync under way: the streams this daemon's API changed meanwhile

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
        if self.fleet.duplicate is None:  # standing aside: the record of this member id is the other daemon's
            members[self.member_id] = {"max_streams": self.d.cfg.fleet.max_streams,
                                       "streams": sorted(self.fleet.leases), "load": self.load.report()}
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
        cap = self.capacity()  # a stream that ended for good (done) holds no place
        return cap is not None and len((set(self.cfgs) - set(self.fleet.done)) | self._reserved) + extra > cap

    def admit(self, stream_id: str) -> None:
        """Raises CapacityExhausted when one more stream would exceed what the fleet can run; otherwise holds a
        place for it until `unreserve` (so two requests at once on this daemon cannot both take the last place).
        Across daemons admission is as good as the last renew interval's view: a stream admitted by two daemons
        at once beyond the capacity waits as `pending`."""
        if self.full(1):
            raise CapacityExhausted(len(set(self.cfgs) - set(self.fleet.done)), self.capacity() or 0.0,
                                    self.overloaded())
        self._reserved.add(stream_id)

    def unreserve(self, stream_id: str) -> None:
        self._reserved.discard(stream_id)

    def offer(self, s: StreamConfig, origin: str) -> None:
        """A stream of the config file or the API: start it here (not leased) or let the fleet place it."""
        if not leased(s):
            self.d.add_stream(s, origin)
            return
        self.cfgs[s.id] = (s, origin)
        if self.fleet.done.get(s.id) not in (None, fingerprint(s)):  # ended with other settings: a new stream
            self.fleet.done.pop(s.id)
            self._drop_ended(s.id)
        self.fleet.want(s.id, everywhere=origin == "api")

    def _drop_ended(self, sid: str) -> None:
        """A stream shown ended here without a lease (streamd.fleet's `done`) is no longer: its stopped runner goes
        (its owner-to-be starts another; until then the API says what the fleet says)."""
        rn = self.d.runners.get(sid)
        if rn is not None and rn.state in (State.STOPPED, State.FAILED) and not self.fleet.owns(sid):
            del self.d.runners[sid]

    async def withdraw(self, stream_id: str) -> None:
        """The stream was deleted: nobody should own it any more."""
        self.cfgs.pop(stream_id, None)
        done = self.fleet.done.get(stream_id) is not None
        self.fleet.unwant(stream_id)
        await self.fleet.release(stream_id, "stream deleted")
        if done and stream_id in self.d.runners and not self.fleet.owns(stream_id):
            await self.d.remove_stream(stream_id)  # shown ended here, with no lease to release

    async def run(self, sync_s: float | None = None) -> None:
        """The fleet's loop, and every `sync_s` the streams other daemons' APIs added or deleted."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.fleet.run(), name="fleet")
            tg.create_task(self._sync_loop(sync_s or self.d.cfg.fleet.renew_s), name="fleet-sync")

    async def _sync_loop(self, interval_s: float) -> None:
        # it ends by itself once the daemon leaves the fleet: a stopping daemon whose cancellation of this task got
        # lost in a Redis call under way (seen: the daemon's stop hung 30 s in the tests) does not wait for it forever
        while not self.fleet.leaving:
            await asyncio.sleep(interval_s)
            if self.fleet.leaving:
                return
            try:
                await self.sync()
            except (RedisError, OSError) as e:
                log.warning("fleet sync failed", error=str(e) or type(e).__name__)

    @contextlib.asynccontextmanager
    async def local_change(self, sid: str) -> AsyncIterator[None]:
        """Around a change of `sid` through this daemon's API (its write to Redis, and what it does here): a sync
        whose read of the stored streams may be older than that write leaves `sid` alone (the next sync sees it)."""
        self._changing[sid] = self._changing.get(sid, 0) + 1
        for touched in self._syncs:
            touched.add(sid)
        try:
            yield
        finally:
            self._changing[sid] -= 1
            if not self._changing[sid]:
                del self._changing[sid]
            for touched in self._syncs:
                touched.add(sid)

    async def sync(self) -> None:
        touched = set(self._changing)  # changed through this daemon's API since the read began, or under way then
        self._syncs.append(touched)
        try:
            await self._sync(touched)
        finally:  # by identity: another sync's set may be equal to this one (list.remove compares with ==)
            self._syncs = [t for t in self._syncs if t is not touched]

    async def _sync(self, touched: set[str]) -> None:
        stored = {s.id: s for s, problem in await self.d.store.load() if problem is None}
        for sid, s in stored.items():
            if sid in touched:  # changed through this daemon's API meanwhile: the read may be older than that
                continue
            known = self.cfgs.get(sid)
            if known is None and sid not in self.d.runners or known is not None and known[0] != s:
                if known is not None:  # changed through another daemon's API: the owner restarts it
                    await self.fleet.release(sid, "changed through the API")
                    if sid in touched:
                        continue
                self.d.api_stream_ids.add(sid)
                self.offer(s, "api")
        for sid in [sid for sid, (_, origin) in self.cfgs.items() if origin == "api" and sid not in stored]:
            if sid in touched or self.cfgs.get(sid, (None, ""))[1] != "api":
                continue
            self.d.api_stream_ids.discard(sid)
            await self.withdraw(sid)  # deleted through another daemon's API: stopped here if it ran here,
            self.d.forget_stream(sid)  # and forgotten as that daemon's DELETE forgets it

    async def leave(self) -> None:
        await self.fleet.leave()

    # -- the fleet's callbacks -----------------------------------------------------------------------------------
    async def _acquired(self, sid: str, lease: Lease, previous: str | None) -> None:
        """The lease is ours: start the stream, unless it was withdrawn (deleted), changed or lost while this waited
        for Redis (a DELETE, a sync or a lost lease runs meanwhile: each sees no runner yet, so this must look again
        after every await)."""
        if not await self._still_ours(sid, lease):
            return
        ended = await self._ended(sid)
        last = await self._last_seq(sid)
        if not await self._still_ours(sid, lease):
            return
        s, origin = self.cfgs[sid]
        if ended is not None and ended.get("config") == fingerprint(s):
            # it ended on a daemon before (a file played to its end): shown so, not played again, and its lease
            # given back (an ended stream holds no capacity; this daemon does not take it again)
            self.d.add_ended_stream(s, origin, State(ended["state"]), ended.get("reason"), ended.get("reason_code"))
            await self.fleet.finish(sid, ended["config"])
            return
        runner = self.d.add_stream(s, origin, (lease.key, lease.token))  # its events under its lease
        runner.continue_seq(last + 1)
        if previous is not None and previous != self.member_id:
            runner.sampler.mark_discontinuity()
            runner.event("state", {"from": runner.state.value, "to": runner.state.value, "reason":
                                   f"owner changed: {previous} -> {self.member_id}", "reason_code": "owner_changed",
                                   "owner": self.member_id, "previous_owner": previous})

    async def _still_ours(self, sid: str, lease: Lease) -> bool:
        """Whether a stream whose lease was just taken should start: still wanted, and `lease` still the one held.
        A stream no longer wanted (deleted meanwhile) whose lease is still held gives it back."""
        if self.fleet.leases.get(sid) is not lease:
            return False  # released or lost meanwhile (the stream was deleted or changed, or the lease expired)
        if sid not in self.cfgs or sid not in self.fleet.wanted or self.fleet.leaving:  # or the daemon is stopping
            await self.fleet.release(sid, "stream deleted")
            return False
        return True

    async def _ended(self, sid: str) -> dict[str, Any] | None:
        raw = await self.d.redis.get(keys.stream_ended_key(sid))
        try:
            rec = json.loads(raw) if raw else None
            State(rec["state"]) if rec else None
        except (ValueError, KeyError, TypeError):
            return None
        return rec

    def finished(self, runner: StreamRunner) -> None:
        """A stream's runner is through (called by the manager once its last frame left the pipeline: its last
        results are in the sink): one that ended by itself (end of input: a file played to its end) is recorded in
        Redis, written by the sink after those results and under the stream's lease, so a daemon that takes the
        lease over later (a rebalance, a takeover) shows it ended instead of playing it again, and no result of it
        is missing then. Once the record is written the lease goes (Fleet.finish): an ended stream holds no
        capacity."""
        sid = runner.cfg.id
        if not (runner.state is State.STOPPED and runner.reason_code == "ended"):
            # stopped by request (deleted, changed, handed over, the daemon stopping): not an end. A failure is not
            # recorded either: it may be this daemon's alone (its pipeline, its egress policy, its network path, a
            # file only its host has, a camera offline for a while): another owner tries again
            return
        lease, known = self.fleet.leases.get(sid), self.cfgs.get(sid)
        if lease is None or known is None or known[0] != runner.cfg or self.d.runners.get(sid) is not runner:
            return
        fp = fingerprint(runner.cfg)
        rec = {"state": runner.state.value, "reason": runner.reason, "reason_code": runner.reason_code,
               "config": fp, "member": self.member_id, "ts": round(time.time(), 3)}

        def written() -> None:  # the end is in Redis: the lease it was written under goes, if still held
            if self.fleet.leases.get(sid) is lease and self.cfgs.get(sid, (None, ""))[0] == runner.cfg:
                task = asyncio.get_running_loop().create_task(self.fleet.finish(sid, fp))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)

        self.d.sink.set_after(sid, keys.stream_ended_key(sid), json.dumps(rec), (lease.key, lease.token), written)

    async def _ended_elsewhere(self, sid: str, tag: str) -> bool:
        """Another member says the stream ended with settings `tag` (it holds no lease now): when they are this
        daemon's settings and its end record (the truth: deleted, the stream plays again) says so, it is shown ended
        here too (nothing plays) and True."""
        known = self.cfgs.get(sid)
        if known is None or fingerprint(known[0]) != tag:
            return False
        ended = await self._ended(sid)
        known = self.cfgs.get(sid)
        if ended is None or ended.get("config") != tag or known is None or fingerprint(known[0]) != tag \
                or self.fleet.owns(sid):
            return False
        rn = self.d.runners.get(sid)
        if rn is None or rn.state in (State.STOPPED, State.FAILED):
            self.d.add_ended_stream(known[0], known[1], State(ended["state"]), ended.get("reason"),
                                    ended.get("reason_code"))
        return True

    async def forget_end(self, sid: str) -> None:
        """The stream was deleted or set again through the API: a new stream of that id plays from its start."""
        await self.d.redis.delete(keys.stream_ended_key(sid))

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
        """The lease a result must still hold when written. Every result that reaches this is a leased stream's (a
        Redis input's results carry their entry and are never fenced): one without a lease here (its stream was
        deleted or moved while its last frames were on their way) gets a token no lease holds, and is refused."""
        return lease_key(sid), self.fleet.token(sid) or _NO_LEASE

    def _load(self) -> dict[str, Any]:
        """This daemon's heartbeat load (every renew interval): what it runs, and its measured load."""
        runners = self.d.runners
        self.load.sample(self.d.pipelines, runners)
        if self.fleet.overloaded != self.load.overloaded:
            log.warning("load limit " + ("reached: taking no new stream" if self.load.overloaded else "cleared"),
                        **self.load.report())
        self.fleet.overloaded = self.load.overloaded
        streams = {sid: {"state": runners[sid].state.value, "fps_out": round(runners[sid].fps_out, 2),
                         "fps": runners[sid].fps, "pipeline": runners[sid].cfg.pipeline, "url": runners[sid].url_redacted}
                   for sid in self.fleet.leases if sid in runners}
        for sid in self.fleet.done:  # ended for good, shown here, held by nobody (`ended`: no owner)
            if sid in runners and sid not in streams:
                rn = runners[sid]
                streams[sid] = {"state": rn.state.value, "fps_out": 0.0, "fps": rn.fps, "pipeline": rn.cfg.pipeline,
                                "url": rn.url_redacted, "reason": rn.reason, "reason_code": rn.reason_code,
                                "ended": True}
        for sid, st in streams.items():  # where it comes from: another daemon that has not synced an API stream yet
            st["source"] = self.cfgs[sid][1] if sid in self.cfgs else "config"  # does not take it for a config one
        return {"streams": streams, "owned": len(self.fleet.leases), "running": len(runners), **self.load.report()}

    def remote(self, sid: str) -> dict[str, Any] | None:
        """What the fleet says of a stream another daemon owns: owner, state, rate, last heartbeat (a stream that
        ended for good, `ended`: no owner; its owner's word first, if one runs it)."""
        found = None
        for m, rec in self.fleet.members.items():
            st = rec.get("load", {}).get("streams", {}).get(sid)
            if st is not None and (found is None or not st.get("ended")):
                found = {"owner": None if st.get("ended") else m, "owner_address": rec.get("address"), **st,
                         "heartbeat": rec.get("heartbeat")}
                if not st.get("ended"):
                    break
        return found


__all__ = ["FleetStreams", "leased"]

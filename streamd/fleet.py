"""Several daemons on one Redis: membership, one lease per stream, placement. Nothing here is home-made consensus:
a lease is a Redis key set with NX and a TTL (value `<member>|<token>`), renewed and released by compare-and-set
Lua scripts; a member is a key with a TTL that it refreshes.

- Daemons usually want the same streams (the shared config file, plus the streams added through any daemon's API,
  kept in Redis); each says in its member record which config-file streams it wants (`wants`: config files may
  differ, e.g. during a rolling config change; an API stream is wanted by every member). For each stream the preferred owner is chosen by rendezvous hashing over the
  live members that want it, weighted by each member's capacity (`fleet.max_streams`); a daemon takes a free lease when it is the preferred
  owner, or when the stream has been free for a whole lease TTL (its preferred owner does not take it).
- A daemon that owns a stream renews its lease every `renew_s`; one that cannot (paused, cut off) loses it after
  `lease_ttl_s`, and another takes over. The result writer checks the lease token in the same Lua call that writes
  the result (`streamd.sinks.redis.FENCED_XADD`), so a daemon that lost its lease never publishes a result after
  the new owner started.
- A lease key that went missing while its holder still runs the stream (it expired during a Redis outage longer
  than `lease_ttl_s`; not a redis-server restarted empty: its `:lease:last` is gone too) is taken again by that holder at its next renewal, and its
  buffered results are written meanwhile, as long as nobody took the stream since and it was not released
  (`:lease:last` still holds the lease's token).
- A daemon stopping gracefully releases its leases at once (hand-over within a renew interval).
- A stream that ended for good (a file played to its end; its end recorded in Redis after its last result) gives its
  lease back and stays wanted, shown ended: it holds no capacity, and no member takes it again (members say in their
  record which streams they saw end; one that did not hear of it finds the end record when it takes the lease, and
  gives it back).
- Rebalancing: a stream whose preferred owner is another live member is handed over, at most `max_moves` per
  interval, only after that member has been alive for `settle_s` (no flapping while members come and go).
- Redis frame inputs take no lease: their consumer group splits the entries between daemons already.

Keys (streamd.keys): `streamd:{<stream>}:lease` and `:lease:last` (beside the stream's results: one Cluster slot,
so the fenced write is one Lua call), `streamd:{fleet}:member:<id>` (JSON: id, address, version, capacity, wants,
streams, load, heartbeat, ended) and `streamd:{fleet}:members` (a set of ids, pruned): one slot, so one MGET reads every member on
a Redis Cluster too. Every other command here touches one key; placement reads the leases of all the streams it
wants and does not own in one pipelined round trip per tick (a cluster client sends one pipeline per master).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamd.keys import FLEET_MEMBERS_KEY as MEMBERS_KEY
from streamd.keys import fleet_member_key, lease_key, lease_last_key
from streamd.errors import StreamdError
from streamd.log import get_logger

log = get_logger("streamd.fleet")

# KEYS: lease, lease:last; ARGV: token, ttl_ms. 1: renewed; 2: the key was missing (expired while Redis was away)
# and nobody took the stream since, nor was it released (lease:last is still this lease's token): taken again;
# 0: another daemon holds it, or took it since, or this daemon released it.
_RENEW = ("local v = redis.call('GET', KEYS[1]) "
          "if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end "
          "if not v and redis.call('GET', KEYS[2]) == ARGV[1] then "
          "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end "
          "return 0")
# KEYS: lease, lease:last; ARGV: token, released marker. The lease goes, and lease:last no longer names its token:
# neither a renewal under way nor a result still buffered with that token can take the released lease again.
_RELEASE = ("if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('SET', KEYS[2], ARGV[2]) end "
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")


class StandingAside(StreamdError):
    """A change of a stream through the API of a daemon standing aside (another running daemon has its
    fleet.member_id): refused, since this daemon takes no part in the fleet (its DELETE would stop nothing)."""

    def __init__(self, why: str):
        super().__init__(f"this daemon changes no stream: {why}")


class ConfigStreamInFleet(StreamdError):
    """DELETE through the API of a stream of the config file in fleet mode while other live daemons' config files
    name it too: they would take it over at once, so it is refused (the config files are what to edit)."""

    def __init__(self, stream_id: str, members: list[str]):
        super().__init__(f"stream {stream_id!r} is in the config file of the fleet's daemons ({', '.join(members)} "
                         "would take it over): remove it from their config files (and restart them)")
        self.stream_id, self.members = stream_id, members


def default_member_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def preferred(stream_id: str, members: dict[str, float]) -> str | None:
    """Weighted rendezvous hashing: the member with the highest -w / ln(u), u a hash of (member, stream) in (0, 1)."""
    best, best_score = None, -math.inf
    for m, weight in members.items():
        h = int.from_bytes(hashlib.blake2b(f"{m}\0{stream_id}".encode(), digest_size=8).digest(), "big")
        u = (h + 1) / (2**64 + 1)
        score = -weight / math.log(u)
        if score > best_score:
            best, best_score = m, score
    return best


def _holder(lease_value: bytes | None) -> str | None:
    """The member id in a lease key's value `<member>|<token>` (None: no lease)."""
    return lease_value.decode().split("|", 1)[0] if lease_value else None


@dataclass
class Lease:
    stream_id: str
    token: str  # "<member>|<random>": the value of the lease key while it is ours
    since: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return lease_key(self.stream_id)


class Fleet:
    """One daemon's view of the fleet. `on_acquire(stream_id, lease, previous_owner)` starts a stream here;
    `on_release(stream_id, why)` stops it (the lease is already gone or being handed over)."""

    def __init__(self, client: aioredis.Redis, cfg: Any, address: str | None, version: str,
                 on_acquire: Callable[[str, Lease, str | None], Awaitable[None]],
                 on_release: Callable[[str, str], Awaitable[None]], load: Callable[[], dict[str, Any]],
                 metrics: Any = None, on_ended: Callable[[str, str], Awaitable[bool]] | None = None):
        self.r = client
        self.cfg = cfg
        self.member_id: str = cfg.member_id or default_member_id()
        self.address = address
        self.version = version
        self.capacity = float(cfg.max_streams or 1000)
        self.overloaded = False  # over its measured-load limit (streamd.streams.fleet): takes no new stream
        self._on_acquire = on_acquire
        self._on_release = on_release
        self._load = load
        self.wanted: set[str] = set()  # streams that need an owner (leased kinds only)
        self.shared: set[str] = set()  # of those, the ones every member wants (API streams)
        self.leases: dict[str, Lease] = {}
        # streams that ended for good (a file played to its end), by a tag of their settings: still wanted (shown
        # ended), but neither leased nor placed, so they hold no capacity; said in the member record (`ended`), so
        # the other members learn it (`on_ended(stream, tag)`: True when it holds for their settings too, and its
        # end record says so)
        self.done: dict[str, str] = {}
        self._not_ended: dict[str, str] = {}  # stream -> a tag another member said ended that did not hold here
        self._on_ended = on_ended
        self.members: dict[str, dict[str, Any]] = {}
        self._free_since: dict[str, float] = {}
        self._seen_since: dict[str, float] = {}  # member -> when we first saw it alive
        self._wants: dict[str, frozenset[str] | None] = {}  # member -> the streams it wants (None: any)
        self._wake = asyncio.Event()
        self._metrics = metrics
        self.leaving = False  # leave() was called: no heartbeat, no lease taken, until the daemon stops
        self.instance = secrets.token_hex(8)  # this process (two daemons given one fleet.member_id differ in it)
        self.duplicate: str | None = None  # another running daemon's instance with this member id: we stand aside
        # (it still reads the members' records: GET /api/v1/cluster and GET /api/v1/streams/{id} show the fleet)
        self._ticking = asyncio.Lock()  # one tick at a time; leave() waits for the one under way
        self._placing = 0  # place() calls under way (an API request's stream placed at once): leave() waits for them
        # leases being taken (place(), the tick's _place): each holds a place under `capacity` from before its
        # first await until its lease is in `leases` (or not taken), so placements at once never take more streams
        # than fleet.max_streams between them
        self._taking = 0
        self._placed = asyncio.Event()
        self._placed.set()

    @property
    def ttl_ms(self) -> int:
        return int(self.cfg.lease_ttl_s * 1000)

    def want(self, stream_id: str, everywhere: bool = False) -> None:
        """`everywhere`: a stream every daemon of the fleet wants (one added through the API, kept in Redis: the
        others learn of it within a renew interval); otherwise one this daemon's config file names, which another
        daemon's file may not (its member record says which it wants)."""
        self.wanted.add(stream_id)
        if everywhere:
            self.shared.add(stream_id)
        else:
            self.shared.discard(stream_id)
        self._wake.set()

    def unwant(self, stream_id: str) -> None:
        self.wanted.discard(stream_id)
        self.shared.discard(stream_id)
        self.done.pop(stream_id, None)
        self._not_ended.pop(stream_id, None)
        self._free_since.pop(stream_id, None)

    def owns(self, stream_id: str) -> bool:
        return stream_id in self.leases

    def token(self, stream_id: str) -> str | None:
        lease = self.leases.get(stream_id)
        return lease.token if lease else None

    async def owner(self, stream_id: str) -> str | None:
        return _holder(await self.r.get(lease_key(stream_id)))

    async def owners(self, stream_ids: list[str]) -> list[str | None]:
        """The member holding each stream's lease, read in one round trip (a non-transactional pipeline; a cluster
        client splits it by master)."""
        if not stream_ids:
            return []
        async with self.r.pipeline(transaction=False) as p:
            for sid in stream_ids:
                p.get(lease_key(sid))
            raws = await p.execute()
        return [_holder(raw) for raw in raws]

    # -- the loop -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Heartbeat, renew, place: every `renew_s`, or at once when a stream is wanted. The first placement waits
        one renew interval after the first heartbeat, so daemons started together see each other first."""
        try:
            await self._heartbeat()
        except (RedisError, OSError) as e:
            log.warning("fleet heartbeat failed", error=str(e) or type(e).__name__)
        await asyncio.sleep(self.cfg.renew_s)
        while not self.leaving:  # once the daemon leaves the loop ends by itself (not only when cancelled)
            try:
                await self.tick()
            except (RedisError, OSError) as e:
                log.warning("fleet tick failed", error=str(e) or type(e).__name__)
            try:
                async with asyncio.timeout(self.cfg.renew_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        if self.leaving:
            return  # stopping: the member key is gone and stays gone, nothing is taken again
        async with self._ticking:
            await self._heartbeat()
            if self.duplicate is not None:
                return  # another daemon has this member id: it is the member, this one stands aside
            await self._renew()
            await self._learn_ended()
            await self._place()

    async def place(self, sid: str) -> None:
        """Place one stream now (one set through this daemon's API): take its lease when it is free and this daemon
        is its preferred owner among the members of the last heartbeat; otherwise the fleet's loop places it within
        a renew interval. Unlike a tick, this neither waits for a tick under way (which may be starting or stopping
        streams for seconds, or waiting for a slow Redis) nor holds one up: a tick taking the same lease at the
        same time is settled by Redis (SET NX: one of them gets it), and a lease taken for a stream deleted or
        changed meanwhile is given back before it starts (FleetStreams._acquired). leave() waits for it. Placements at
        once (this, the tick's) count each other's leases being taken (`_taking`): together they never take more
        than fleet.max_streams."""
        if self.leaving or self.duplicate is not None or sid not in self.wanted or sid in self.leases \
                or sid in self.done:
            return
        self._placing += 1  # no await since `leaving` was read: a leave() that begins later waits for this
        self._placed.clear()
        try:
            if not self._room():
                return
            weights = self._weights() or {self.member_id: self.capacity}
            if preferred(sid, self._candidates(sid, weights)) != self.member_id:
                return
            self._taking += 1  # before the first await: a placement at once sees this one's place taken
            reserved = [True]
            try:
                if await self.owner(sid) is None:
                    await self._acquire(sid, reserved)
            finally:
                if reserved[0]:
                    self._taking -= 1
        finally:
            self._placing -= 1
            if not self._placing:
                self._placed.set()

    async def _heartbeat(self) -> None:
        if self.leaving:
            return
        if self.duplicate is not None:  # standing aside: only look, until the other's record is gone
            other = self._other_instance(await self.r.get(fleet_member_key(self.member_id)))
            if other is None:
                log.warning("the other daemon with this fleet.member_id is gone: taking part again",
                            member_id=self.member_id)
                self.duplicate = None
            else:
                await self._read_members(prune=False)  # what the fleet is (GET /api/v1/cluster), without a part in it
                return
        load = self._load()
        rec = {"id": self.member_id, "instance": self.instance, "address": self.address, "version": self.version,
               "capacity": self.capacity,
               "max_streams": self.cfg.max_streams, "wants": sorted(self.wanted - self.shared),
               "streams": sorted(self.leases), "load": load, "heartbeat": time.time(),
               "ended": {sid: tag for sid, tag in sorted(self.done.items()) if sid in self.wanted}}
        async with self.r.pipeline(transaction=False) as p:
            p.set(fleet_member_key(self.member_id), json.dumps(rec), px=self.ttl_ms, get=True)  # the record before
            p.sadd(MEMBERS_KEY, self.member_id)
            before, _ = await p.execute()
        other = self._other_instance(before)
        if other is not None:  # another running daemon's record: put it back, and stand aside
            log.error("another running daemon has this fleet.member_id: this one takes no stream while it runs "
                      "(give each daemon its own fleet.member_id)", member_id=self.member_id,
                      other_instance=other, instance=self.instance)
            await self.r.set(fleet_member_key(self.member_id), before, px=self.ttl_ms)
            self.duplicate = other
            await asyncio.gather(*(self.release(sid, "another daemon has this member id") for sid in list(self.leases)))
            await self._read_members(prune=False)
            return
        await self._read_members()

    async def _read_members(self, prune: bool = True) -> None:
        """The members' records as Redis has them (`prune`: a member whose key expired leaves the set)."""
        ids = sorted(m.decode() for m in await self.r.smembers(MEMBERS_KEY))
        raws = await self.r.mget([fleet_member_key(m) for m in ids]) if ids else []  # one slot
        members = {}
        for m, raw in zip(ids, raws):
            if raw is None:
                if prune:
                    await self.r.srem(MEMBERS_KEY, m)  # its key expired: gone
                continue
            members[m] = json.loads(raw)
        now = time.monotonic()
        self._seen_since = {m: self._seen_since.get(m, now) for m in members}
        self.members = members
        # the config-file streams each member wants (API streams: every member); a member that does not say (an
        # older version) is taken to want every stream
        self._wants = {m: (frozenset(rec["wants"]) if isinstance(rec.get("wants"), list) else None)
                       for m, rec in members.items()}

    def standing_aside(self) -> str | None:
        """Why this daemon takes no part in the fleet now (None: it does)."""
        if self.duplicate is None:
            return None
        return (f"another running daemon (instance {self.duplicate}) has this fleet.member_id "
                f"({self.member_id!r}): this one takes no stream while it runs (give each daemon its own "
                "fleet.member_id)")

    def _other_instance(self, raw: bytes | None) -> str | None:
        """The instance of another running process when `raw` is a member record with this daemon's member id
        written by it (its heartbeat within the lease TTL), else None."""
        if raw is None:
            return None
        rec = json.loads(raw)
        other = rec.get("instance")
        if other is None or other == self.instance or time.time() - float(rec.get("heartbeat") or 0) > \
                self.cfg.lease_ttl_s:
            return None
        return str(other)

    async def _learn_ended(self) -> None:
        """Streams another member says ended (its member record's `ended`) that this daemon wants, holds no lease
        for and has not seen end: ended here too when they ended with this daemon's settings and their end record
        says so (`on_ended`; asked once per stream and settings)."""
        if self._on_ended is None:
            return
        for m, rec in self.members.items():
            ended = rec.get("ended")
            if m == self.member_id or not isinstance(ended, dict):
                continue
            for sid, tag in ended.items():
                if sid not in self.wanted or sid in self.done or sid in self.leases or not isinstance(tag, str) \
                        or self._not_ended.get(sid) == tag:
                    continue
                try:
                    ended = await self._on_ended(sid, tag)
                except (RedisError, OSError) as e:  # asked again next tick
                    log.warning("could not read a stream's end record", stream=sid, error=str(e) or type(e).__name__)
                    continue
                if ended:
                    self.done[sid] = tag
                    self._free_since.pop(sid, None)
                else:
                    self._not_ended[sid] = tag

    async def _renew(self) -> None:
        for sid, lease in list(self.leases.items()):
            try:
                ok = await self.r.eval(_RENEW, 2, lease.key, lease_last_key(sid), lease.token, self.ttl_ms)
            except (RedisError, OSError) as e:
                self._count_renew_failure()
                if time.monotonic() - lease.since > self.cfg.lease_ttl_s:  # it may have expired meanwhile
                    log.warning("lease renewal failing", stream=sid, error=str(e) or type(e).__name__)
                continue
            if ok:
                if ok == 2:
                    log.warning("stream lease taken again (its key had expired; nobody took the stream since)",
                                stream=sid)
                lease.since = time.monotonic()
            else:
                self._count_renew_failure()
                await self._lost(sid, "lease lost (another daemon owns the stream now)")

    def _count_renew_failure(self) -> None:
        if self._metrics is not None:
            self._metrics.lease_renew_failures.inc()

    def _count_change(self, direction: str) -> None:
        if self._metrics is not None:
            self._metrics.ownership_changes.labels(direction).inc()

    async def _lost(self, sid: str, why: str) -> None:
        if self.leases.pop(sid, None) is not None:
            self._count_change("lost")
            log.warning("stream lease lost", stream=sid, why=why)
            await self._on_release(sid, why)

    def fenced(self, sid: str, token: str | None = None) -> None:
        """The result writer found the lease gone: stop the stream here now (called on the loop). `token`: the lease
        the refused result was written under; a refusal of an earlier lease's result (a stream released and taken
        again here) says nothing of the lease held now."""
        lease = self.leases.get(sid)
        if lease is not None and (token is None or token == lease.token):
            asyncio.get_running_loop().create_task(self._lost(sid, "lease lost (a result write was fenced)"))

    def _weights(self) -> dict[str, float]:
        """Placement weights of the members that are alive: heartbeat within three renew intervals (a member that
        stopped renewing is out of placement at once, before its key expires)."""
        now = time.time()
        stale = max(3 * self.cfg.renew_s, 1.0)
        return {m: float(rec.get("capacity") or 1.0) for m, rec in self.members.items()
                if m == self.member_id or now - float(rec.get("heartbeat") or 0) <= stale}

    def wanted_elsewhere(self, sid: str, named: bool = False) -> list[str]:
        """The other live members that want `sid` (their config files name it; a member that does not say which
        streams it wants counts as wanting it, unless `named`: only the members whose record names it)."""
        return sorted(m for m in self._weights() if m != self.member_id
                      and ((wants := self._wants.get(m)) is None and not named or wants is not None and sid in wants))

    def _candidates(self, sid: str, weights: dict[str, float]) -> dict[str, float]:
        """The members among `weights` that want `sid` (a stream in one daemon's config file only is never placed
        on, nor handed to, a daemon that would not run it); this daemon when it wants it."""
        return {m: w for m, w in weights.items()
                if (sid in self.wanted if m == self.member_id
                    else sid in self.shared or (wants := self._wants.get(m)) is None or sid in wants)}

    def _room(self) -> bool:
        """Whether this daemon may take one more lease now (the leases being taken count as taken)."""
        return len(self.leases) + self._taking < self.capacity and not self.overloaded

    async def _place(self) -> None:
        weights = self._weights() or {self.member_id: self.capacity}
        now = time.monotonic()
        unowned = sorted(self.wanted - set(self.leases) - set(self.done))
        for sid, owner in zip(unowned, await self.owners(unowned) if self._room() else []):
            if not self._room():
                break
            if owner is not None:
                self._free_since.pop(sid, None)
                continue
            since = self._free_since.setdefault(sid, now)
            mine = preferred(sid, self._candidates(sid, weights)) == self.member_id
            if mine or now - since >= self.cfg.lease_ttl_s:
                self._taking += 1  # no await since _room(): a place() at once sees this place taken
                reserved = [True]
                try:
                    await self._acquire(sid, reserved)
                finally:
                    if reserved[0]:
                        self._taking -= 1
        await self._rebalance(weights, now)

    async def _acquire(self, sid: str, reserved: list[bool] | None = None) -> None:
        """Take the stream's lease if it is free. `reserved`: the caller counted it in `_taking` ([True]); it is
        set to [False] once the lease is in `leases` (the place is no longer counted twice)."""
        if self.leaving or self.duplicate is not None:
            return
        token = f"{self.member_id}|{secrets.token_hex(8)}"
        previous = await self.r.get(lease_last_key(sid))
        if not await self.r.set(lease_key(sid), token, nx=True, px=self.ttl_ms):
            return
        if self.leaving or self.duplicate is not None:  # leave() began, or this daemon found it has to stand aside,
            # while this was on its way: given back at once, nothing starts (the lease would be nobody's to renew)
            await self.r.eval(_RELEASE, 2, lease_key(sid), lease_last_key(sid), token, f"{self.member_id}|released")
            return
        await self.r.set(lease_last_key(sid), token)  # the lease's token: its member, and which lease it was
        if self.leaving or self.duplicate is not None:  # the same, found while lease:last was written
            await self.r.eval(_RELEASE, 2, lease_key(sid), lease_last_key(sid), token, f"{self.member_id}|released")
            return
        lease = self.leases[sid] = Lease(sid, token)
        if reserved is not None and reserved[0]:
            reserved[0] = False
            self._taking -= 1
        self._free_since.pop(sid, None)
        prev = previous.decode().split("|", 1)[0] if previous else None
        if prev is not None and prev != self.member_id:
            self._count_change("taken")
        log.info("stream lease taken", stream=sid, previous_owner=prev)
        try:
            await self._on_acquire(sid, lease, prev)
        except Exception:
            log.exception("stream could not start after its lease was taken", stream=sid)
            await self.release(sid)

    async def _rebalance(self, weights: dict[str, float], now: float) -> None:
        moves = 0
        for sid in sorted(self.leases):
            if moves >= self.cfg.max_moves:
                return
            if sid not in self.wanted:
                continue
            want = preferred(sid, self._candidates(sid, weights))
            if want is None or want == self.member_id:
                continue
            if now - self._seen_since.get(want, now) < self.cfg.settle_s:
                continue  # a member that just arrived: wait until it has stayed a while
            if not self._has_room(want):
                continue  # handed to a full member, it would wait for one with room: keep it
            moves += 1
            log.info("stream handed over", stream=sid, to=want)
            await self.release(sid, "rebalanced to " + want)

    def _has_room(self, member: str) -> bool:
        """Whether `member`'s last heartbeat says it can take one more stream (fleet.max_streams, load limits)."""
        rec = self.members.get(member) or {}
        if (rec.get("load") or {}).get("overloaded"):
            return False
        limit = rec.get("max_streams")
        return limit is None or len(rec.get("streams") or []) < limit

    async def release(self, sid: str, why: str = "released") -> None:
        lease = self.leases.pop(sid, None)
        if lease is None:
            return
        await self._on_release(sid, why)
        try:
            await self.r.eval(_RELEASE, 2, lease.key, lease_last_key(sid), lease.token,
                              f"{self.member_id}|released")
        except (RedisError, OSError) as e:  # it expires by itself
            log.warning("lease not released", stream=sid, error=str(e) or type(e).__name__)

    async def finish(self, sid: str, tag: str) -> None:
        """The stream ended for good while this daemon held its lease, and its end is recorded: the lease goes (it
        holds no capacity any more: `fleet.max_streams`, admission), the stream stays wanted and shown ended here,
        and no member takes it again (`done`, said in the member record; a member that did not hear of it and
        takes the lease finds the end record and gives the lease back). Its runner stays."""
        lease = self.leases.pop(sid, None)
        if lease is None:
            return
        self.done[sid] = tag
        self._free_since.pop(sid, None)
        self._wake.set()  # the next heartbeat tells the others now
        log.info("stream ended for good: its lease is released", stream=sid)
        try:
            await self.r.eval(_RELEASE, 2, lease.key, lease_last_key(sid), lease.token,
                              f"{self.member_id}|released")
        except (RedisError, OSError) as e:  # it expires by itself
            log.warning("lease not released", stream=sid, error=str(e) or type(e).__name__)

    async def leave(self) -> None:
        """Graceful stop: every stream stopped and its lease released, all at once (the others take over within a
        renew interval). This daemon's member key goes first, and from here on it takes no lease and sends no
        heartbeat, so the streams it releases are not taken back while it drains (nor held for it by the others'
        placement, which counted it a live member)."""
        self.leaving = True
        self._wake.set()
        await self._forget_member()
        async with self._ticking:  # a tick under way (it may be taking a lease) ends first, and every placement
            await self._placed.wait()  # under way (place()): then every lease goes
            await asyncio.gather(*(self.release(sid, "daemon stopping") for sid in list(self.leases)))
        await self._forget_member()  # again, in case a heartbeat under way when leave() began wrote it back

    async def _forget_member(self) -> None:
        if self.duplicate is not None:
            return  # the member record is the other daemon's
        try:
            await self.r.delete(fleet_member_key(self.member_id))
            await self.r.srem(MEMBERS_KEY, self.member_id)
        except (RedisError, OSError):
            pass

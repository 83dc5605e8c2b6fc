"""streamd against a real Redis Cluster (3 masters started here: redis-server --cluster-enabled yes, joined by
redis-cli --cluster create): the sink, Redis frame inputs, fleet leases and prompts, each with keys spread over
every master, and every multi-key operation within one slot (Redis refuses the others with CROSSSLOT)."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from streamd import keys
from streamd.config import FleetConfig, RedisConfig, StreamConfig
from streamd.fleet import Fleet, Lease, lease_key
from streamd.frames import Frame, InputRef, Work
from streamd.metrics import Metrics
from streamd.prompts import PromptCache, PromptStore
from streamd.redis_clients import is_cluster, redis_client
from streamd.sampling import FpsSampler
from streamd.sinks.redis import RedisSink
from streamd.testing.cluster import ManagedRedisCluster
from conftest import until

IMG = np.zeros((4, 6, 3), np.uint8)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> ManagedRedisCluster:
    c = ManagedRedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture
async def rc(cluster: ManagedRedisCluster) -> AsyncIterator[Any]:
    client = redis_client(cluster.url, cluster=True)
    assert is_cluster(client)
    yield client
    await client.aclose()


def spread(cluster: ManagedRedisCluster, prefix: str, n: int, key: Callable[[str], str] = keys.results_key
           ) -> list[str]:
    """`n` stream ids (at least 3) whose keys fall on every master."""
    ids, ports = [], set()
    for i in itertools.count():
        sid = f"{prefix}-{i}"
        port = cluster.port_for(key(sid))
        if len(ids) < n and (port not in ports or len(ports) == len(cluster.ports)):
            ids.append(sid)
            ports.add(port)
        if len(ids) == n and len(ports) == len(cluster.ports):
            return ids
        assert i < 10_000


async def on_node(cluster: ManagedRedisCluster, key: str, *cmd: Any) -> Any:
    """A command sent to the master that serves `key`, with a plain client (no redirection followed)."""
    node = aioredis.Redis(host="127.0.0.1", port=cluster.port_for(key))
    try:
        return await node.execute_command(*cmd)
    finally:
        await node.aclose()


def work(sid: str, seq: int, ref: InputRef | None = None) -> Work:
    return Work(Frame(sid, seq, seq / 10, time.time(), IMG, ref=ref))


@pytest.fixture
async def sink_on(rc: Any) -> AsyncIterator[Callable[..., RedisSink]]:
    made: list[tuple[RedisSink, asyncio.Task]] = []

    def make(client: Any = None, **cfg: Any) -> RedisSink:
        sink = RedisSink(client or rc, RedisConfig(url="redis://unused", **cfg), Metrics())
        made.append((sink, asyncio.ensure_future(sink.run())))
        return sink

    yield make
    for sink, task in made:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.aclose()


def test_keys_that_go_together_share_one_slot():
    for sid in ("cam-1", "a.b:c_d", "x" * 128):
        assert keys.same_slot(keys.results_key(sid), keys.events_key(sid), keys.vlm_key(sid), keys.lease_key(sid),
                              keys.lease_last_key(sid))
    members = [keys.fleet_member_key(m) for m in ("host-1", "host-2", "pod-abc-123", "z")]
    assert keys.same_slot(keys.FLEET_MEMBERS_KEY, *members)
    for pid in ("vlm|global", "vocabulary|stream:cam-1", "vlm|pipeline:p"):
        assert keys.same_slot(*keys.prompt_keys(pid))
    # an input key tagged with the stream id is in its results' slot, and so is its dead-letter stream
    assert keys.same_slot("frames:{cam-1}", keys.dead_letter_key("frames:{cam-1}"), keys.results_key("cam-1"))
    assert not keys.same_slot("frames:cam-1", keys.results_key("cam-1"))


async def test_the_sink_writes_each_streams_records_on_the_master_of_its_slot(cluster, rc, sink_on):
    sids = spread(cluster, "sink", 6)
    sink = sink_on(publish_batch=16)
    for seq in range(5):  # interleaved: every batch spans several slots and every master
        await sink.publish_results([work(sid, seq) for sid in sids])
    for sid in sids:
        sink.event(sid, "state", {"to": "running"})
        sink.record(keys.vlm_key(sid), 100, {"stream_id": sid, "answer": "ok"})
    await asyncio.wait_for(sink.wait_idle(), 10)
    for sid in sids:
        entries = await on_node(cluster, keys.results_key(sid), "XRANGE", keys.results_key(sid), "-", "+")
        recs = [json.loads(f[b"record"]) for _, f in entries]
        assert [x["seq"] for x in recs] == list(range(5)), sid
        assert {x["stream_id"] for x in recs} == {sid}
        assert await on_node(cluster, keys.events_key(sid), "XLEN", keys.events_key(sid)) == 1
        assert await on_node(cluster, keys.vlm_key(sid), "XLEN", keys.vlm_key(sid)) == 1
    assert {cluster.port_for(keys.results_key(s)) for s in sids} == set(cluster.ports)
    assert sink.results_by_stream == {sid: 5 for sid in sids}
    assert sink.published == 6 * 5 + 6 * 2 and sink.healthy


async def pending_ids(client: Any, key: str, group: str = "g") -> list[str]:
    return [p["message_id"].decode() for p in await client.xpending_range(key, group, "-", "+", 100)]


async def test_an_input_entry_is_acked_with_its_result_in_one_slot_and_after_it_across_slots(cluster, rc,
                                                                                            sink_on):
    sid = "acks"
    tagged = f"frames:{{{sid}}}"  # in the results' slot: XADD + XACK in one MULTI/EXEC
    untagged = next(k for k in (f"frames:{sid}:{i}" for i in itertools.count())
                    if cluster.port_for(k) != cluster.port_for(keys.results_key(sid)))  # on another master
    assert keys.same_slot(tagged, keys.results_key(sid)) and not keys.same_slot(untagged, keys.results_key(sid))
    ids: dict[str, list[str]] = {}
    for key in (tagged, untagged):
        await rc.delete(key)
        ids[key] = [(await rc.xadd(key, {"n": i})).decode() for i in range(3)]
        await rc.xgroup_create(key, "g", id="0")
        await rc.xreadgroup("g", "c", {key: ">"})  # all three pending for consumer c
    sink = sink_on(publish_batch=8)
    works = [work(sid, 2 * i + j, InputRef(key, "g", ids[key][i])) for i in range(2)
             for j, key in enumerate((tagged, untagged))]
    await sink.publish_results(works)
    await asyncio.wait_for(sink.wait_idle(), 10)
    for key in (tagged, untagged):  # the entry without a result is the only one still pending
        assert await pending_ids(rc, key) == [ids[key][2]], key
    recs = [json.loads(f[b"record"]) for _, f in await rc.xrange(keys.results_key(sid))]
    assert [(x["input"]["key"], x["input"]["entry_id"]) for x in recs] == [
        (w.frame.ref.key, w.frame.ref.entry_id) for w in works]
    assert sink.results_by_stream == {sid: 4}


async def test_a_redis_input_on_the_cluster_results_out_every_entry_acked_poison_dead_lettered(cluster, rc, sink_on):
    """Frames pushed into input keys (one tagged with its stream id, one not, on different masters) are read
    through the consumer group and written as results; every entry ends acknowledged, nothing pending; an
    undecodable entry goes to `<key>:dead` and is acknowledged too."""
    from streamd.sources.base import Settlement
    from streamd.sources.redis import RedisFrameSource

    sink = sink_on(publish_batch=4)
    plain = next(k for k in (f"frames:in-plain-{i}" for i in itertools.count())
                 if cluster.port_for(k) not in (cluster.port_for("frames:{in-tagged}"),
                                                cluster.port_for(keys.results_key("in-plain"))))
    inputs = {"in-tagged": "frames:{in-tagged}", "in-plain": plain}
    # the tagged key's dead letters and results share its slot; the plain key's are elsewhere (acked after)
    assert keys.same_slot(inputs["in-tagged"], keys.dead_letter_key(inputs["in-tagged"]), keys.results_key("in-tagged"))
    assert not keys.same_slot(plain, keys.dead_letter_key(plain)) and not keys.same_slot(plain, keys.results_key("in-plain"))
    sources, pushed = [], {}
    for sid, key in inputs.items():
        await rc.delete(key, keys.dead_letter_key(key), keys.results_key(sid))
        good = [(await rc.xadd(key, {"image": IMG.tobytes(), "shape": "4,6,3", "n": str(i)})).decode()
                for i in range(3)]
        poison = (await rc.xadd(key, {"image": b"not an image"})).decode()
        good += [(await rc.xadd(key, {"image": IMG.tobytes(), "shape": "4,6,3", "n": str(i)})).decode()
                 for i in range(3, 6)]
        pushed[sid] = (good, poison)
        cfg = StreamConfig(id=sid, url=f"{cluster.url}#{key}", fps=None, redis_input={"max_deliveries": 1})
        sources.append(RedisFrameSource(cfg, rc, key, FpsSampler(None), itertools.count(), "c1", Settlement(),
                                        lambda kind, fields: None))

    async def pump(src: RedisFrameSource, n: int) -> None:
        for _ in range(n):
            frame = await anext(src)
            await sink.publish_results([Work(frame)])

    await asyncio.wait_for(asyncio.gather(*(pump(s, 6) for s in sources)), 20)
    await asyncio.wait_for(sink.wait_idle(), 10)
    for src in sources:
        await src.aclose()
    for sid, key in inputs.items():
        good, poison = pushed[sid]
        recs = [json.loads(f[b"record"]) for _, f in await rc.xrange(keys.results_key(sid))]
        assert [x["input"]["entry_id"] for x in recs] == good, sid
        assert (await rc.xpending(key, "streamd"))["pending"] == 0, key
        dead = await rc.xrange(keys.dead_letter_key(key))
        assert [(f[b"dead.entry_id"].decode(), f[b"dead.stream_id"].decode()) for _, f in dead] == [(poison, sid)]


def fleet_cfg(member: str, settle_s: float) -> FleetConfig:
    return FleetConfig(enabled=True, member_id=member, lease_ttl_s=2, renew_s=0.25, settle_s=settle_s, max_moves=100)


class Member:
    """A Fleet with its own cluster client, and what it started and stopped."""

    def __init__(self, cluster: ManagedRedisCluster, name: str, settle_s: float = 0.0):
        self.client = redis_client(cluster.url, 8, cluster=True)
        self.running: set[str] = set()
        self.taken_at: dict[str, float] = {}
        self.fleet = Fleet(self.client, fleet_cfg(name, settle_s), None, "test", self._acquire, self._release, lambda: {})
        self.task: asyncio.Task | None = None
        self.closed = False

    async def _acquire(self, sid: str, lease: Lease, previous: str | None) -> None:
        self.running.add(sid)
        self.taken_at[sid] = time.monotonic()

    async def _release(self, sid: str, why: str) -> None:
        self.running.discard(sid)

    def start(self, sids: list[str]) -> "Member":
        for sid in sids:
            self.fleet.want(sid)
        self.task = asyncio.ensure_future(self.fleet.run())
        return self

    async def crash(self) -> None:
        """Stop renewing without a word (a kill -9 as Redis sees it): the leases stay until they expire."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def close(self, leave: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None and not self.task.done():
            await self.crash()
        if leave:
            await self.fleet.leave()
        await self.client.aclose()


async def lease_owners(rc: Any, sids: list[str]) -> dict[str, str | None]:
    out = {}
    for sid in sids:
        raw = await rc.get(lease_key(sid))
        out[sid] = raw.decode().split("|", 1)[0] if raw else None
    return out


async def test_two_fleet_members_place_streams_once_each_and_a_released_lease_moves(cluster, rc):
    sids = spread(cluster, "placed", 8, key=keys.lease_key)
    a, b = Member(cluster, "member-a"), Member(cluster, "member-b")
    try:
        a.start(sids)
        b.start(sids)

        async def placed() -> bool:
            owners = await lease_owners(rc, sids)
            return (None not in owners.values() and a.running | b.running == set(sids)
                    and {s for s, m in owners.items() if m == "member-a"} == a.running)

        await until(placed, 10, what="every stream placed")
        assert not a.running & b.running  # one owner each
        assert a.running and b.running  # both got a share (weighted rendezvous over both members)
        # each member read both records in one MGET of the {fleet} slot
        assert set(a.fleet.members) == set(b.fleet.members) == {"member-a", "member-b"}
        moved = sorted(a.running)
        t0 = time.monotonic()
        await a.close()  # graceful: its leases released at once, its member record gone
        await until(lambda: b.running == set(sids), 5, what="member-b to take member-a's streams")
        took_s = max(b.taken_at[s] for s in moved) - t0
        print(f"released leases taken over after {took_s:.2f} s (renew_s 0.25)")
        assert took_s < 2.0  # within a few renew intervals, well before a lease TTL
        assert set((await lease_owners(rc, sids)).values()) == {"member-b"}
    finally:
        await a.close()
        await b.close()


async def test_an_expired_lease_moves_and_the_old_owners_fenced_write_is_refused(cluster, rc, sink_on):
    sids = spread(cluster, "expired", 4, key=keys.lease_key)
    a = Member(cluster, "crashing-a", settle_s=60).start(sids)  # no rebalancing within the test
    b = None
    try:
        await until(lambda: a.running == set(sids), 10, what="member-a to own every stream")
        b = Member(cluster, "member-b2", settle_s=60).start(sids)
        await asyncio.sleep(0.5)  # b sees a's leases held: it takes nothing
        assert not b.running
        stale = {sid: a.fleet.token(sid) for sid in sids}
        t0 = time.monotonic()
        await a.crash()
        await until(lambda: b.running == set(sids), 10, what="member-b to take the expired leases")
        took_s = max(b.taken_at.values()) - t0
        print(f"expired leases taken over after {took_s:.2f} s (lease_ttl_s 2, renew_s 0.25)")
        assert 1.0 < took_s < 2.0 + 2.0  # not before the TTL ran out (about), within TTL + a few renewals
        # the crashed owner's sink still holds its old tokens: every write refused; the new owner's are written
        old_sink, new_sink = sink_on(), sink_on()
        fenced: list[str] = []
        old_sink.fence_for, old_sink.on_fenced = (lambda s: (lease_key(s), stale[s])), (lambda s, _t: fenced.append(s))
        new_sink.fence_for = lambda s: (lease_key(s), b.fleet.token(s))
        await rc.delete(*(keys.events_key(sid) for sid in sids), *(keys.stream_ended_key(sid) for sid in sids))
        await old_sink.publish_results([work(sid, 100) for sid in sids])
        await new_sink.publish_results([work(sid, 101) for sid in sids])
        written: list[str] = []
        for sid in sids:  # events and end records are fenced alike (one Lua call each, in the stream's slot)
            old_sink.event(sid, "state", {"to": "stopped"}, (lease_key(sid), stale[sid]))
            old_sink.set_after(sid, keys.stream_ended_key(sid), "old", (lease_key(sid), stale[sid]),
                               lambda sid=sid: written.append("old " + sid))
            new_sink.event(sid, "state", {"to": "live"}, (lease_key(sid), b.fleet.token(sid)))
            new_sink.set_after(sid, keys.stream_ended_key(sid), "new", (lease_key(sid), b.fleet.token(sid)),
                               lambda sid=sid: written.append("new " + sid))
        await asyncio.wait_for(old_sink.wait_idle(), 10)
        await asyncio.wait_for(new_sink.wait_idle(), 10)
        for sid in sids:
            seqs = [int(f[b"seq"]) for _, f in await rc.xrange(keys.results_key(sid))]
            assert seqs == [101], sid
            assert [f[b"type"] for _, f in await rc.xrange(keys.events_key(sid))] == [b"state"], sid
            assert await rc.get(keys.stream_ended_key(sid)) == b"new", sid
        assert sorted(written) == sorted("new " + sid for sid in sids)
        assert sorted(fenced) == sorted(sids * 3) and old_sink.fenced == 3 * len(sids) and new_sink.fenced == 0
    finally:
        await a.close(leave=False)
        if b is not None:
            await b.close()


async def node_stats(nodes: list[aioredis.Redis]) -> tuple[int, int]:
    """Summed over `nodes`: reads the servers made from their clients' sockets (one per round trip a client makes;
    each INFO here is one too) and GET commands run."""
    reads = gets = 0
    for node in nodes:
        info = await node.info("stats", "commandstats")
        reads += int(info["total_reads_processed"])
        gets += int((info.get("cmdstat_get") or {}).get("calls", 0))
    return reads, gets


@pytest.mark.parametrize("where", ["single", "cluster"])
async def test_placement_reads_the_leases_of_every_unowned_stream_in_one_round_trip(request, where):
    """A Fleet that wants 30 streams whose leases another member holds: one tick reads the 30 leases (30 GETs) in one
    pipelined round trip (one per master on a cluster), not one round trip each, and takes none of them; with 10 of
    those leases gone, the next tick takes exactly those 10."""
    if where == "single":
        server = request.getfixturevalue("redis_server")
        url, ports, on_cluster = server.url, [server.port], False
    else:
        cl = request.getfixturevalue("cluster")
        url, ports, on_cluster = cl.url, cl.ports, True
    client = redis_client(url, cluster=on_cluster)
    nodes = [aioredis.Redis(host="127.0.0.1", port=port) for port in ports]
    taken: list[str] = []

    async def acquired(sid: str, lease: Lease, previous: str | None) -> None:
        taken.append(sid)

    async def released(sid: str, why: str) -> None:
        pass

    fleet = Fleet(client, fleet_cfg(f"placer-{where}", 0.0), None, "test", acquired, released, lambda: {})
    sids = [f"round-trips-{where}-{i}" for i in range(30)]
    try:
        for sid in sids:
            await client.set(lease_key(sid), "other|t", px=60_000)
            await client.delete(keys.lease_last_key(sid))
            fleet.want(sid)
        await fleet.tick()  # connections made, the cluster's slots learnt
        reads0, gets0 = await node_stats(nodes)
        await fleet.tick()
        reads1, gets1 = await node_stats(nodes)
        reads, gets = reads1 - reads0, gets1 - gets0
        print(f"{where}: one tick, 30 streams leased elsewhere: {gets} GETs in {reads} socket reads")
        assert gets == 30 and not taken and not fleet.leases
        # heartbeat (a pipeline, SMEMBERS, MGET), the lease reads (one per master), INFO (one per master)
        assert reads <= 3 + 2 * len(ports) + 2, reads
        await client.delete(*(lease_key(s) for s in sids[:10]))  # a cluster client splits it by slot
        await fleet.tick()
        assert sorted(taken) == sorted(sids[:10]) and set(fleet.leases) == set(sids[:10])
    finally:
        await fleet.leave()
        await client.delete(*(lease_key(s) for s in sids), *(keys.lease_last_key(s) for s in sids))
        for node in nodes:
            await node.aclose()
        await client.aclose()


async def test_prompts_are_versioned_and_announced_on_the_cluster(cluster, rc):
    store = PromptStore(rc)
    cache_client = redis_client(cluster.url, 4, cluster=True)
    cache = PromptCache(PromptStore(cache_client), refresh_s=600)  # only pub/sub can bring a change in time
    task = asyncio.ensure_future(cache.run())
    scopes = [f"stream:{sid}" for sid in spread(cluster, "prompted", 3, key=lambda s: keys.prompt_keys(
        f"vlm|stream:{s}")[0])]
    try:
        for scope in scopes:
            await rc.delete(*keys.prompt_keys(f"vlm|{scope}"))
        await asyncio.wait_for(cache.loaded.wait(), 10)
        for scope in scopes:
            v1 = await store.put("vlm", scope, {"text": "one"}, author="t")
            v2 = await store.put("vlm", scope, {"text": "two"}, author="t", if_match=[v1["version"]])
            assert (v1["version"], v2["version"]) == (1, 2)
        for scope in scopes:
            sid = scope.split(":", 1)[1]
            await until(lambda: (cache.resolve("vlm", sid, "p") or {}).get("text") == "two", 5,
                        what=f"the cache to see {scope} v2")
        total, page = await store.history("vlm", scopes[0])
        assert total == 2 and [x["text"] for x in page] == ["two", "one"]
    finally:
        cache.stop()
        await asyncio.wait_for(task, 5)
        await cache_client.aclose()


async def test_a_master_down_and_back_every_record_written_once_in_order(tmp_path, sink_on):
    """A master is killed between two batches and started again: records for the other masters are written while
    it is down (or the whole cluster refuses once it marks the master failed), its own once it is back; a retried
    batch never writes again what already reached a master (no duplicate, no gap, order kept)."""
    with ManagedRedisCluster(tmp_path / "cluster", durable=True) as c:
        client = redis_client(c.url, cluster=True)
        try:
            sids = spread(c, "outage", 6)
            sink = sink_on(client, publish_batch=8, retry_initial_s=0.05, retry_max_s=0.3)
            await sink.publish_results([work(sid, seq) for seq in range(5) for sid in sids])
            await asyncio.wait_for(sink.wait_idle(), 10)
            down = c.ports.index(c.port_for(keys.results_key(sids[0])))
            c.nodes[down].stop(kill=True)
            await sink.publish_results([work(sid, seq) for seq in range(5, 10) for sid in sids])
            await until(lambda: not sink.healthy, 10, what="the sink to meet the dead master")
            await asyncio.to_thread(c.restart_node, down)
            t0 = time.monotonic()
            await until(lambda: sink.healthy and len(sink) == 0, 30, what="the buffer flushed")
            print(f"buffer flushed {time.monotonic() - t0:.2f} s after the master was back")
            for sid in sids:
                seqs = [int(f[b"seq"]) for _, f in await client.xrange(keys.results_key(sid))]
                assert seqs == list(range(10)), (sid, seqs)
            assert sink.results_by_stream == {sid: 10 for sid in sids}
        finally:
            await client.aclose()


# -- whole daemons with redis.cluster: true ---------------------------------------------------------------------
def cluster_cfg(cluster: ManagedRedisCluster, streams: list[dict[str, Any]], **extra: Any) -> Any:
    from conftest import make_config

    redis = {"url": cluster.url, "cluster": True, "retry_initial_s": 0.05, "retry_max_s": 0.5,
             **extra.pop("redis", {})}
    return make_config(cluster.url, streams, redis=redis, **extra)


async def test_two_daemons_on_the_cluster_share_redis_inputs_and_ack_every_entry(cluster, rc):
    """Two daemons (redis.cluster: true) read two frame keys through one consumer group each: one key tagged with
    its stream id (result and XACK in one Lua call), one not (XACK after the result); every entry gets exactly one
    result and none stays pending."""
    from streamd.testing.daemon import running

    plain = next(k for k in (f"frames:dm-plain-{i}" for i in itertools.count())
                 if cluster.port_for(k) != cluster.port_for(keys.results_key("dm-plain")))
    inputs = {"dm-tagged": "frames:{dm-tagged}", "dm-plain": plain}
    for sid, key in inputs.items():
        await rc.delete(key, keys.results_key(sid), keys.events_key(sid))
    streams = [{"id": sid, "url": f"{cluster.url}#{key}", "fps": None} for sid, key in inputs.items()]
    pushed: dict[str, list[str]] = {sid: [] for sid in inputs}
    async with running(cluster_cfg(cluster, streams, redis={"consumer": "a"})) as da, \
            running(cluster_cfg(cluster, streams, redis={"consumer": "b"})) as db:
        for i in range(20):
            for sid, key in inputs.items():
                pushed[sid].append((await rc.xadd(key, {"image": IMG.tobytes(), "shape": "4,6,3"})).decode())

        async def done() -> bool:
            for sid, key in inputs.items():
                if await rc.xlen(keys.results_key(sid)) < 20 or (await rc.xpending(key, "streamd"))["pending"]:
                    return False
            return True

        await until(done, 30, what="20 results per input, nothing pending")
        await asyncio.sleep(0.5)
        for sid in inputs:
            recs = [json.loads(f[b"record"]) for _, f in await rc.xrange(keys.results_key(sid))]
            assert sorted(x["input"]["entry_id"] for x in recs) == sorted(pushed[sid]), sid  # each once
        assert da.sink.healthy and db.sink.healthy


async def test_a_fleet_of_two_daemons_on_the_cluster_runs_each_stream_once_and_hands_over(cluster, rc, clip):
    """Two daemons in fleet mode on the cluster, 4 looping file streams: each stream runs on exactly one daemon and
    its results come from that one only, no duplicate seq; the first daemon stops and the other takes every
    stream over."""
    from streamd.testing.daemon import running

    sids = spread(cluster, "fleet-cam", 4, key=keys.lease_key)
    for sid in sids:
        await rc.delete(keys.results_key(sid), keys.events_key(sid), keys.lease_key(sid), keys.lease_last_key(sid))
    streams = [{"id": sid, "url": str(clip), "playback": "realtime", "loop": True, "fps": 4} for sid in sids]

    def cfg(name: str) -> Any:
        return cluster_cfg(cluster, streams, fleet={"enabled": True, "member_id": name, "lease_ttl_s": 3,
                                                    "renew_s": 0.5, "settle_s": 60})

    cx, cy = running(cfg("dx")), running(cfg("dy"))
    dx = await cx.__aenter__()
    x_open = True
    try:
        async with cy as dy:
            def placed() -> bool:
                x, y = set(dx.streams.runners), set(dy.streams.runners)
                return x | y == set(sids) and not x & y

            await until(placed, 15, what="every stream on one daemon")
            await until(lambda: all(dx.sink.results_by_stream.get(s, 0) + dy.sink.results_by_stream.get(s, 0) >= 3
                                    for s in sids), 15, what="results from every stream")
            where = {s: ("dx" if s in dx.streams.runners else "dy") for s in sids}
            for sid in sids:
                recs = [json.loads(f[b"record"]) for _, f in await rc.xrange(keys.results_key(sid))]
                assert {x["daemon"] for x in recs} == {where[sid]}, sid
                seqs = [x["seq"] for x in recs]
                assert len(seqs) == len(set(seqs)), sid
            t0 = time.time()
            x_open = False
            await cx.__aexit__(None, None, None)  # graceful: its leases released, the other takes over
            await until(lambda: set(dy.streams.runners) == set(sids), 10, what="dy to run every stream")

            async def all_from_dy_after() -> bool:
                for sid in sids:
                    last = await rc.xrevrange(keys.results_key(sid), count=1)
                    if not last or json.loads(last[0][1][b"record"])["daemon"] != "dy" \
                            or json.loads(last[0][1][b"record"])["publish_ts"] < t0:
                        return False
                return True

            await until(all_from_dy_after, 10, what="new results of every stream from dy")
            for sid in sids:
                seqs = [json.loads(f[b"record"])["seq"] for _, f in await rc.xrange(keys.results_key(sid))]
                assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), sid
    finally:
        if x_open:
            await cx.__aexit__(None, None, None)


async def test_an_input_key_that_is_no_longer_a_stream_does_not_stall_the_sink(cluster, rc, sink_on):
    """An input key replaced by a string while its entries' results waited (XACK answers WRONGTYPE): each result is
    written once, the sink stays healthy and goes on (the error is not retried for ever, holding every stream's
    records back and writing the same results again and again)."""
    sid = "wrongtype"
    tagged = f"frames:{{{sid}}}"  # acknowledged in the Lua call of its result
    untagged = next(k for k in (f"frames:{sid}:{i}" for i in itertools.count())
                    if not keys.same_slot(k, keys.results_key(sid)))  # acknowledged after it
    await rc.delete(keys.results_key(sid))
    refs = []
    for key in (tagged, untagged):
        await rc.delete(key)
        eid = (await rc.xadd(key, {"n": 1})).decode()
        await rc.xgroup_create(key, "g", id="0")
        await rc.xreadgroup("g", "c", {key: ">"})
        await rc.delete(key)
        await rc.set(key, "not a stream any more")
        refs.append(InputRef(key, "g", eid))
    sink = sink_on(retry_initial_s=0.05)
    await sink.publish_results([work(sid, i, ref) for i, ref in enumerate(refs)])
    await asyncio.wait_for(sink.wait_idle(), 5)
    await sink.publish_results([work(sid, 2)])
    await asyncio.wait_for(sink.wait_idle(), 5)
    seqs = [int(f[b"seq"]) for _, f in await rc.xrange(keys.results_key(sid))]
    assert seqs == [0, 1, 2] and sink.healthy


async def test_on_a_single_redis_too_an_input_key_that_is_no_longer_a_stream_does_not_stall_the_sink(r, redis_server):
    """The same on a single Redis (XACK in the MULTI/EXEC of its result answers WRONGTYPE inside EXEC)."""
    sid = "wrongtype-single"
    await r.delete("frames:wt", keys.results_key(sid))
    eid = (await r.xadd("frames:wt", {"n": 1})).decode()
    await r.xgroup_create("frames:wt", "g", id="0")
    await r.xreadgroup("g", "c", {"frames:wt": ">"})
    await r.delete("frames:wt")
    await r.set("frames:wt", "not a stream any more")
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=2)
    sink = RedisSink(client, RedisConfig(url=redis_server.url, retry_initial_s=0.05), Metrics())
    task = asyncio.ensure_future(sink.run())
    try:
        await sink.publish_results([work(sid, 0, InputRef("frames:wt", "g", eid))])
        await asyncio.wait_for(sink.wait_idle(), 5)
        await sink.publish_results([work(sid, 1)])
        await asyncio.wait_for(sink.wait_idle(), 5)
        seqs = [int(f[b"seq"]) for _, f in await r.xrange(keys.results_key(sid))]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.aclose()
        await client.aclose()
    assert seqs == [0, 1] and sink.healthy


@pytest.mark.parametrize("how", ["config", "flag"])
async def test_streamd_tail_follows_streams_whose_keys_are_on_different_slots(cluster, rc, tmp_path, how):
    """`streamd tail` with `-c` (a config with redis.cluster: true) or `--cluster`: one XREAD per slot (a stream's
    results and events together), so two streams on different masters both come out, results and events."""
    sids = spread(cluster, f"tail-{how}", 3)[:2]
    assert not keys.same_slot(*(keys.results_key(s) for s in sids))
    assert cluster.port_for(keys.results_key(sids[0])) != cluster.port_for(keys.results_key(sids[1]))
    for sid in sids:
        await rc.delete(keys.results_key(sid), keys.events_key(sid))
        for seq in range(2):
            await rc.xadd(keys.results_key(sid), {"record": json.dumps({"stream_id": sid, "seq": seq})})
        await rc.xadd(keys.events_key(sid), {"event": json.dumps({"stream_id": sid, "type": "started"})})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"redis:\n  url: {cluster.url}\n  cluster: true\n")
    where = ["-c", str(cfg)] if how == "config" else ["--redis", cluster.url, "--cluster"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "tail", *sids, *where, "--both", "--json", "--from-start", "-n", "6",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out.decode().splitlines()]
    got = sorted((x["stream_id"], x["kind"], x.get("seq", x.get("type"))) for x in lines)
    assert got == sorted([(sid, "results", seq) for sid in sids for seq in range(2)]
                         + [(sid, "events", "started") for sid in sids])

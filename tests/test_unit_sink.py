"""RedisSink on its own (no daemon) against a real redis-server: batches, an input's acknowledgement in the
MULTI/EXEC of its result, and the outage buffer (results dropped before events, a `records_dropped` event once
Redis is back)."""

import asyncio
import itertools
import json
import time

import numpy as np
import pytest
import redis.asyncio as aioredis

from streamd import keys
from streamd.config import RedisConfig
from streamd.frames import Frame, InputRef, Work
from streamd.metrics import Metrics
from streamd.sinks.redis import RedisSink
from streamd.testing.servers import ManagedRedis
from conftest import events, results, until

IMG = np.zeros((4, 6, 3), np.uint8)


class Settled(list):
    """An input's settlement handle that records what the sink settled (InputRef.handle)."""

    def settled(self, ref: InputRef) -> None:
        self.append(ref)


def work(sid: str, seq: int, ref: InputRef | None = None) -> Work:
    return Work(Frame(sid, seq, seq / 10, time.time(), IMG, ref=ref))


@pytest.fixture
async def sink_for():
    """sink_for(url, **cfg) -> a running RedisSink; closed (and its client too) after the test."""
    made: list[tuple[RedisSink, asyncio.Task, aioredis.Redis]] = []

    def make(url: str, **cfg) -> RedisSink:
        client = aioredis.Redis.from_url(url, socket_timeout=2)
        sink = RedisSink(client, RedisConfig(url=url, **cfg), Metrics())
        made.append((sink, asyncio.ensure_future(sink.run()), client))
        return sink

    yield make
    for sink, task, client in made:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.aclose()
        await client.aclose()


async def test_buffered_results_go_in_batches_of_publish_batch(r, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    sink = RedisSink(client, RedisConfig(url=redis_server.url, publish_batch=4), Metrics())
    try:
        await sink.publish_results([work("b", i) for i in range(10)])  # buffered before the publisher runs
        assert len(sink) == 10
        task = asyncio.ensure_future(sink.run())
        await asyncio.wait_for(sink.wait_idle(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await sink.aclose()
        await client.aclose()
    recs = await results(r, "b")
    assert [x["seq"] for x in recs] == list(range(10))
    # a batch is stamped once when it is sent: 4, 4, then the last 2
    assert [len(list(g)) for _, g in itertools.groupby(x["publish_ts"] for x in recs)] == [4, 4, 2]
    assert sink.published == 10 and sink.results_by_stream == {"b": 10}


async def test_an_input_is_acknowledged_with_its_result_and_only_then(r, redis_server, sink_for):
    ids = [await r.xadd("frames:in", {"n": i}) for i in range(3)]
    await r.xgroup_create("frames:in", "g", id="0")
    await r.xreadgroup("g", "c", {"frames:in": ">"})  # all three now pending for consumer c
    settled = Settled()
    sink = sink_for(redis_server.url)
    refs = [InputRef("frames:in", "g", i.decode(), handle=settled) for i in ids]
    await sink.publish_results([work("in", 0, refs[0]), work("in", 1, refs[1])])
    await asyncio.wait_for(sink.wait_idle(), 5)
    pending = await r.xpending_range("frames:in", "g", "-", "+", 10)
    assert [p["message_id"] for p in pending] == [ids[2]]  # the one without a result is still pending
    assert settled == refs[:2]
    recs = await results(r, "in")
    assert [x["input"] for x in recs] == [{"key": "frames:in", "entry_id": refs[i].entry_id, "deliveries": 1}
                                          for i in range(2)]


async def test_a_full_outage_buffer_drops_results_first_then_reports_the_loss(tmp_path, sink_for):
    srv = ManagedRedis(tmp_path / "redis", durable=True).start()  # what was written before the kill stays
    r = aioredis.Redis.from_url(srv.url)
    try:
        settled = Settled()
        sink = sink_for(srv.url, buffer_max_records=10, events_reserved=0.5,
                        retry_initial_s=0.05, retry_max_s=0.2)
        await sink.publish_results([work("s", 0)])
        await asyncio.wait_for(sink.wait_idle(), 5)
        srv.stop(kill=True)
        await sink.publish_results([work("s", 1)])
        await until(lambda: not sink.healthy, 5, what="the sink to see the outage")
        for i in range(3):
            sink.event("s", "state", {"n": i})
        # an input entry whose result is dropped is settled unacknowledged (Redis delivers it again)
        ref = InputRef("frames:x", "g", "1-1", handle=settled)
        await sink.publish_results([work("s", 2, ref)] + [work("s", i) for i in range(3, 14)])
        # 1 + 3 + 12 records in a buffer of 10: the 6 oldest results went, every event stayed
        assert len(sink) == 10 and sink.overflowed == 6 and settled == [ref]
        srv.start()
        await until(lambda: sink.healthy and len(sink) == 0, 10, what="the buffer flushed")
        recs = await results(r, "s")
        evs = await events(r, "s")
    finally:
        await r.aclose()
        srv.stop()
    assert [x["seq"] for x in recs] == [0] + list(range(7, 14))
    assert [e["n"] for e in evs if e["type"] == "state"] == [0, 1, 2]
    (dropped,) = [e for e in evs if e["type"] == "records_dropped"]
    assert dropped["results"] == 6 and dropped["events"] == 0
    assert dropped["reason"] == "outage buffer full (redis.buffer_max_records=10)"
    assert not sink.catching_up and sink.last_error is None


async def test_events_beyond_their_reserved_share_are_dropped_oldest_first(tmp_path, sink_for):
    srv = ManagedRedis(tmp_path / "redis", durable=True).start()  # what was written before the kill stays
    r = aioredis.Redis.from_url(srv.url)
    try:
        sink = sink_for(srv.url, buffer_max_records=4, events_reserved=0.5, retry_initial_s=0.05, retry_max_s=0.2)
        srv.stop(kill=True)
        sink.event("e", "state", {"n": 0})
        await until(lambda: not sink.healthy, 5, what="the sink to see the outage")
        await sink.publish_results([work("e", 0), work("e", 1)])
        sink.event("e", "state", {"n": 1})
        assert sink.overflowed == 0  # [e0 r0 r1 e1]: full
        sink.event("e", "state", {"n": 2})  # 2 events, within their share of 2: the oldest result goes, not e0
        assert sink.overflowed == 1 and [e["n"] for e in _buffered_events(sink)] == [0, 1, 2]
        sink.event("e", "state", {"n": 3})  # 3 events, over their share: the oldest record goes, here e0 (not r1)
        assert sink.overflowed == 2 and [e["n"] for e in _buffered_events(sink)] == [1, 2, 3]
        for i in range(4, 6):  # then r1, then e1
            sink.event("e", "state", {"n": i})
        assert len(sink) == 4 and sink.overflowed == 4
        srv.start()
        await until(lambda: sink.healthy and len(sink) == 0, 10, what="the buffer flushed")
        evs = await events(r, "e")
        recs = await results(r, "e")
    finally:
        await r.aclose()
        srv.stop()
    assert recs == [] and [e["n"] for e in evs if e["type"] == "state"] == [2, 3, 4, 5]
    (dropped,) = [e for e in evs if e["type"] == "records_dropped"]
    assert (dropped["results"], dropped["events"]) == (2, 2)


def _buffered_events(sink):
    return [json.loads(p.fields["event"]) for p in sink._buf if p.event]


async def test_records_and_events_are_valid_json_on_their_keys(r, redis_server, sink_for):
    sink = sink_for(redis_server.url)
    sink.record(keys.vlm_key("j"), 100, {"stream_id": "j", "value": float("nan")})
    sink.event("j", "discontinuity", {"seq": 3})
    await asyncio.wait_for(sink.wait_idle(), 5)
    (entry,) = await r.xrange(keys.vlm_key("j"))
    assert json.loads(entry[1][b"record"]) == {"stream_id": "j", "value": None}  # never a bare NaN
    (ev,) = await events(r, "j")
    assert ev["type"] == "discontinuity" and ev["seq"] == 3 and ev["stream_id"] == "j"


async def test_events_of_a_predict_requests_frame_are_never_published(redis_server, sink_for):
    """A stage that speaks of a predict request's frame (its tracker or segmenter forgetting the one-frame stream)
    publishes nothing: no key for the request's stream id appears in Redis."""
    from streamd.frames import PREDICT_PREFIX

    sink = sink_for(redis_server.url)
    sink.event(f"{PREDICT_PREFIX}7", "mask_lost", {"object_id": 1})
    sink.event("cam", "state", {"to": "live"})
    assert len(sink) == 1
    await asyncio.wait_for(sink.wait_idle(), 5)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.exists(keys.events_key(f"{PREDICT_PREFIX}7")) == 0
        assert await client.exists(keys.events_key("cam")) == 1
    finally:
        await client.aclose()


async def test_an_entry_on_another_server_is_acknowledged_there_retried_while_it_is_down(r, redis_server, tmp_path,
                                                                                        sink_for):
    """An input entry on another Redis server is acknowledged on that server (InputRef.server) after its result is
    written, not in the result's MULTI/EXEC on the daemon's own Redis. That server down: the result is written at
    once (other streams' too), and the acknowledgement waits and is retried until the server is back; the entry is
    settled only then (its input does not read it again meanwhile)."""

    other = ManagedRedis(tmp_path / "other", durable=True).start()
    direct = aioredis.Redis.from_url(other.url)
    server = aioredis.Redis.from_url(other.url, socket_connect_timeout=1, socket_timeout=1)
    try:
        eid = await direct.xadd("frames:cam", {"image": b"x"}, id="7-0")
        await direct.xgroup_create("frames:cam", "g", id="0")
        await direct.xreadgroup("g", "c", {"frames:cam": ">"})
        await r.xadd("frames:cam", {"image": b"x"}, id="7-0")  # the same key, group and id on the daemon's own
        await r.xgroup_create("frames:cam", "g", id="0")
        await r.xreadgroup("g", "c", {"frames:cam": ">"})
        await asyncio.to_thread(other.stop)
        sink = sink_for(redis_server.url, retry_initial_s=0.05, retry_max_s=0.2)
        handle = Settled()
        ref = InputRef("frames:cam", "g", eid.decode(), handle=handle, server=server)
        await sink.publish_results([work("far", 1, ref), work("near", 1)])
        await until(lambda: sink.results_by_stream.get("far") == 1 and sink.results_by_stream.get("near") == 1, 10,
                    what="both results written while the other server is down")
        await until(lambda: sink._server_acks and not next(iter(sink._server_acks.values())).healthy, 10,
                    what="an acknowledgement failed")
        assert sink.server_acks_pending == 1 and handle == []  # not lost, not settled
        assert await r.hgetall("streamd:{far}:acking") == {b"frames:cam\ng\n7-0": b"1"}  # marked with its result
        await sink.publish_results([work("near", 2)])  # other results go on
        await until(lambda: sink.results_by_stream.get("near") == 2, 10, what="a later result")
        await asyncio.to_thread(other.start)
        await until(lambda: sink.server_acks_pending == 0, 10, what="the acknowledgement retried")
        assert (await direct.xpending("frames:cam", "g"))["pending"] == 0
        assert (await r.xpending("frames:cam", "g"))["pending"] == 1  # the own same-key entry: untouched
        assert handle == [ref]
        assert len(await results(r, "far")) == 1

        async def unmarked():
            return await r.hlen("streamd:{far}:acking") == 0

        await until(unmarked, 10, what="the mark removed")
    finally:
        await server.aclose()
        await direct.aclose()
        other.stop()


async def test_closing_acknowledges_on_every_other_server_at_once(r, redis_server, sink_for):
    """At shutdown, what is left to acknowledge on other servers is tried on all of them at once, within one bound:
    two servers that accept connections and never answer are both connected to before either is given up (old: one
    after the other, up to 2 s each)."""
    log: list[tuple[str, int]] = []
    conns = itertools.count()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = next(conns)
        log.append(("open", n))
        while await reader.read(4096):  # never answers
            pass
        log.append(("close", n))
        writer.close()

    listeners = [await asyncio.start_server(hang, "127.0.0.1", 0) for _ in range(2)]
    servers = [aioredis.Redis.from_url(f"redis://127.0.0.1:{s.sockets[0].getsockname()[1]}", socket_timeout=30,
                                       socket_connect_timeout=30) for s in listeners]
    try:
        sink = sink_for(redis_server.url, retry_initial_s=0.05, retry_max_s=0.5)
        await sink.publish_results([work("ha", 1, InputRef("frames:a", "g", "1-0", server=servers[0])),
                                    work("hb", 1, InputRef("frames:b", "g", "1-0", server=servers[1]))])
        await until(lambda: sink.server_acks_pending == 2 and len(log) >= 2, 10, what="both servers tried")
        first = len(log)
        await sink.aclose()
        await until(lambda: sum(1 for e, n in log if e == "open" and n >= first) == 2, 5, what="two connects")
        await until(lambda: sum(1 for e, n in log if e == "close" and n >= first) == 2, 5, what="both given up")
        at_close = [e for e, n in log if n >= first]
        assert at_close[:2] == ["open", "open"], log  # both connected before either was given up
    finally:
        for c in servers:
            await c.aclose()
        for s in listeners:
            s.close()

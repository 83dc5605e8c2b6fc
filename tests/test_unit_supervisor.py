"""StreamRunner's state machine on its own (no daemon, no pipeline): real sources (a missing file, a real clip, a
Redis input on the test Redis whose key a test breaks and mends) and a callback that records every event."""

import asyncio
import time

import numpy as np
import pytest
import redis.asyncio as aioredis

from streamd.batching import QueueClosed
from streamd.config import StreamConfig
from streamd.metrics import Metrics
from streamd.streams.supervisor import State, StreamRunner
from streamd.testing.media import push_frames
from conftest import until

IMG = np.full((16, 16, 3), 128, np.uint8)


class Recorder:
    """The runner's `on_event`: every event with the monotonic time it was emitted."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict]] = []

    def __call__(self, stream_id: str, kind: str, fields: dict) -> None:
        self.events.append((time.monotonic(), kind, dict(fields)))

    def states(self) -> list[str]:
        return [f["to"] for _, k, f in self.events if k == "state"]

    def transitions(self, to: str) -> list[tuple[float, dict]]:
        return [(t, f) for t, k, f in self.events if k == "state" and f["to"] == to]


@pytest.fixture
async def clients(redis_server):
    made: list[aioredis.Redis] = []

    def client(url: str, egress=None) -> aioredis.Redis:
        made.append(aioredis.Redis.from_url(url or redis_server.url))
        return made[-1]

    yield client
    for c in made:
        await c.aclose()


def runner(clients, rec: Recorder, **cfg) -> StreamRunner:
    return StreamRunner(StreamConfig(**{"id": "s", "pipeline": "frame_info", **cfg}), Metrics(), rec, clients, "unit")


async def drain(q) -> int:
    """Take frames off a runner's queue (the pipeline's part) until it is closed; returns how many."""
    n = 0
    while True:
        try:
            await q.get()
        except QueueClosed:
            return n
        n += 1


async def test_a_missing_file_fails_at_once_with_no_retry(clients, tmp_path):
    rec = Recorder()
    sr = runner(clients, rec, url=str(tmp_path / "nope.mp4"), reconnect={"initial_s": 0.05, "max_attempts": 10})
    await asyncio.wait_for(sr.run(), 5)
    assert rec.states() == ["connecting", "failed"]  # permanent: no backoff, whatever max_attempts allows
    assert sr.state is State.FAILED and sr.reason_code == "not_found" and sr.attempts == 0
    assert sr.reason == f"no such file: {tmp_path / 'nope.mp4'}" and sr.last_error == sr.reason
    assert sr.queue.closed


async def test_an_unparseable_reference_fails_before_connecting(clients):
    rec = Recorder()
    sr = runner(clients, rec, url="gopher://example.com/cam")
    await asyncio.wait_for(sr.run(), 5)
    assert rec.states() == ["connecting", "failed"]
    assert sr.reason_code == "invalid_reference" and sr.reason == "unsupported scheme 'gopher'"


async def test_a_file_goes_live_then_stops_at_its_end(clients, clip):
    rec = Recorder()
    sr = runner(clients, rec, url=str(clip), fps=2.0, queue_size=4)
    taken, _ = await asyncio.wait_for(asyncio.gather(drain(sr.queue), sr.run()), 20)
    assert rec.states() == ["connecting", "live", "stopped"]
    assert sr.state is State.STOPPED and sr.reason == "end of input" and sr.reason_code == "ended"
    assert taken == sr.frames == 12  # 6 s at 30 fps, sampled at 2 fps
    # decode: auto (1 s GOP): the first three GOPs in full, then each GOP up to its last due frame (0.5 s in)
    assert 90 + 3 * 16 <= sr.decoded <= 90 + 3 * 26
    assert sr.attempts == 0 and sr.last_error is None


async def test_backoff_grows_by_its_multiplier_up_to_max_s_then_gives_up(clients, r):
    """A Redis input whose key holds a string: every connection fails (WRONGTYPE), a transient error."""
    await r.set("frames:wrong", "not a stream")
    rec = Recorder()
    sr = runner(clients, rec, url="redis:frames:wrong",
                reconnect={"initial_s": 0.1, "multiplier": 2, "max_s": 0.3, "jitter": 0, "max_attempts": 4})
    await asyncio.wait_for(sr.run(), 10)
    assert rec.states() == ["connecting"] + ["backoff", "connecting"] * 4 + ["failed"]
    backoffs, connects = rec.transitions("backoff"), rec.transitions("connecting")[1:]
    assert [f["attempt"] for _, f in backoffs] == [1, 2, 3, 4]
    waits = [c - b for (b, _), (c, _) in zip(backoffs, connects)]
    for waited, planned in zip(waits, [0.1, 0.2, 0.3, 0.3]):  # initial_s, x2, then capped at max_s
        assert planned - 0.01 <= waited <= planned + 0.15, (waits, planned)
    assert sr.state is State.FAILED and sr.reason.startswith("gave up after 4 attempts: redis: WRONGTYPE"), sr.reason
    assert all("WRONGTYPE" in f["reason"] for _, f in backoffs)


@pytest.mark.parametrize("reset_after_s, attempt_after_live", [(0, 1), (3600, 3)])
async def test_attempts_start_again_once_live_for_reset_after_s(clients, r, reset_after_s, attempt_after_live):
    """Two failures, then live, then a failure: the count starts again only when the stream was live for
    `reset_after_s` (0: at once; an hour: not in this test, so the failure is attempt 3)."""
    key = "frames:flap"
    await r.set(key, "not a stream")
    rec = Recorder()
    sr = runner(clients, rec, url=f"redis:{key}", redis_input={"block_ms": 50},
                reconnect={"initial_s": 0.5, "multiplier": 1, "jitter": 0, "max_attempts": None,
                           "reset_after_s": reset_after_s})
    drainer = asyncio.ensure_future(drain(sr.queue))
    task = asyncio.ensure_future(sr.run())
    try:
        # mended within the 0.5 s backoff that follows the second failure
        await until(lambda: len(rec.transitions("backoff")) == 2, 5, 0.02, what="two failed connections")
        await r.delete(key)
        await push_frames(r, key, [IMG])
        await until(lambda: sr.state is State.LIVE, 5, what="live on the mended key")
        await r.delete(key)
        await r.set(key, "not a stream")  # broken again
        await until(lambda: len(rec.transitions("backoff")) == 3, 5, what="the failure after being live")
    finally:
        sr.stop()
        await asyncio.wait_for(task, 5)
        await drainer
    assert [f["attempt"] for _, f in rec.transitions("backoff")] == [1, 2, attempt_after_live]
    assert rec.states()[-1] == "stopped" and sr.frames == 1


async def test_max_attempts_counts_consecutive_failures_only_when_live_was_short(clients, r):
    """reset_after_s 0 and max_attempts 1: a source that fails once after every live spell never reaches failed;
    two failures in a row do."""
    key = "frames:twice"
    rec = Recorder()
    sr = runner(clients, rec, url=f"redis:{key}", redis_input={"block_ms": 50},
                reconnect={"initial_s": 0.5, "multiplier": 1, "jitter": 0, "max_attempts": 1, "reset_after_s": 0})
    drainer = asyncio.ensure_future(drain(sr.queue))
    task = asyncio.ensure_future(sr.run())
    try:
        for i in range(2):  # mended (within the 0.5 s backoff), live, then broken: attempt 1 each time
            await r.delete(key)
            await push_frames(r, key, [IMG])
            await until(lambda: sr.state is State.LIVE, 5, 0.02, what=f"live ({i})")
            await r.set(key, "not a stream")
            await until(lambda: len(rec.transitions("backoff")) == i + 1, 5, 0.02, what=f"backoff ({i})")
        # left broken: the next connection fails before anything is live, a second failure in a row
        await asyncio.wait_for(task, 5)
    finally:
        sr.stop()
        await drainer
    assert [f["attempt"] for _, f in rec.transitions("backoff")] == [1, 1]
    assert sr.state is State.FAILED and sr.reason.startswith("gave up after 1 attempts"), sr.reason


async def test_stop_ends_a_long_backoff_at_once(clients, r):
    await r.set("frames:wait", "not a stream")
    rec = Recorder()
    sr = runner(clients, rec, url="redis:frames:wait", reconnect={"initial_s": 60, "jitter": 0})
    task = asyncio.ensure_future(sr.run())
    await until(lambda: sr.state is State.BACKOFF, 5, what="a backoff of 60 s")
    t0 = time.monotonic()
    sr.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 1.0
    assert rec.states() == ["connecting", "backoff", "stopped"] and sr.reason == "stopped"

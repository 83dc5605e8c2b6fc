import asyncio
import threading
import time

import pytest

from streamd.batching import Doorbell, FrameQueue, Ingress, QueueClosed, StageQueue
from streamd.config import DropPolicy


async def test_drop_oldest_counts_every_drop_and_keeps_newest():
    dropped = []
    q = FrameQueue(3, DropPolicy.DROP_OLDEST, asyncio.get_running_loop(), dropped.append)
    for i in range(10):
        await q.put(i)
    assert dropped == [0, 1, 2, 3, 4, 5, 6]
    assert q.dropped == 7
    assert [q.get_nowait() for _ in range(3)] == [7, 8, 9]


async def test_wait_policy_blocks_a_producer_thread_and_loses_nothing():
    loop = asyncio.get_running_loop()
    q = FrameQueue(2, DropPolicy.WAIT, loop)
    stop = threading.Event()

    def produce():
        for i in range(50):
            assert q.put_threadsafe(i, stop)
        q.close_threadsafe()

    t = threading.Thread(target=produce)
    t.start()
    got = []
    while True:
        try:
            got.append(await q.get())
        except QueueClosed:
            break
        assert len(q) <= 2
        await asyncio.sleep(0)
    t.join()
    assert got == list(range(50))


async def test_doorbell_keeps_order_and_a_full_wait_queue_does_not_wait_for_the_tick():
    loop = asyncio.get_running_loop()
    bell = Doorbell(loop, tick_s=1.0)  # a steady flow is collected once a second
    q = FrameQueue(2, DropPolicy.WAIT, loop, doorbell=bell)
    stop = threading.Event()
    ended = loop.create_future()

    def produce():
        for i in range(50):
            assert q.put_threadsafe(i, stop)
        q.call_threadsafe(ended.set_result, "end")  # after the items, without waiting for a tick

    t = threading.Thread(target=produce)
    t0 = loop.time()
    t.start()
    got = []
    while len(got) < 50:
        got.append(await q.get())
    assert await asyncio.wait_for(ended, 1.0) == "end" and len(q) == 0
    t.join()
    assert got == list(range(50))
    assert loop.time() - t0 < 5  # 25 ticks' worth of items: a blocked producer hurries the collection


async def test_doorbell_hands_a_slow_flow_over_at_once_and_ticks_only_for_a_fast_one():
    loop = asyncio.get_running_loop()
    bell = Doorbell(loop, tick_s=4.0, busy_rate=300)  # a tick this long shows in every delay (the first: 1 s)
    delays: list[float] = []

    def produce(n: int, gap_s: float) -> None:
        for _ in range(n):
            t = loop.time()
            bell.post(lambda t0: delays.append(loop.time() - t0), t)
            time.sleep(gap_s)

    await asyncio.to_thread(produce, 6, 0.06)  # ~16 calls a second, like 8 cameras at 2 FPS
    await until_len(delays, 6)
    assert max(delays) < 0.5, delays  # none waited for a tick
    delays.clear()
    await asyncio.to_thread(produce, 400, 0.001)  # ~900 calls a second for ~0.4 s
    await until_len(delays, 400, timeout_s=30)
    assert sorted(delays)[200] > 0.1  # once the rate was measured (50 ms), the rest waited for a tick


async def until_len(items: list, n: int, timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(items) < n:
        assert asyncio.get_running_loop().time() < deadline, f"{len(items)} of {n}"
        await asyncio.sleep(0.01)


async def test_ingress_is_fair_across_streams():
    loop = asyncio.get_running_loop()
    a = FrameQueue(100, DropPolicy.WAIT, loop)
    b = FrameQueue(100, DropPolicy.WAIT, loop)
    ing = Ingress()
    ing.attach("a", a)
    ing.attach("b", b)
    for i in range(20):
        await a.put(("a", i))
    await b.put(("b", 0))
    batch = await ing.get_batch(4)
    assert ("b", 0) in batch  # a busy stream does not starve a quiet one


async def test_ingress_batches_by_size_or_timeout():
    loop = asyncio.get_running_loop()
    a = FrameQueue(100, DropPolicy.WAIT, loop)
    ing = Ingress()
    ing.attach("a", a)
    await a.put(1)
    t0 = loop.time()
    batch = await ing.get_batch(8, max_wait_s=0.2)
    assert batch == [1]
    assert loop.time() - t0 >= 0.15
    ing.close()
    with pytest.raises(QueueClosed):
        await ing.get_batch(8)


async def test_stage_queue_closes_with_a_sentinel_after_items():
    q = StageQueue(10)
    for i in range(5):
        await q.put(i)
    await q.close()
    assert await q.get_batch(3) == [0, 1, 2]
    assert await q.get_batch(10) == [3, 4]
    with pytest.raises(QueueClosed):
        await q.get_batch(10)


async def test_a_closed_queue_leaves_the_ingress_with_an_end_marker_after_its_last_item():
    from streamd.frames import EndOfStream

    loop = asyncio.get_running_loop()
    a = FrameQueue(100, DropPolicy.WAIT, loop)
    b = FrameQueue(100, DropPolicy.WAIT, loop)
    ing = Ingress()
    ing.attach("a", a)
    ing.attach("b", b)
    for i in range(3):
        await a.put(("a", i))
    await b.put(("b", 0))
    a.close()
    got: list = []
    while EndOfStream("a") not in got:
        got += await asyncio.wait_for(ing.get_batch(2), 2)
    of_a = [x for x in got if x == EndOfStream("a") or isinstance(x, tuple) and x[0] == "a"]
    assert of_a == [("a", 0), ("a", 1), ("a", 2), EndOfStream("a")]  # after the stream's last item, once
    await b.put(("b", 1))
    assert EndOfStream("a") not in await asyncio.wait_for(ing.get_batch(8), 2)  # a has left the fan-in


async def test_a_pipeline_says_a_stream_ended_once_its_last_frame_was_delivered():
    """The end marker follows the stream's frames through every stage; the future `attach` gives resolves only
    after the last of them reached the sink side (no polling of queue depths)."""
    import numpy as np

    from streamd.config import PipelineConfig, StageConfig
    from streamd.frames import Frame
    from streamd.metrics import Metrics
    from streamd.pipeline import Pipeline
    from streamd.stages import build_stage

    delivered: list[int] = []
    ended_after: list[int] = []

    async def deliver(works):
        await asyncio.sleep(0.01)  # the sink takes its time: the end must wait for it
        delivered.extend(w.frame.seq for w in works)

    stages = [build_stage(StageConfig(type="frame_info"), "t.0"), build_stage(StageConfig(type="frame_info"), "t.1")]
    p = Pipeline("t", PipelineConfig(stages=[StageConfig(type="frame_info")] * 2), stages, deliver, Metrics())
    loop = asyncio.get_running_loop()
    q = FrameQueue(100, DropPolicy.WAIT, loop)
    ended = p.attach("s", q)
    ended.add_done_callback(lambda _: ended_after.append(len(delivered)))
    task = asyncio.ensure_future(p.run())
    img = np.zeros((8, 8, 3), np.uint8)
    for i in range(20):
        await q.put(Frame("s", i, i / 10, time.time(), img))
    q.close()
    await asyncio.wait_for(ended, 5)
    assert delivered == list(range(20)) and ended_after == [20]
    p.ingress.close()
    await asyncio.wait_for(task, 5)


async def test_a_stream_id_re_added_before_its_old_queue_drained_keeps_both_ends_apart():
    """A stream is removed and the same id added again (a fleet lease lost and taken back) while the old queue's
    last frames are still on their way: the old end resolves after the old frames, the new one stays open, and the
    stream's stage state is not forgotten under the new queue's frames."""
    import numpy as np

    from streamd.config import PipelineConfig, StageConfig
    from streamd.frames import Frame
    from streamd.metrics import Metrics
    from streamd.pipeline import Pipeline
    from streamd.stages import build_stage

    delivered: list[tuple[str, int]] = []
    forgotten: list[str] = []

    class Observed(Pipeline):
        def forget_stream(self, stream_id):
            forgotten.append(stream_id)
            super().forget_stream(stream_id)

    async def deliver(works):
        await asyncio.sleep(0.01)
        delivered.extend((w.frame.meta["q"], w.frame.seq) for w in works)

    p = Observed("t", PipelineConfig(stages=[StageConfig(type="frame_info")]),
                 [build_stage(StageConfig(type="frame_info"), "t.0")], deliver, Metrics())
    loop = asyncio.get_running_loop()
    img = np.zeros((8, 8, 3), np.uint8)
    old, new = FrameQueue(100, DropPolicy.WAIT, loop), FrameQueue(100, DropPolicy.WAIT, loop)
    for i in range(10):
        await old.put(Frame("s", i, i / 10, time.time(), img, meta={"q": "old"}))
    old.close()
    old_end = p.attach("s", old)
    new_end = p.attach("s", new)  # before the pipeline read anything of the old queue
    await new.put(Frame("s", 100, 10.0, time.time(), img, meta={"q": "new"}))
    task = asyncio.ensure_future(p.run())
    await asyncio.wait_for(old_end, 5)
    assert [s for q, s in delivered if q == "old"] == list(range(10))
    assert not new_end.done() and forgotten == []  # the new queue of "s" is still attached
    await until_delivered(delivered, ("new", 100))
    new.close()
    await asyncio.wait_for(new_end, 5)
    assert forgotten == ["s"]
    p.ingress.close()
    await asyncio.wait_for(task, 5)


async def until_delivered(delivered, item, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while item not in delivered:
        assert time.monotonic() < deadline, f"{item} never delivered"
        await asyncio.sleep(0.01)


async def test_ingress_low_class_takes_spare_capacity_and_its_minimum_share():
    """Jobs' queues (low) fill what live queues leave of a batch, at most `low_share` of it while a live queue is
    attached, and get at least `low_share` of the items under load; alone they take whole batches."""
    loop = asyncio.get_running_loop()
    live = FrameQueue(1000, DropPolicy.WAIT, loop)
    job = FrameQueue(1000, DropPolicy.WAIT, loop)
    ing = Ingress(low_share=0.25)
    ing.attach("job", job, low=True)
    for i in range(100):
        await job.put(("job", i))
    assert len(await ing.get_batch(8)) == 8  # no live stream: a whole batch of job frames
    ing.attach("cam", live)
    batch = await ing.get_batch(8)
    assert len(batch) == 2 and all(k == "job" for k, _ in batch)  # live attached but idle: at most 2 of 8 slots
    for i in range(400):
        await live.put(("cam", i))
    taken = []
    for _ in range(40):  # under load: both wait
        taken += await ing.get_batch(8)
    share = sum(1 for k, _ in taken if k == "job") / len(taken)
    assert 0.2 <= share <= 0.3, share
    for b in [await ing.get_batch(8) for _ in range(5)]:
        assert sum(1 for k, _ in b if k == "job") <= 2
    # in order within each class
    jobs = [i for k, i in taken if k == "job"]
    assert jobs == sorted(jobs)

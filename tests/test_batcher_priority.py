"""Issue 17's scheduling in a model's one batcher (streamd/models/batcher.py): live items first, jobs' items (the
lower class) fill spare capacity, with their share when both wait. Real forward passes of a small model
(yolo11n, random weights, seeded); the order of the passes is what is checked, never their times: forward passes
that must not end early wait on an event the test sets."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from streamd.errors import StageError
from streamd.models import load_yolo
from streamd.models.batcher import ModelBatcher

KEY = "p"  # one parameter set: every item may share a batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = load_yolo("yolo11n.yaml").model.eval()
    return m


class Forwards:
    """A lane's `run`: a real forward pass of each batch; records (tags of the batch) in order. Items tagged in
    `gated` wait for `gate` first (set by the test)."""

    def __init__(self, model, gated: tuple[str, ...] = ()):
        self.model = model
        self.order: list[list[str]] = []
        self.gated = gated
        self.gate = threading.Event()
        self.started = threading.Event()  # a gated batch is under way
        self.running_low = 0
        self.most_low_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[str], key: str) -> list[int]:
        low = all(t.startswith("job") for t in items)
        with self._lock:
            self.order.append(list(items))
            self.running_low += low
            self.most_low_at_once = max(self.most_low_at_once, self.running_low)
        try:
            if any(t.startswith(self.gated) for t in items) and self.gated:
                self.started.set()
                assert self.gate.wait(60), "the test never opened the gate"
            with torch.no_grad():
                out = self.model(torch.from_numpy(np.zeros((len(items), 3, 64, 64), np.float32)))
            return [int(out[0].shape[0])] * len(items)
        finally:
            with self._lock:
                self.running_low -= low


def batcher(share: float = 0.25) -> ModelBatcher[str, int]:
    return ModelBatcher(lambda: StageError("closed"), low_share=share)


async def lanes(b: ModelBatcher, run: Forwards, n: int, batch: int = 1):
    pool = ThreadPoolExecutor(n)
    tasks = [asyncio.create_task(b.lane(run, pool, batch)) for _ in range(n)]
    return tasks, pool


async def stop(tasks, pool, run: Forwards) -> None:
    run.gate.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pool.shutdown(wait=True)


async def test_live_items_submitted_while_job_items_wait_are_forwarded_first(model):
    """One lane: a job's four frames are queued and the first is in a forward pass; three live frames arrive. The
    live frames go next, then the job's (FIFO would run the job's three first)."""
    b, run = batcher(), Forwards(model, gated=("job0",))
    tasks, pool = await lanes(b, run, 1)
    try:
        job = [asyncio.create_task(b.submit([f"job{i}"], KEY, low=True)) for i in range(4)]
        await asyncio.to_thread(run.started.wait, 60)  # job0 is under way, job1-3 wait
        live = [asyncio.create_task(b.submit([f"live{i}"], KEY)) for i in range(3)]
        await asyncio.sleep(0)  # submitted (queued) before the gate opens
        run.gate.set()
        await asyncio.gather(*job, *live)
    finally:
        await stop(tasks, pool, run)
    assert [t for batch in run.order for t in batch] == ["job0", "live0", "live1", "live2", "job1", "job2", "job3"]


async def test_a_job_only_batch_leaves_a_lane_to_live_frames(model):
    """Two lanes, live frames coming: the job's frames run on one lane at a time, so a live frame that arrives
    while a job's forward pass is under way is forwarded at once, on the other lane (with FIFO both lanes would be
    busy with the job's frames and the live frame would wait for them)."""
    b, run = batcher(), Forwards(model, gated=("job",))
    tasks, pool = await lanes(b, run, 2)
    try:
        await b.submit(["live0"], KEY)  # a live stream is running
        job = [asyncio.create_task(b.submit([f"job{i}"], KEY, low=True)) for i in range(4)]
        await asyncio.to_thread(run.started.wait, 60)
        await asyncio.sleep(0)
        live = await asyncio.wait_for(b.submit(["live1"], KEY), 60)  # the job's pass still waits on the gate
        assert len(live) == 1
        assert run.order[-1] == ["live1"] and not any(f.done() for f in job)
        assert (b.live_beside_low, b.live_behind_low) == (1, 0)  # beside the job's pass, not behind it
        run.gate.set()
        await asyncio.gather(*job)
    finally:
        await stop(tasks, pool, run)
    assert run.most_low_at_once == 1
    assert sorted(t for batch in run.order for t in batch if t.startswith("job")) == [f"job{i}" for i in range(4)]


async def test_jobs_get_their_share_under_load_and_every_lane_when_no_live_frame_comes(model):
    """One lane saturated by live frames (all queued at once with a job's): the job still gets its share (one in
    four with jobs.share 0.25), in small batches. With no live frame for LIVE_IDLE_S, the job's frames take whole
    batches and every lane."""
    b, run = batcher(0.25), Forwards(model)
    tasks, pool = await lanes(b, run, 1)
    try:
        live = [asyncio.create_task(b.submit([f"live{i}"], KEY)) for i in range(12)]
        job = [asyncio.create_task(b.submit([f"job{i}"], KEY, low=True)) for i in range(8)]
        await asyncio.gather(*live, *job)
    finally:
        await stop(tasks, pool, run)
    flat = [t for batch in run.order for t in batch]
    first16 = flat[:16]
    assert sum(t.startswith("job") for t in first16) == 4, flat  # 12 live + 4 job while both waited
    assert all(t.startswith("job") for t in flat[16:]) and len(flat) == 20

    b, run = batcher(0.25), Forwards(model, gated=("job",))
    b.LIVE_IDLE_S = 0.0  # the last live frame is long ago
    tasks, pool = await lanes(b, run, 2, batch=4)
    try:
        job = asyncio.create_task(b.submit([f"job{i}" for i in range(8)], KEY, low=True))
        await asyncio.to_thread(run.started.wait, 60)
        for _ in range(100):  # the second lane takes its half too
            if len(run.order) == 2:
                break
            await asyncio.sleep(0.05)
        run.gate.set()
        await job
    finally:
        await stop(tasks, pool, run)
    assert run.most_low_at_once == 2 and sorted(len(x) for x in run.order) == [4, 4]


async def test_a_job_batch_starts_only_when_it_fits_before_the_next_live_frame(model):
    """A live stream's period is learnt from its frames' arrivals; a job's batch that would still run when the
    stream's next frame is due does not start, a short one does, and once the stream stops it no longer binds."""
    b, run = batcher(), Forwards(model)
    tasks, pool = await lanes(b, run, 1)
    loop = asyncio.get_running_loop()
    try:
        for i in range(3):  # a camera at about 2 fps
            if i:
                await asyncio.sleep(0.5)
            await b.submit([f"live{i}"], KEY, streams=("cam",))
    finally:
        await stop(tasks, pool, run)  # the lanes stop: the gate is asked below, nothing runs the job's item
    job = asyncio.create_task(b.submit(["job0"], KEY, low=True))
    await asyncio.sleep(0)
    try:
        now = loop.time()
        due = b.next_due(now)
        assert now < due < now + 0.6, due - now
        b._low_s[1] = 2.0  # a job's forward pass takes 2 s here: it would still run when the next frame comes
        assert not b._low_may_start(1)
        b._low_s[1] = 0.001
        assert b._low_may_start(1)
        b._streams["cam"][0] -= 10  # the stream's last frame is long ago: it no longer binds
        assert b.next_due(loop.time()) == float("inf")
    finally:
        job.cancel()
    assert run.order == [["live0"], ["live1"], ["live2"]]


@pytest.mark.timeout(60)  # the old code never returns here (its lane spun with the event loop held)
async def test_items_of_cancelled_requests_leave_the_queue_and_the_lane_serves_on(model):
    """A job cancelled while its frame waits in the lower class, and a predict request whose caller went away while
    its image waited (both callers cancelled: their requests' futures are done, their items still queued). The lane
    drops those items and serves the next requests; before, `_take` found nothing to take, left them queued, and
    the lane looked again at once without awaiting: the event loop (the daemon's) was held for ever."""
    b, run = batcher(), Forwards(model, gated=("job0",))
    tasks, pool = await lanes(b, run, 1)
    try:
        first = asyncio.create_task(b.submit(["job0"], KEY, low=True))
        await asyncio.to_thread(run.started.wait, 60)  # job0 is under way: what comes next waits
        gone = [asyncio.create_task(b.submit(["job1"], KEY, low=True)),
                asyncio.create_task(b.submit(["live0"], KEY))]
        await asyncio.sleep(0)
        assert b.waiting == 2
        for t in gone:
            t.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        run.gate.set()
        await first
        for _ in range(5):  # the lane looks at the queue of cancelled items alone
            await asyncio.sleep(0.01)
        assert b.waiting == 0
        later = await asyncio.gather(b.submit(["live1"], KEY), b.submit(["job2"], KEY, low=True))
    finally:
        await stop(tasks, pool, run)
    assert [len(x) for x in later] == [1, 1]
    assert [t for batch in run.order for t in batch] == ["job0", "live1", "job2"]

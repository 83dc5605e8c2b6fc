"""One loaded model's batcher, shared by everything that uses the model.

Every user of a loaded model (the stages of every pipeline that names it, and single-image predict requests)
submits here; items that wait while a batch runs go together into the next one. A model owns exactly one batcher
(the detector's forward passes, the VLM's `generate` calls), so a request never waits behind a second queue and
the batch size is the model's own setting (`forward_batch`, `generate_batch`), not a stage's.

- `submit(items, key)` queues a request's items and returns their outputs in order (or raises the batch's error).
- `lane(run, executor, batch, max_wait_s)` serves waiting items until the batcher is closed: it takes up to
  `batch` items with the first waiting item's key (items of other keys keep their place), waits up to
  `max_wait_s` for a fuller batch, runs `run(items, key)` in `executor` and hands each caller its outputs. Several
  lanes may serve one batcher (a detector's CPU lanes): waiting items are shared out evenly between idle lanes.
- `admit(item)` (optional) is asked about each item when a batch is formed: raising drops that request with the
  exception (a VLM question past its deadline).
- `aclose(error)` fails every waiting request, and later ones, with `error` (the model was unloaded).

Two priority classes: live items (streams, predict requests) and `low` ones (jobs, `submit(..., low=True)`).
- Live items go first: low items fill the spare slots of a batch that live items leave (at most `low_share` of
  it), and a batch of low items alone starts only when no live item waits.
- While live items keep coming (one within `LIVE_IDLE_S`), a batch of low items (`low_share` of `batch`, at least
  one item) starts only when it fits before the next live item is due and no live batch is under way: live items
  are frames of streams sampled at a steady rate, so the batcher learns each stream's period from its arrivals
  (`submit(..., streams=...)`) and the low batches' durations per batch size. Where there are several lanes, one
  is left free for live items (an item no stream's period predicts, a predict request, finds a lane). On a CPU a job's forward pass beside
  a live one slows the live one down (they share the cores, their caches and memory bandwidth), and a live frame
  that arrives while every lane holds a job's pass waits for it: both are what this avoids.
- With no live item for `LIVE_IDLE_S`, low items take every lane and whole batches.
- So that jobs still progress under load, low items are taken ahead of live ones while they have had less than
  `low_share` of the items taken lately (about `LOW_WINDOW` items taken while low items waited).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["ModelBatcher"]

I = TypeVar("I")  # noqa: E741 - an item
O = TypeVar("O")  # noqa: E741 - its output


@dataclass(eq=False)
class _Request(Generic[I, O]):
    items: list[I]
    key: Hashable
    future: asyncio.Future[list[O]]
    outs: list[Any] = field(init=False)  # per item, filled in as its batch ends
    left: int = field(init=False)  # items not yet through a batch

    def __post_init__(self) -> None:
        self.outs = [None] * len(self.items)
        self.left = len(self.items)

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


class ModelBatcher(Generic[I, O]):
    LIVE_IDLE_S = 5.0  # no live item for this long: low items take every lane and whole batches
    LOW_WINDOW = 256  # items over which the low class's share is measured
    DUE_MARGIN_S = 0.01  # a low batch must end this long before the next live item is due
    LATE_S = 0.05  # a stream's frame this much later than due (or a quarter of its period): it no longer binds

    def __init__(self, closed_error: Callable[[], BaseException],
                 admit: Callable[[I], None] | None = None, low_share: float = 0.25):
        self._closed_error = closed_error  # the error of a request the batcher could not serve (unloaded)
        self._admit = admit
        self._pending: deque[tuple[_Request[I, O], int]] = deque()  # live (request, item index), in arrival order
        self._low: deque[tuple[_Request[I, O], int]] = deque()  # the low class's (jobs)
        self.low_share = low_share
        self._taken = [0.0, 0.0]  # items taken lately while low items waited: live, low
        self._live_t = float("-inf")  # loop time the latest live item was submitted
        self._streams: dict[Hashable, list[float]] = {}  # live stream -> [its latest arrival, its period (EMA)]
        self._low_s: dict[int, float] = {}  # batch size -> a low batch's duration (EMA), seconds
        self._live_running = 0  # batches holding live items under way
        self._low_running = 0  # batches of low items alone under way
        self._lanes = 0  # lanes serving
        self._wake = asyncio.Event()
        self._idle = 0  # lanes waiting for items
        self.error: BaseException | None = None  # closed (or could not be set up): every request fails with it
        self.batches = 0
        # live items submitted while a batch of low items alone was under way (a job's pass beside theirs), and of
        # those, the ones that found no lane waiting (they waited for a lane: a job's pass or another live batch)
        self.live_beside_low = 0
        self.live_behind_low = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # the latest batches' sizes

    @property
    def waiting(self) -> int:
        """Items queued, not yet in a batch."""
        return len(self._pending) + len(self._low)

    @property
    def waiting_low(self) -> int:
        """Items of the lower class (jobs') queued, not yet in a batch."""
        return len(self._low)

    @property
    def running(self) -> tuple[int, int]:
        """Batches under way: (of live items, of low items alone)."""
        return self._live_running, self._low_running

    def first_key(self) -> Hashable | None:
        """The key of the oldest waiting item, live first (None when nothing waits)."""
        for q in (self._pending, self._low):
            if q:
                return q[0][0].key
        return None

    async def wait_for_items(self) -> None:
        while not self._pending and not self._low:
            self._wake.clear()
            await self._wake.wait()

    async def submit(self, items: list[I], key: Hashable, low: bool = False,
                     streams: Iterable[Hashable] = ()) -> list[O]:
        """The outputs of `items` (run with `key`), in order. `low`: a job's, the lower priority class. `streams`:
        the live streams the items are frames of (each one's period is learnt from its arrivals)."""
        if self.error is not None:
            raise self.error
        if not items:
            return []
        loop = asyncio.get_running_loop()
        req: _Request[I, O] = _Request(items, key, loop.create_future())
        (self._low if low else self._pending).extend((req, i) for i in range(len(items)))
        if not low:
            self._arrived(loop.time(), streams)
            if self._low_running:
                self.live_beside_low += len(items)
                self.live_behind_low += len(items) if not self._idle else 0
        self._wake.set()
        return await req.future

    def _arrived(self, now: float, streams: Iterable[Hashable]) -> None:
        self._live_t = now
        for sid in streams:
            st = self._streams.get(sid)
            if st is None:
                self._streams[sid] = [now, 0.0]
                continue
            gap = now - st[0]
            if 0 < gap < self.LIVE_IDLE_S:
                st[1] = gap if st[1] <= 0 else 0.75 * st[1] + 0.25 * gap
            st[0] = now
        if len(self._streams) > 64:  # streams gone quiet go
            for sid in [k for k, (t, _) in self._streams.items() if now - t > self.LIVE_IDLE_S]:
                del self._streams[sid]

    def next_due(self, now: float) -> float:
        """When the next live item is expected (loop time; inf when no stream's next frame can be predicted)."""
        due = float("inf")
        for t, period in self._streams.values():
            if period <= 0 or now - t > self.LIVE_IDLE_S:
                continue
            nxt = t + period
            if now > nxt + max(self.LATE_S, period / 4):  # late: paused, slower, or gone
                continue
            due = min(due, max(now, nxt))  # a frame a little late is due now
        return due

    def fail_all(self, err: BaseException) -> None:
        """Every waiting request fails with `err`, and every later one (the batcher cannot serve)."""
        self.error = err
        for q in (self._pending, self._low):
            while q:
                q.popleft()[0].fail(err)

    async def lane(self, run: Callable[[list[I], Any], list[O]], executor: Executor | None, batch: int,
                   max_wait_s: float = 0.0) -> None:
        """Serve batches of up to `batch` items until cancelled (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        self._lanes += 1
        try:
            await self._serve(loop, run, executor, batch, max_wait_s)
        finally:
            self._lanes -= 1

    async def _serve(self, loop: asyncio.AbstractEventLoop, run: Callable[[list[I], Any], list[O]],
                     executor: Executor | None, batch: int, max_wait_s: float) -> None:
        while True:
            gated = False
            if not self._pending:
                gated = bool(self._low) and not self._low_may_start(batch)
                if gated or not self._low:
                    self._idle += 1
                    try:
                        self._wake.clear()
                        if gated:  # low items wait for their turn: look again when the gate may have opened
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._wake.wait(), self._gate_wait_s())
                        else:
                            await self._wake.wait()
                    finally:
                        self._idle -= 1
                    continue
            if max_wait_s > 0 and self._pending and len(self._pending) < batch:
                await self._fill(batch, max_wait_s)
            taken, low = self._take_next(batch)
            if not taken:
                continue
            self._live_running += not low
            self._low_running += low
            t0 = loop.time()
            try:
                ok = await self._run(loop, run, executor, taken)
            finally:
                self._live_running -= not low
                self._low_running -= low
                self._wake.set()  # a lane waiting for the low class's turn looks again
            if low and ok:
                n, dt = len(taken), loop.time() - t0
                self._low_s[n] = dt if n not in self._low_s else 0.7 * self._low_s[n] + 0.3 * dt

    async def _run(self, loop: asyncio.AbstractEventLoop, run: Callable[[list[I], Any], list[O]],
                   executor: Executor | None, taken: list[tuple[_Request[I, O], int]]) -> bool:
        try:
            outs = await loop.run_in_executor(executor, run, [r.items[i] for r, i in taken], taken[0][0].key)
        except asyncio.CancelledError:  # closed (unloaded): the callers of these items get the reason
            err = self.error or self._closed_error()
            for req in _requests(taken):
                req.fail(err)
            raise
        except Exception as e:  # noqa: BLE001 - handed to every waiting caller of the batch
            for req in _requests(taken):
                req.fail(e)
            return False
        self.batches += 1
        self.batch_sizes.append(len(taken))
        for (req, i), out in zip(taken, outs):
            req.outs[i] = out
            req.left -= 1
            if req.left == 0 and not req.future.done():
                req.future.set_result(req.outs)
        return True

    def _live_active(self) -> bool:
        return loop_time() - self._live_t < self.LIVE_IDLE_S

    def _low_may_start(self, batch: int) -> bool:
        """Whether a batch of low items may start now (no live item waits): always once live items stopped coming;
        while they come, when no live batch is under way, another lane is left free for live items (when there are
        several), and the batch fits before the next live item is due."""
        if not self._low:
            return False
        if not self._live_active():
            return True
        if self._live_running or self._low_running >= max(1, self._lanes - 1):
            return False
        now = loop_time()
        return now + self._low_s.get(self._low_cap(batch), 0.0) + self.DUE_MARGIN_S <= self.next_due(now)

    def _gate_wait_s(self) -> float:
        """How long a lane held back by the gate waits before it looks again (unless woken by a batch's end or an
        arrival): until the next live item is due or late, at most 50 ms."""
        now = loop_time()
        due = self.next_due(now)
        return max(0.002, min(0.05, due - now + 0.002 if due > now else self.LATE_S))

    def _low_owed(self) -> bool:
        """Whether one more low item keeps the low class within its share of the items taken lately."""
        live, low = self._taken
        return low + 1 <= self.low_share * (live + low + 1) + 1e-9

    def _count(self, live: int, low: int) -> None:
        """Items taken while low items waited (what the low class's share is measured on)."""
        self._taken = [self._taken[0] + live, self._taken[1] + low]
        if sum(self._taken) > self.LOW_WINDOW:
            self._taken = [self._taken[0] / 2, self._taken[1] / 2]

    def _low_cap(self, batch: int) -> int:
        """Low items one batch may hold while live items keep coming."""
        return max(1, min(batch, int(self.low_share * batch + 0.999)))

    def _take_next(self, batch: int) -> tuple[list[tuple[_Request[I, O], int]], bool]:
        """The next batch, and whether it is a batch of low items alone."""
        jobs = bool(self._low)  # the share is measured over the items taken while jobs have items waiting
        if self._pending and not (jobs and self._low_owed()):
            taken = self._take(self._pending, batch)
            spare = min(batch - len(taken), self._low_cap(batch))
            low = self._take(self._low, spare, taken[0][0].key) if taken and spare > 0 and jobs else []
            if jobs:
                self._count(len(taken), len(low))
            return taken + low, False
        taken = self._take(self._low, self._low_cap(batch) if self._live_active() else batch)
        self._count(0, len(taken))
        return taken, True

    async def aclose(self, error: BaseException | None = None) -> None:
        """Fail waiting and later requests with `error` (default: the closed error). The lanes are the owner's
        tasks: it cancels them."""
        self.fail_all(error or self._closed_error())

    async def _fill(self, batch: int, max_wait_s: float) -> None:
        deadline = loop_time() + max_wait_s
        while len(self._pending) < batch:
            left = deadline - loop_time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _take(self, q: deque[tuple[_Request[I, O], int]], batch: int,
              key: Hashable | None = None) -> list[tuple[_Request[I, O], int]]:
        """Waiting items of `q` with the first one's key (or `key`): this lane's even share of them between the idle
        lanes (itself included), at most `batch`. Items of other keys keep their place; the items of a request that
        is done (it failed, `admit` refused one of its items, or its caller was cancelled: a job cancelled, a
        predict request gone) leave the queue here (else a queue of only such items would give an empty batch and
        the lane would look again at once, forever, never letting the event loop run)."""
        if any(req.future.done() for req, _ in q):
            keep = [x for x in q if not x[0].future.done()]
            q.clear()
            q.extend(keep)
        matching = 0
        cap = batch * (self._idle + 1)
        for req, _ in q:
            if req.future.done():
                continue
            if key is None:
                key = req.key
            if req.key == key:
                matching += 1
                if matching == cap:
                    break
        share = min(batch, -(-matching // (self._idle + 1)))
        taken: list[tuple[_Request[I, O], int]] = []
        rest: deque[tuple[_Request[I, O], int]] = deque()
        while q and len(taken) < share:
            req, i = q.popleft()
            if req.future.done():
                continue
            if req.key != key:
                rest.append((req, i))
                continue
            if self._admit is not None:
                try:
                    self._admit(req.items[i])
                except Exception as e:  # noqa: BLE001 - that request's answer
                    req.fail(e)
                    continue
            taken.append((req, i))
        rest.extend(q)
        q.clear()
        q.extend(rest)
        return taken


def _requests(taken: list[tuple[_Request[Any, Any], int]]) -> list[_Request[Any, Any]]:
    return list({id(r): r for r, _ in taken}.values())


def loop_time() -> float:
    return asyncio.get_running_loop().time()

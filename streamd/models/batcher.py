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

Two priority classes: live items (streams, predict requests) and `low` ones (jobs, `submit(..., low=True)`). Live
items go first: low items fill the spare slots of a batch that live items leave (at most `low_share` of it), and a
batch of low items alone starts only when no live item waits. While live items keep coming (one submitted within
`LIVE_IDLE_S`) low batches are small (`low_share` of `batch`, at least one item) and leave one lane to the live
class when there are several (a live item arriving finds a lane free instead of waiting for a job's forward pass);
with no live item for `LIVE_IDLE_S` low items take every lane and whole batches. A job lane (`lane(...,
low_only=True)`, a detector's CPU lane in a thread of lower OS priority) serves low items alone: while there is one,
the other lanes stay free for live items (low items only after LIVE_IDLE_S). So that jobs still progress under
load, when both classes have items waiting, low items are taken ahead of live ones while they have had less than
`low_share` of the items taken lately (about `LOW_WINDOW` items).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
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

    def __init__(self, closed_error: Callable[[], BaseException],
                 admit: Callable[[I], None] | None = None, low_share: float = 0.25):
        self._closed_error = closed_error  # the error of a request the batcher could not serve (unloaded)
        self._admit = admit
        self._pending: deque[tuple[_Request[I, O], int]] = deque()  # live (request, item index), in arrival order
        self._low: deque[tuple[_Request[I, O], int]] = deque()  # the low class's (jobs)
        self.low_share = low_share
        self._taken = [0.0, 0.0]  # items taken lately while both classes had items waiting: live, low
        self._live_t = float("-inf")  # loop time the latest live item was submitted
        self._wake = asyncio.Event()
        self._idle = 0  # lanes waiting for items
        self._lanes = 0  # lanes serving
        self._low_lanes = 0  # lanes (not job lanes) running a batch of low items now
        self._job_lanes = 0  # lanes serving low items alone (see `lane`)
        self.error: BaseException | None = None  # closed (or could not be set up): every request fails with it
        self.batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # the latest batches' sizes

    @property
    def waiting(self) -> int:
        """Items queued, not yet in a batch."""
        return len(self._pending) + len(self._low)

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

    async def submit(self, items: list[I], key: Hashable, low: bool = False) -> list[O]:
        """The outputs of `items` (run with `key`), in order. `low`: a job's, the lower priority class."""
        if self.error is not None:
            raise self.error
        if not items:
            return []
        loop = asyncio.get_running_loop()
        req: _Request[I, O] = _Request(items, key, loop.create_future())
        (self._low if low else self._pending).extend((req, i) for i in range(len(items)))
        if not low:
            self._live_t = loop.time()
        self._wake.set()
        return await req.future

    def fail_all(self, err: BaseException) -> None:
        """Every waiting request fails with `err`, and every later one (the batcher cannot serve)."""
        self.error = err
        for q in (self._pending, self._low):
            while q:
                q.popleft()[0].fail(err)

    async def lane(self, run: Callable[[list[I], Any], list[O]], executor: Executor | None, batch: int,
                   max_wait_s: float = 0.0, low_only: bool = False) -> None:
        """Serve batches of up to `batch` items until cancelled (see the module's docstring). `low_only`: a job
        lane, serving low items alone (in a thread of lower OS priority): while it is there, the other lanes take
        low items only when no live item came for LIVE_IDLE_S (or the low class is owed its share)."""
        loop = asyncio.get_running_loop()
        if low_only:
            self._job_lanes += 1
        else:
            self._lanes += 1
        try:
            while True:
                if not (self._low if low_only else self._pending or self._low_may_start()):
                    self._idle += not low_only
                    try:
                        self._wake.clear()
                        await self._wake.wait()
                    finally:
                        self._idle -= not low_only
                    continue
                if max_wait_s > 0 and not low_only and self._pending and len(self._pending) < batch:
                    await self._fill(batch, max_wait_s)
                taken, low = self._take_low(batch) if low_only else self._take_next(batch)
                if not taken:
                    continue
                self._low_lanes += low and not low_only
                try:
                    await self._run(loop, run, executor, taken)
                finally:
                    self._low_lanes -= low and not low_only
                    if low:
                        self._wake.set()  # a lane held back for the low class's turn may start one now
        finally:
            if low_only:
                self._job_lanes -= 1
            else:
                self._lanes -= 1

    async def _run(self, loop: asyncio.AbstractEventLoop, run: Callable[[list[I], Any], list[O]],
                   executor: Executor | None, taken: list[tuple[_Request[I, O], int]]) -> None:
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
            return
        self.batches += 1
        self.batch_sizes.append(len(taken))
        for (req, i), out in zip(taken, outs):
            req.outs[i] = out
            req.left -= 1
            if req.left == 0 and not req.future.done():
                req.future.set_result(req.outs)

    def _live_active(self) -> bool:
        return loop_time() - self._live_t < self.LIVE_IDLE_S

    def _low_may_start(self) -> bool:
        """Whether a lane that serves both classes may start a batch of low items now (no live item waits)."""
        if not self._low:
            return False
        if not self._live_active():
            return True
        return not self._job_lanes and self._low_lanes < max(1, self._lanes - 1)

    def _low_owed(self) -> bool:
        """Whether one more low item keeps the low class within its share of the items taken lately."""
        live, low = self._taken
        return low + 1 <= self.low_share * (live + low + 1) + 1e-9

    def _count(self, live: int, low: int) -> None:
        """Items taken while both classes had items waiting (what the low class's share is measured on)."""
        self._taken = [self._taken[0] + live, self._taken[1] + low]
        if sum(self._taken) > self.LOW_WINDOW:
            self._taken = [self._taken[0] / 2, self._taken[1] / 2]

    def _low_cap(self, batch: int) -> int:
        """Low items one batch may hold while live items keep coming."""
        return max(1, min(batch, int(self.low_share * batch + 0.999)))

    def _take_next(self, batch: int) -> tuple[list[tuple[_Request[I, O], int]], bool]:
        """The next batch, and whether it is a batch of low items alone."""
        both = bool(self._pending) and bool(self._low)
        if self._pending and not (both and self._low_owed()):
            taken = self._take(self._pending, batch)
            spare = min(batch - len(taken), self._low_cap(batch))
            low = self._take(self._low, spare, taken[0][0].key) if taken and spare > 0 and self._low else []
            if both:
                self._count(len(taken), len(low))
            return taken + low, False
        return self._take_low(batch)

    def _take_low(self, batch: int) -> tuple[list[tuple[_Request[I, O], int]], bool]:
        both = bool(self._pending) and bool(self._low)
        taken = self._take(self._low, self._low_cap(batch) if self._live_active() else batch)
        if both:
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
        lanes (itself included), at most `batch`. Items of other keys keep their place; a request that failed (or
        whose item `admit` refused) has its other items skipped."""
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

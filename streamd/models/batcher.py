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
    def __init__(self, closed_error: Callable[[], BaseException],
                 admit: Callable[[I], None] | None = None):
        self._closed_error = closed_error  # the error of a request the batcher could not serve (unloaded)
        self._admit = admit
        self._pending: deque[tuple[_Request[I, O], int]] = deque()  # (request, item index), in arrival order
        self._wake = asyncio.Event()
        self._idle = 0  # lanes waiting for items
        self.error: BaseException | None = None  # closed (or could not be set up): every request fails with it
        self.batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # the latest batches' sizes

    @property
    def waiting(self) -> int:
        """Items queued, not yet in a batch."""
        return len(self._pending)

    def first_key(self) -> Hashable | None:
        """The key of the oldest waiting item (None when nothing waits)."""
        return self._pending[0][0].key if self._pending else None

    async def wait_for_items(self) -> None:
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()

    async def submit(self, items: list[I], key: Hashable) -> list[O]:
        if self.error is not None:
            raise self.error
        if not items:
            return []
        req: _Request[I, O] = _Request(items, key, asyncio.get_running_loop().create_future())
        self._pending.extend((req, i) for i in range(len(items)))
        self._wake.set()
        return await req.future

    def fail_all(self, err: BaseException) -> None:
        """Every waiting request fails with `err`, and every later one (the batcher cannot serve)."""
        self.error = err
        while self._pending:
            self._pending.popleft()[0].fail(err)

    async def lane(self, run: Callable[[list[I], Any], list[O]], executor: Executor | None, batch: int,
                   max_wait_s: float = 0.0) -> None:
        """Serve batches of up to `batch` items until cancelled (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._idle += 1
                try:
                    await self.wait_for_items()
                finally:
                    self._idle -= 1
                continue
            if max_wait_s > 0 and len(self._pending) < batch:
                await self._fill(batch, max_wait_s)
            taken = self._take(batch)
            if not taken:
                continue
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
                continue
            self.batches += 1
            self.batch_sizes.append(len(taken))
            for (req, i), out in zip(taken, outs):
                req.outs[i] = out
                req.left -= 1
                if req.left == 0 and not req.future.done():
                    req.future.set_result(req.outs)

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

    def _take(self, batch: int) -> list[tuple[_Request[I, O], int]]:
        """Waiting items with the first one's key: this lane's even share of them between the idle lanes (itself
        included), at most `batch`. Items of other keys keep their place; a request that failed (or whose item
        `admit` refused) has its other items skipped."""
        key = None
        matching = 0
        cap = batch * (self._idle + 1)
        for req, _ in self._pending:
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
        while self._pending and len(taken) < share:
            req, i = self._pending.popleft()
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
        rest.extend(self._pending)
        self._pending = rest
        return taken


def _requests(taken: list[tuple[_Request[Any, Any], int]]) -> list[_Request[Any, Any]]:
    return list({id(r): r for r, _ in taken}.values())


def loop_time() -> float:
    return asyncio.get_running_loop().time()

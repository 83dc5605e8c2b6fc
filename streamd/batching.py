"""Bounded queues with named drop policies, a fair fan-in across streams, and batch-by-size-or-timeout.

FrameQueue is fed either from a decoder thread (`put_threadsafe`) or from the event loop (`put`), and read on
the loop. `drop_oldest` never blocks the producer and counts every drop; `wait` blocks the producer instead.
Threads hand items to the loop through a Doorbell, shared by the queues of one daemon, so a steady flow of frames
wakes the loop once per burst (per tick) rather than once per frame.
Ingress reads many FrameQueues round-robin, so one busy or stalled stream never holds back another. Queues attached
as `low` (jobs: streamd/jobs/) are a lower priority class: their items fill what live streams leave of a batch, at
most `low_share` of it while live streams are attached, and at least `low_share` of the items taken over time when
both have items (so jobs still progress under load).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from streamd.config import DropPolicy
from streamd.frames import EndOfStream

T = TypeVar("T")

# while frames keep coming, the loop collects what decoder threads put every FRAME_TICK_S instead of being woken
# for each frame: at most this much added latency, for far fewer wake-ups (see Doorbell)
FRAME_TICK_S = 0.01
# ... but only while frames come faster than this (all decoder threads together): below it, waking the loop for
# each frame costs little (a wake-up is tens of microseconds) and every frame is handed over at once
FRAME_BUSY_RATE = 300.0


class QueueClosed(Exception):
    """The queue was closed and is empty."""


class Doorbell:
    """Hands calls from producer threads to the event loop, in order. While calls come faster than `busy_rate` a
    second, the loop collects them every `tick_s` instead of being woken for each: waking a sleeping loop (a
    self-pipe write, a context switch, the GIL changing hands) costs far more than handing it several frames at
    once. Slower than that, and for the first call after a quiet spell, every call wakes the loop at once, so a
    few live cameras get their frames handed over without waiting for a tick. With tick_s 0, every collection is
    a wake-up. The rate is measured over windows of at least `RATE_WINDOW_S`."""

    RATE_WINDOW_S = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = 0.0, busy_rate: float = 0.0):
        self._loop = loop
        self._tick_s = tick_s
        self._busy_rate = busy_rate
        self._busy = busy_rate <= 0  # ticking while calls keep coming (with a rate: once it is measured)
        self._window_t0 = loop.time()
        self._window_n = 0  # calls collected in the current window
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[Any], None], Any]] = []
        self._scheduled = False  # a collection is on its way: a wake-up or the next tick
        self._hurried = False  # a wake-up is on its way, ahead of the next tick
        self._tick: asyncio.TimerHandle | None = None

    def post(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """From any thread: `fn(arg)` is called on the loop, after the calls posted before it. False when the loop
        is closed."""
        if self._loop.is_closed():
            return False
        with self._lock:
            self._calls.append((fn, arg))
            if self._scheduled:
                return True
            self._scheduled = True
        return self._wake()

    def hurry(self) -> None:
        """From a thread about to wait for the loop (a full `wait` queue): collect now, not at the next tick."""
        with self._lock:
            if not self._calls or self._hurried:
                return
            self._hurried = True
        self._wake()

    def _wake(self) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._collect)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _collect(self, ticked: bool = False) -> None:
        if self._tick is not None:  # a hurried collection replaces the tick
            self._tick.cancel()
        with self._lock:
            calls, self._calls = self._calls, []
            if self._busy_rate > 0:
                self._window_n += len(calls)
                now = self._loop.time()
                if now - self._window_t0 >= self.RATE_WINDOW_S:
                    self._busy = self._window_n >= self._busy_rate * (now - self._window_t0)
                    self._window_t0, self._window_n = now, 0
            # still flowing, and fast: collect again on the next tick
            tick = bool(calls) and self._tick_s > 0 and self._busy
            self._scheduled, self._hurried = tick, False
        # the first tick after a wake-up comes sooner: it catches the rest of a burst (cameras in step)
        delay_s = self._tick_s if ticked else self._tick_s / 4
        self._tick = self._loop.call_later(delay_s, self._collect, True) if tick else None
        for fn, arg in calls:
            try:
                fn(arg)
            except Exception as e:  # noqa: BLE001 - reported like a failing loop callback; the others still run
                self._loop.call_exception_handler({"message": "Doorbell call failed", "exception": e})


class FrameQueue(Generic[T]):
    def __init__(
        self,
        maxsize: int,
        policy: DropPolicy,
        loop: asyncio.AbstractEventLoop,
        on_drop: Callable[[T], None] | None = None,
        on_put: Callable[[T], None] | None = None,
        doorbell: Doorbell | None = None,
    ):
        self.maxsize = maxsize
        self.policy = policy
        self._loop = loop
        self._items: deque[T] = deque()
        self._on_drop = on_drop
        self._on_put = on_put  # called on the loop for every item queued
        self._doorbell = doorbell or Doorbell(loop)
        self._slots = threading.Semaphore(maxsize) if policy is DropPolicy.WAIT else None
        self._space = asyncio.Event()
        self._closed = False
        self._nonempty = asyncio.Event()
        self._listeners: list[asyncio.Event] = [self._nonempty]
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def set_policy(self, policy: DropPolicy) -> None:
        """Loop side, while no producer thread is putting: change the drop policy (an HLS playlist that turns out
        to be a recording keeps every frame)."""
        if policy is self.policy:
            return
        self.policy = policy
        self._slots = threading.Semaphore(max(0, self.maxsize - len(self._items))) \
            if policy is DropPolicy.WAIT else None

    def add_listener(self, event: asyncio.Event) -> None:
        self._listeners.append(event)

    def remove_listener(self, event: asyncio.Event) -> None:
        if event in self._listeners:
            self._listeners.remove(event)

    # -- producer side -------------------------------------------------------------------------------------
    async def put(self, item: T) -> None:
        """Loop side. `wait`: waits for space; `drop_oldest`: never waits."""
        if self._slots is not None:
            while not self._slots.acquire(blocking=False):
                if self._closed:
                    raise QueueClosed
                self._space.clear()
                await self._space.wait()
        self._append(item)

    def put_threadsafe(self, item: T, stop: threading.Event) -> bool:
        """From a producer thread. `wait`: blocks this thread until there is space or `stop` is set.
        Returns False when the item was not queued (stopping or closed). An item whose `stop` is set before the
        loop takes it is discarded: a closed source's last frames never reach the stream."""
        if self._slots is not None and not self._slots.acquire(blocking=False):
            self._doorbell.hurry()  # the items taking the room may be waiting for the next tick
            while not self._slots.acquire(timeout=0.1):
                if stop.is_set() or self._closed:
                    return False
        if self._closed:
            return False
        return self._doorbell.post(self._arrive, (item, stop))

    def call_threadsafe(self, fn: Callable[[Any], None], arg: Any) -> None:
        """From a producer thread: call `fn(arg)` on the loop once the items it put before are queued, without
        waiting for the next tick (a source that ends says so at once)."""
        if self._doorbell.post(fn, arg):
            self._doorbell.hurry()

    def _arrive(self, entry: tuple[T, threading.Event]) -> None:
        item, stop = entry
        if not stop.is_set():
            self._append(item)
        elif self._slots is not None:
            self._slots.release()

    def _append(self, item: T) -> None:
        if self._closed:
            return
        if self._slots is None and len(self._items) >= self.maxsize:
            old = self._items.popleft()
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(old)
        self._items.append(item)
        if self._on_put is not None:
            self._on_put(item)
        for ev in self._listeners:
            ev.set()

    # -- consumer side -------------------------------------------------------------------------------------
    def get_nowait(self) -> T | None:
        if not self._items:
            return None
        item = self._items.popleft()
        if self._slots is not None:
            self._slots.release()
        self._space.set()
        return item

    async def get(self) -> T:
        """Next item, waiting for one. Raises QueueClosed once closed and drained."""
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            if self._closed:
                raise QueueClosed
            self._nonempty.clear()
            await self._nonempty.wait()

    def close_threadsafe(self) -> None:
        self.call_threadsafe(lambda _: self.close(), None)

    def close(self) -> None:
        """No more items will be accepted; items already queued can still be read."""
        self._closed = True
        self._space.set()
        for ev in self._listeners:
            ev.set()


class Ingress(Generic[T]):
    """Fan-in of many per-stream queues, read fairly (round-robin) in batches. A queue that is closed and drained
    leaves the fan-in with an `EndOfStream(key)` in the batch, after its last item.

    Queues attached with `low=True` (jobs) are a lower priority class. While live queues are attached, low items
    take at most `low_share` of a batch's slots (at least one): a batch of job frames never holds a live frame back
    for long. They take a slot when no live item is ready, or ahead of live items while the low class has had less
    than `low_share` of the items taken lately (measured over about LOW_WINDOW items): under load, jobs still
    progress at that share. With no live queue attached, low items fill whole batches."""

    LOW_WINDOW = 256

    def __init__(self, low_share: float = 0.25) -> None:
        self._queues: dict[FrameQueue[T], str] = {}  # queue -> its stream (a stream id may have an old and a new one)
        self._low: dict[FrameQueue[T], str] = {}  # the lower priority class (jobs)
        self.low_share = low_share
        self._taken = [0.0, 0.0]  # items taken lately (halved past LOW_WINDOW): live, low
        self._ready = asyncio.Event()
        self._closed = False

    def attach(self, key: str, q: FrameQueue[T], low: bool = False) -> None:
        (self._low if low else self._queues)[q] = key
        q.add_listener(self._ready)
        self._ready.set()

    def detach(self, q: FrameQueue[T]) -> None:
        if self._queues.pop(q, None) is not None or self._low.pop(q, None) is not None:
            q.remove_listener(self._ready)

    def depth(self) -> int:
        return sum(len(q) for q in self._queues) + sum(len(q) for q in self._low)

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def _count(self, low: bool, n: int) -> None:
        self._taken[low] += n
        if self._taken[0] + self._taken[1] > self.LOW_WINDOW:
            self._taken = [self._taken[0] / 2, self._taken[1] / 2]

    def _low_cap(self, max_batch: int) -> int:
        """Low items one batch may hold."""
        if not self._queues:
            return max_batch
        return max(1, min(max_batch, int(self.low_share * max_batch + 0.999)))

    def _take_from(self, queues: dict[FrameQueue[T], str], out: list[Any], limit: int) -> int:
        """One round over `queues`: at most one item of each, up to `limit` items. Returns how many were taken."""
        n = 0
        for q, key in list(queues.items()):
            if n >= limit:
                break
            item = q.get_nowait()
            if item is not None:
                out.append(item)
                n += 1
            elif q.closed:  # its last item was taken before: the stream ends here
                self.detach(q)
                out.append(EndOfStream(key, q))
                n += 1
        return n

    def _take_round(self, out: list[Any], max_batch: int, low_taken: list[int]) -> bool:
        cap = self._low_cap(max_batch)
        took = 0
        if self._low and low_taken[0] < cap and self._low_owed():  # its minimum share, ahead of live items
            n = self._take_from(self._low, out, min(1, max_batch - len(out)))
            low_taken[0] += n
            self._count(True, n)
            took += n
        n = self._take_from(self._queues, out, max_batch - len(out))
        self._count(False, n)
        took += n
        if not n and self._low and low_taken[0] < cap:  # no live item ready: spare capacity
            n = self._take_from(self._low, out, min(cap - low_taken[0], max_batch - len(out)))
            low_taken[0] += n
            self._count(True, n)
            took += n
        return took > 0

    def _low_owed(self) -> bool:
        live, low = self._taken
        return low < self.low_share * (live + low)

    async def get_batch(self, max_batch: int, max_wait_s: float = 0.0) -> list[T | EndOfStream]:
        """Wait for at least one item, then take up to `max_batch` round-robin; wait up to `max_wait_s` more for
        a fuller batch. Raises QueueClosed once closed and drained."""
        out: list[Any] = []
        low_taken = [0]
        while not out:
            self._ready.clear()
            while len(out) < max_batch and self._take_round(out, max_batch, low_taken):
                pass
            if out:
                break
            if self._closed:
                raise QueueClosed
            await self._ready.wait()
        if len(out) < max_batch and max_wait_s > 0:
            deadline = time.monotonic() + max_wait_s
            while len(out) < max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._ready.clear()
                if not self._take_round(out, max_batch, low_taken):
                    try:
                        await asyncio.wait_for(self._ready.wait(), remaining)
                    except TimeoutError:
                        break
        return out


_SENTINEL = object()


class StageQueue(Generic[T]):
    """Bounded queue between two stages (always `wait`), closed with a sentinel."""

    def __init__(self, maxsize: int):
        self._q: asyncio.Queue[object] = asyncio.Queue(maxsize)

    def qsize(self) -> int:
        return self._q.qsize()

    async def put(self, item: T) -> None:
        await self._q.put(item)

    async def close(self) -> None:
        await self._q.put(_SENTINEL)

    async def get_batch(self, max_batch: int, max_wait_s: float = 0.0) -> list[T]:
        """Up to `max_batch` items, waiting up to `max_wait_s` after the first. Raises QueueClosed at the end."""
        first = await self._q.get()
        if first is _SENTINEL:
            raise QueueClosed
        out: list[T] = [first]  # type: ignore[list-item]
        deadline = time.monotonic() + max_wait_s
        while len(out) < max_batch:
            try:
                item = self._q.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._q.get(), remaining)
                except TimeoutError:
                    break
            if item is _SENTINEL:
                self._q.put_nowait(_SENTINEL)  # re-arm: the next call raises QueueClosed
                break
            out.append(item)  # type: ignore[arg-type]
        return out

"""The source contracts. A source is one of:

- `Source`, pulled: an async iterator of frozen Frames plus `aclose()`; the stream's runner moves each frame into
  the stream's queue (the Redis source, whose reads are awaited on the loop anyway);
- `PushSource`, pushing: a decoder thread puts its frames straight into the stream's queue, given when it is made
  (PyAV). A frame reaches the pipeline in one hop and the loop wakes once per burst of frames, not twice per frame.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from streamd.frames import Frame

# publishes an event on the stream's events stream: (event type, fields)
EventFn = Callable[[str, dict[str, Any]], None]


class Source(Protocol):
    """Iterating yields sampled frames in order; it ends at a clean end of input (a file without `loop`) and
    raises SourceError when the source fails. `aclose()` stops it and releases what it holds."""

    def __aiter__(self) -> "Source": ...

    async def __anext__(self) -> Frame: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class PushSource(Protocol):
    """Puts sampled frames, in order, into the stream's queue from its own thread. `ended` resolves at a clean
    end of input (a file without `loop`) or with the SourceError that ended it; `idle_s` is how long it has gone
    without a frame (waiting for room in a full `wait` queue does not count): the runner's stall watchdog reads
    it. `aclose()` stops it; frames it put that the loop has not taken yet are discarded."""

    ended: asyncio.Future[None]
    frames_decoded: int

    @property
    def idle_s(self) -> float: ...

    async def aclose(self) -> None: ...


class Settlement:
    """A stream's input entries handed to the pipeline and not settled yet (Redis entries), and the handle every
    such frame carries in its `InputRef`: the sink calls `settled` once the entry is acknowledged (or will be
    delivered again), the pipeline awaits `fail` when a stage failed on it. It outlives the input's connections:
    a reconnected input does not read again what is still in the pipeline. `source` is the connection that
    decides what a failure means (retry, or dead-letter after its deliveries)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self.source: Any = None  # the input open now (with `async fail(ref, reason)`, `async skip(ref)`), or None
        self._skips: set[asyncio.Task[None]] = set()

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, entry_id: str) -> None:
        self._ids.add(entry_id)

    def discard(self, entry_id: str) -> None:
        self._ids.discard(entry_id)

    def settled(self, ref: Any) -> None:
        self._ids.discard(ref.entry_id)

    async def fail(self, ref: Any, reason: str) -> None:
        if self.source is None:  # the input is gone: Redis delivers the entry again to whoever reads it
            self._ids.discard(ref.entry_id)
            return
        await self.source.fail(ref, reason)

    def dropped(self, ref: Any) -> None:
        """The stream's queue dropped the frame (`drop_oldest`, chosen for this input): the entry is skipped on
        purpose, acknowledged without a result like a frame the sampler left out."""
        self._ids.discard(ref.entry_id)
        if self.source is not None:
            task = asyncio.ensure_future(self.source.skip(ref))
            self._skips.add(task)
            task.add_done_callback(self._skips.discard)


class Abandoned:
    """Decoder threads given up on by `aclose()` (stuck in an FFmpeg call) that have not returned yet. Each one
    returns by itself within its read/open timeout; a stream does not start another connection while it has
    `MAX_PER_STREAM` of them (so a blocking input cannot pile up threads)."""

    MAX_PER_STREAM = 2
    _threads: dict[str, list[threading.Thread]] = {}
    total = 0  # ever abandoned

    @classmethod
    def add(cls, stream_id: str, thread: threading.Thread) -> None:
        cls._threads.setdefault(stream_id, []).append(thread)
        cls.total += 1

    @classmethod
    def alive(cls, stream_id: str | None = None) -> int:
        for k in list(cls._threads):
            cls._threads[k] = [t for t in cls._threads[k] if t.is_alive()]
            if not cls._threads[k]:
                del cls._threads[k]
        if stream_id is not None:
            return len(cls._threads.get(stream_id, ()))
        return sum(len(v) for v in cls._threads.values())

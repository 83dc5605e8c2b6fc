"""One model of the catalog (`Entry`: its state, memory, users) and a stage's handle on it (`ModelRef`).

Who uses a model: every `ModelRef` a stage holds (its stages), and the streams whose frames went through it and
have not left (their stage called `drop_stream`). A model is *in use* while a stream uses it or a call is running
(`active`); otherwise it is idle, and its idle time counts from its last call or the moment its last stream left.
"""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamd.models.memory import Footprint
from streamd.models.spec import PINNED, ModelSpec

if TYPE_CHECKING:
    import asyncio

    from streamd.models.errors import ModelError
    from streamd.models.manager import ModelManager


class State(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(eq=False)
class Entry:
    name: str
    spec: ModelSpec
    origin: str  # declared (models.catalog), alias, pipeline (a source a pipeline named)
    keep_alive_s: float
    state: State = State.UNLOADED
    reason: str | None = None  # why it failed, or why it was last unloaded
    error: "ModelError | None" = None  # the failed load's error, raised again to callers until a retry
    failed_at: float = 0.0  # monotonic
    device: str | None = None  # resolved (auto -> cpu / cuda:0) on first use
    obj: Any = None  # the loaded model (its shared batcher), while ready
    footprint: Footprint | None = None
    memory_bytes: int = 0  # held now (0 unless ready, loading counts its estimate in `reserved`)
    reserved: int = 0  # bytes set aside for a load under way (the estimate)
    last_bytes: int | None = None  # the last load's figure: the estimate of the next load
    load_seconds: float | None = None
    loaded_at: float | None = None  # wall clock
    last_used: float | None = None  # wall clock: the end of the last call, or the last stream leaving
    idle_since: float = field(default_factory=time.monotonic)
    refs: set["ModelRef"] = field(default_factory=set)
    active: int = 0  # calls running now
    loads: int = 0
    task: "asyncio.Task[None] | None" = None  # the load or unload under way
    version: str | None = None  # while loaded: a content hash of its weights (streamd.models.version)
    version_method: str | None = None  # file, folder or weights (what was hashed), none

    @property
    def pinned(self) -> bool:
        return self.keep_alive_s == PINNED

    def streams(self) -> list[str]:
        return sorted({s for r in self.refs for s in r.streams})

    def in_use(self) -> bool:
        return self.active > 0 or any(r.streams for r in self.refs)

    def held(self) -> int:
        return self.memory_bytes + self.reserved

    def touch(self) -> None:
        self.last_used = time.time()
        self.idle_since = time.monotonic()

    def users(self) -> dict[str, list[str]]:
        return {"stages": sorted({r.label for r in self.refs}), "streams": self.streams()}

    def precision(self) -> str:
        p = getattr(self.obj, "precision", None)  # what a detector runs at, once its first request set it up
        return p if isinstance(p, str) else self.spec.precision

    def info(self) -> dict[str, Any]:
        fp = self.footprint
        return {
            "name": self.name, "source": self.spec.source, "kind": self.spec.kind, "origin": self.origin,
            "state": self.state.value, "reason": self.reason,
            "device": self.device or self.spec.device, "precision": self.precision(),
            "memory_bytes": self.memory_bytes, "memory_method": fp.method if fp else None,
            "host_rss_delta_bytes": fp.host_rss_delta_bytes if fp and self.state is State.READY else None,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
            "loaded_at": self.loaded_at, "last_used": self.last_used, "keep_alive_s": self.keep_alive_s,
            "pinned": self.pinned, "preload": self.spec.preload, "loads": self.loads, "users": self.users(),
            "version": self.version, "version_method": self.version_method,
        }

    def holder(self) -> dict[str, Any]:
        """What an insufficient_memory error says about a model holding memory."""
        return {"name": self.name, "state": self.state.value, "memory_bytes": self.held(), "pinned": self.pinned,
                "streams": self.streams(), "active": self.active}


class ModelRef:
    """A stage's handle on one model of the catalog. The model itself is never kept by the stage: `use()` lends
    it for one call (loading it first if it is not loaded), so the manager can unload it between calls."""

    def __init__(self, manager: "ModelManager", entry: Entry, label: str,
                 fail_stream: Callable[[str, str], None]):
        self._manager = manager
        self.entry = entry
        self.label = label  # "<pipeline>.<stage>" as the catalog lists it
        self.fail_stream = fail_stream
        self.streams: set[str] = set()
        self.revoked: dict[str, str] = {}  # stream -> why: the model was unloaded by force under it
        self.closed = False
        entry.refs.add(self)

    @property
    def name(self) -> str:
        return self.entry.name

    @asynccontextmanager
    async def use(self, streams: Iterable[str] = ()) -> AsyncIterator[Any]:
        """The loaded model for one call on behalf of `streams` (they become its users until `drop_stream`)."""
        e = self.entry
        e.active += 1
        try:
            obj = await self._manager.ready(e)
            self.hold(streams)
            yield obj
        finally:
            e.active -= 1
            e.touch()
            self._manager.wake()

    def serviceable(self, works: Iterable[Any]) -> list[Any]:
        """The works (frames) of `works` this model may serve: a frame of a stream the model was unloaded under by
        force gets that reason as its error and is left out (its frames still in the queues fail the same way)."""
        todo = []
        for w in works:
            why = self.revoked.get(w.frame.stream_id)
            if why is not None:
                w.error = why
            else:
                todo.append(w)
        return todo

    def hold(self, streams: Iterable[str]) -> None:
        """These streams use the model (until `drop_stream`): it stays loaded for them."""
        self.streams.update(s for s in streams if s not in self.revoked)

    def drop_stream(self, stream_id: str) -> None:
        """The stream left (removed, ended): it no longer holds the model."""
        self.revoked.pop(stream_id, None)
        if stream_id in self.streams:
            self.streams.discard(stream_id)
            if not self.entry.in_use():
                self.entry.touch()
            self._manager.wake()

    def close(self) -> None:
        """The stage is torn down."""
        if self.closed:
            return
        self.closed = True
        self.streams.clear()
        self.entry.refs.discard(self)
        self.entry.touch()
        self._manager.wake()

"""The model manager: the catalog of models (declared in `models.catalog`, the aliases, and the sources pipelines
name), each loaded on first use and unloaded when idle for its `keep_alive_s`, within a memory budget per device.

- Loading and unloading run on the device's executor thread (`streamd.models.executors`), never on the event
  loop; concurrent callers of a model that is loading wait for that one load.
- Before a load, the model's expected size (its last measured size, else its weights' size on disk) must fit the
  device's budget: idle models are unloaded, least recently used first, until it does; a model in use, loading or
  pinned is never unloaded for it. If it cannot fit: `InsufficientMemory`, naming what holds the memory. After the
  load the measured size is checked the same way (a first load has no estimate).
- An idle model is unloaded `keep_alive_s` after its last use (a background task; -1: pinned).
- `unload(name)` refuses a model in use (`ModelInUse`) unless `force`: then the streams using it fail with the
  reason (their stage's `fail_stream`) and calls waiting on it fail.

Owned by the daemon (no process-global models). `ModelRegistry` is the same class under its older name.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

from streamd.errors import StageError
from streamd.log import get_logger, redact_text
from streamd.models import memory
from streamd.models.entry import Entry, ModelRef, State
from streamd.models.errors import (InsufficientMemory, ModelConflict, ModelError, ModelInUse, ModelLoadFailed,
                                   ModelRevoked, UnknownModel)
from streamd.models.sources import ALIAS_KINDS, ALIASES, resolve_device, source_bytes
from streamd.models.spec import BATCHING_OPTIONS, MODEL_NAME_PATTERN, ModelsConfig, ModelSpec, check_stage_model
from streamd.models.version import Versions
from streamd.models.executors import device_executor

log = get_logger("streamd.models")

# kind -> "module:function" building (load, wrap) for a spec: imported when a model of that kind first loads
LOADERS = {"detector": "streamd.stages.detector:model_loader", "segmenter": "streamd.stages.detector:model_loader",
           "vlm": "streamd.stages.vlm.transformers:model_loader",
           "sam2": "streamd.stages.segment.model:model_loader"}
# kind -> the libraries its loader imports (imported before the first such load, then frozen: memory.freeze_imports)
LIBRARIES = {"detector": ("ultralytics",), "segmenter": ("ultralytics",), "vlm": ("transformers",)}
RETRY_FAILED_S = 5.0  # a model whose load failed is tried again by the next call after this long


def _loader(kind: str) -> Callable[..., tuple[Callable[[], Any], Callable[[Any], Any]]]:
    module, _, attr = LOADERS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def _precision_key(spec: ModelSpec) -> str:
    if spec.kind == "vlm":
        return spec.precision
    return "half" if spec.precision in ("fp16", "bf16") else "full"


class ModelManager:
    def __init__(self, cfg: ModelsConfig | None = None, metrics: Any = None):
        self.cfg = cfg or ModelsConfig()
        self.metrics = metrics  # streamd.metrics.Metrics, or None
        self._entries: dict[str, Entry] = {}
        for name, spec in self.cfg.catalog.items():
            self._add(name, spec, "declared")
        for alias, kind in ALIAS_KINDS.items():
            if alias not in self._entries and alias in ALIASES:
                self._add(alias, ModelSpec(source=alias, kind=kind), "alias")  # type: ignore[arg-type]
        self._lock = asyncio.Lock()  # budget decisions: one at a time
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._preloads: set[asyncio.Task[Any]] = set()
        self._versions = Versions()  # weights hashes, cached per file
        self._closed = False

    def _add(self, name: str, spec: ModelSpec, origin: str) -> Entry:
        keep = spec.keep_alive_s if spec.keep_alive_s is not None else self.cfg.keep_alive_s
        e = self._entries[name] = Entry(name, spec, origin, keep)
        return e

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the idle-unload task and the preloads (`preload: true`), which run in the background."""
        self._start_reaper()
        for e in self._entries.values():
            if e.spec.preload:
                task = asyncio.create_task(self._preload(e), name=f"model-preload:{e.name}")
                self._preloads.add(task)
                task.add_done_callback(self._preloads.discard)

    async def _preload(self, e: Entry) -> None:
        try:
            await self.ready(e)
        except ModelError as err:
            log.error("model preload failed", model=e.name, error=str(err))

    async def aclose(self) -> None:
        self._closed = True
        for t in [self._reaper, *self._preloads]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in [self._reaper, *self._preloads] if t is not None), return_exceptions=True)
        for e in self._entries.values():
            if e.task is not None and not e.task.done():
                e.task.cancel()
            obj, e.obj = e.obj, None
            if obj is not None:
                await _close(obj, "the daemon is shutting down")
                self._count_unload(e, "shutdown")
            e.state, e.memory_bytes, e.reserved = State.UNLOADED, 0, 0

    def wake(self) -> None:
        self._wake.set()

    # -- the catalog ------------------------------------------------------------------------------------------
    def get_entry(self, name: str) -> Entry:
        e = self._entries.get(name)
        if e is None:
            raise UnknownModel(f"no model {name!r} in the catalog")
        return e

    def catalog(self) -> list[dict[str, Any]]:
        return [e.info() for e in sorted(self._entries.values(), key=lambda x: x.name)]

    def budgets(self) -> list[dict[str, Any]]:
        out = []
        for dev, b in sorted(self.cfg.budget.items()):
            held = sum(e.held() for e in self._entries.values() if e.device == dev)
            out.append({"device": dev, "budget": b, "budget_bytes": memory.budget_bytes(b, dev), "used_bytes": held})
        return out

    def loaded(self) -> list[dict[str, Any]]:
        """Ready models as the older registry listed them: model (its source), device, kind, what runs it."""
        out = []
        for e in self._entries.values():
            if e.state is State.READY:
                info = {"model": e.spec.source, "device": e.device,
                        "kind": "vlm" if e.spec.kind == "vlm" else "yolo"}
                describe = getattr(e.obj, "describe", None)
                if describe is not None:
                    info.update(describe())
                out.append(info)
        return out

    @property
    def _models(self) -> dict[str, Any]:
        """name -> the loaded model, for the ready ones."""
        return {e.name: e.obj for e in self._entries.values() if e.state is State.READY}

    def check_stage(self, stage: dict[str, Any], where: str) -> None:
        """A stage's model reference against the catalog (ConfigError naming `<where>.<key>`)."""
        check_stage_model(self.cfg, stage, where)

    def ref(self, model: str, implicit: ModelSpec, label: str,
            fail_stream: Callable[[str, str], None] = lambda sid, why: None) -> ModelRef:
        """A stage's handle on `model`: a declared name, or else the model `implicit` describes (an alias or a
        source with the stage's own device, precision and options), added to the catalog on first reference."""
        e = self._entries.get(model)
        if e is None or e.origin != "declared":
            e = self._implicit(implicit)
        return ModelRef(self, e, label, fail_stream)

    def _identity(self, spec: ModelSpec) -> tuple[Any, ...]:
        opts = tuple(sorted((k, repr(v)) for k, v in spec.typed_options().model_dump().items()
                            if k not in BATCHING_OPTIONS))
        return spec.source, spec.kind, resolve_device(spec.device), _precision_key(spec), opts

    def _implicit(self, spec: ModelSpec) -> Entry:
        ident = self._identity(spec)
        for e in self._entries.values():
            if e.origin != "declared" and self._identity(e.spec) == ident:
                if not e.refs and e.state in (State.UNLOADED, State.FAILED):
                    e.spec = spec  # nobody holds its batcher: the new user's batching options apply
                else:
                    check_batching(e, spec)
                return e
        base = spec.source if re.fullmatch(MODEL_NAME_PATTERN, spec.source) else \
            (re.sub(r"[^A-Za-z0-9_.:-]", "_", spec.source).lstrip("_.:-")[-100:] or "model")
        name = base
        if name in self._entries:
            name = f"{base[:120]}:{hashlib.sha1(repr(ident).encode()).hexdigest()[:6]}"
        return self._add(name, spec, "pipeline")

    # -- loading ------------------------------------------------------------------------------------------------
    async def load(self, name: str) -> Entry:
        """Load a model of the catalog by hand (POST /api/v1/models/{name}/load); returns it ready."""
        e = self.get_entry(name)
        if e.state is State.FAILED:
            e.failed_at = 0.0  # asked for: try again now
        await self.ready(e)
        e.touch()
        self.wake()
        return e

    async def ready(self, e: Entry) -> Any:
        """The loaded model of `e`, loading it first (or waiting for the load under way)."""
        while e.state is not State.READY:
            if self._closed:
                raise ModelError(f"model {e.name!r}: the model manager is closed")
            if e.state is State.FAILED and time.monotonic() - e.failed_at < RETRY_FAILED_S and e.error is not None:
                raise e.error
            if e.state in (State.UNLOADED, State.FAILED):
                e.state, e.reason = State.LOADING, None
                e.task = asyncio.create_task(self._load(e), name=f"model-load:{e.name}")
                self._start_reaper()
            task = e.task
            assert task is not None
            await asyncio.wait([task])  # its outcome is read from the entry (a waiter's cancellation stays its own)
            if e.state is State.LOADING and task.done():  # cancelled (the manager is closing)
                self._failed(e, ModelError(f"the load of model {e.name!r} was cancelled"), 0.0)
            if e.state is State.UNLOADING and task.done() and e.task is task:  # never spin on a finished task
                e.state = State.UNLOADED
            if e.state is State.FAILED and e.error is not None:
                raise e.error
        return e.obj

    async def _load(self, e: Entry) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            device = e.device = resolve_device(e.spec.device)
            load, wrap = _loader(e.spec.kind)(e.spec, device)
            if not any(x.obj is not None for x in self._entries.values()):  # no model loaded: none is frozen
                await loop.run_in_executor(device_executor(device), memory.freeze_imports,
                                           LIBRARIES.get(e.spec.kind, ()))
            estimate = e.last_bytes or source_bytes(e.spec.source) or 0
            async with self._lock:
                await self._make_room(e, device, estimate)
                e.reserved = estimate
            try:
                loaded, fp = await loop.run_in_executor(device_executor(device), memory.measure_load, load, device)
            finally:
                e.reserved = 0
            e.version, e.version_method = await self._version(e, loaded)
            e.obj = wrap(loaded)
            del loaded
            e.footprint, e.memory_bytes = fp, fp.bytes
            e.last_bytes = fp.bytes
            async with self._lock:
                try:
                    await self._make_room(e, device, fp.bytes)
                except InsufficientMemory:
                    await self._drop(e, "insufficient memory after the load")
                    raise
        except Exception as err:  # noqa: BLE001 - the entry records it; every waiter gets it
            self._failed(e, err, time.perf_counter() - t0)
            return
        e.load_seconds = time.perf_counter() - t0
        e.loaded_at = time.time()
        e.loads += 1
        e.state = State.READY
        e.touch()
        log.info("model loaded", model=e.name, device=e.device, bytes=e.memory_bytes, method=fp.method,
                 seconds=round(e.load_seconds, 3))
        m = self.metrics
        if m is not None:
            m.model_loads.labels(e.name, "ok").inc()
            m.model_load_seconds.labels(e.name).observe(e.load_seconds)
            m.model_memory.labels(e.name, e.device).set(e.memory_bytes)
        self.wake()

    async def _version(self, e: Entry, loaded: Any) -> tuple[str | None, str]:
        """A content hash of the loaded weights, in a worker thread (a hash that cannot be made is no failure)."""
        try:
            return await asyncio.to_thread(self._versions.of, e.spec.source, loaded)
        except Exception as err:  # noqa: BLE001 - the model serves without a version
            log.warning("model version not computed", model=e.name, error=str(err))
            return None, "none"

    def _failed(self, e: Entry, err: BaseException, seconds: float) -> None:
        if isinstance(err, StageError) and not isinstance(err, ModelError):  # the loader's own clear message
            err = ModelLoadFailed(f"model {e.name!r}: {err}")
        elif not isinstance(err, ModelError):
            err = ModelLoadFailed(f"cannot load model {e.name!r} ({e.spec.source}): "
                                  f"{redact_text(f'{type(err).__name__}: {err}')}")
        e.state, e.error, e.reason, e.failed_at = State.FAILED, err, str(err), time.monotonic()
        e.obj, e.memory_bytes, e.version, e.version_method = None, 0, None, None
        log.error("model load failed", model=e.name, error=str(err), seconds=round(seconds, 3))
        if self.metrics is not None:
            self.metrics.model_loads.labels(e.name, getattr(err, "code", "failed")).inc()

    async def _make_room(self, e: Entry, device: str, needed: int) -> None:
        """Unload idle models on `device`, least recently used first, until `needed` more bytes fit its budget.
        Called holding the lock. Raises InsufficientMemory (naming the holders) when they cannot."""
        budget = memory.budget_bytes(self.cfg.budget.get(device), device)
        if budget is None:
            return
        others = [x for x in self._entries.values() if x is not e and x.device == device and x.held() > 0]
        used = sum(x.held() for x in others)
        if used + needed <= budget:
            return
        idle = sorted((x for x in others if x.state is State.READY and not x.in_use() and not x.pinned),
                      key=lambda x: x.idle_since)
        victims = []
        for x in idle:
            if used + needed <= budget:
                break
            victims.append(x)
            used -= x.held()
        if used + needed > budget:
            holders = [x.holder() for x in others if x not in victims]
            raise InsufficientMemory(e.name, device, needed, budget, holders)
        for x in victims:
            x.state = State.UNLOADING  # before any await: nobody starts a call on it now
        for x in victims:
            log.info("evicting an idle model to make room", model=x.name, device=device, bytes=x.memory_bytes,
                     for_model=e.name)
            if self.metrics is not None:
                self.metrics.model_evictions.labels(x.name).inc()
        # each unload runs as its victim's task from now (callers waiting on a victim wait on that task)
        tasks = [self._start_drop(x, f"evicted to make room for {e.name!r}", "evicted") for x in victims]
        await asyncio.wait(tasks)
        for t in tasks:
            if not t.cancelled():
                t.exception()  # logged by _drop; the victim is unloaded either way

    # -- unloading ------------------------------------------------------------------------------------------------
    async def unload(self, name: str, force: bool = False) -> Entry:
        """Unload a model by hand (DELETE /api/v1/models/{name}). In use: ModelInUse, unless `force`, which fails
        the streams using it (and the calls waiting on it) with the reason."""
        e = self.get_entry(name)
        while e.state in (State.LOADING, State.UNLOADING) and e.task is not None:
            task = e.task
            await asyncio.wait([task])
            if e.task is task and e.state in (State.LOADING, State.UNLOADING):  # its task ended without a verdict
                break
        if e.state is not State.READY:
            if e.state is State.FAILED:
                e.state, e.error = State.UNLOADED, None
            return e
        users = e.users()
        if e.in_use() and not force:
            raise ModelInUse(name, users)
        why, message = "manual", None
        if e.in_use():
            why = "forced"
            reason = message = (f"model {name!r} was unloaded by force (DELETE /api/v1/models/{name}?force=true) "
                                "while this stream used it")
            for ref in list(e.refs):
                for sid in sorted(ref.streams):
                    ref.revoked[sid] = reason
                    ref.fail_stream(sid, reason)
                ref.streams.clear()
            log.warning("model unloaded by force", model=name, streams=users["streams"])
        await self._unload(e, f"unloaded by hand ({why})", why, message)
        return e

    def _start_drop(self, e: Entry, reason: str, why: str | None = None,
                    message: str | None = None) -> asyncio.Task[None]:
        """Start unloading `e` as its own task (`e.task`): callers waiting on the entry wait on it."""
        e.state = State.UNLOADING
        e.task = asyncio.create_task(self._drop(e, reason, why, message), name=f"model-unload:{e.name}")
        return e.task

    async def _unload(self, e: Entry, reason: str, why: str | None = None, message: str | None = None) -> None:
        """Unload `e` (its task) and wait for it; a failed unload raises (the entry is unloaded all the same).
        The caller's cancellation leaves the unload running."""
        task = self._start_drop(e, reason, why, message)
        await asyncio.wait([task])
        task.result()

    async def _drop(self, e: Entry, reason: str, why: str | None = None, message: str | None = None) -> None:
        """Close and forget the loaded model (calls waiting on it fail with `message`), then give its memory back
        on the device's executor."""
        e.state = State.UNLOADING
        obj, e.obj = e.obj, None
        device = e.device or "cpu"
        failure: str | None = None
        try:
            gone = _watch(obj)
            if obj is not None:
                await _close(obj, message or f"model {e.name!r} was unloaded: {reason}")
            del obj
            await asyncio.get_running_loop().run_in_executor(device_executor(device), memory.release, device,
                                                             lambda: gone() is not None)
        except Exception as err:  # noqa: BLE001 - recorded, then raised to the caller
            failure = redact_text(f"{type(err).__name__}: {err}")
            log.error("model unload failed", model=e.name, device=device, reason=reason, error=failure)
            raise
        finally:  # whatever happened, the model is gone: the entry never stays unloading
            e.memory_bytes, e.version, e.version_method = 0, None, None
            e.state = State.UNLOADED
            e.reason = reason if failure is None else f"{reason} (giving its memory back failed: {failure})"
        if why is not None:
            log.info("model unloaded", model=e.name, device=device, reason=reason)
            self._count_unload(e, why)

    def _count_unload(self, e: Entry, why: str) -> None:
        if self.metrics is not None:
            self.metrics.model_unloads.labels(e.name, why).inc()
            self.metrics.model_memory.labels(e.name, e.device or "cpu").set(0)

    # -- idle unload ---------------------------------------------------------------------------------------------
    def _start_reaper(self) -> None:
        if (self._reaper is None or self._reaper.done()) and not self._closed:  # a dead one is started again
            self._reaper = asyncio.create_task(self._reap(), name="models:idle-unload")

    async def _reap(self) -> None:
        while not self._closed:
            self._wake.clear()
            now = time.monotonic()
            nearest: float | None = None
            for e in list(self._entries.values()):
                try:  # one model's error neither stops the others' nor kills the reaper
                    if e.state is not State.READY or e.in_use() or e.pinned:
                        continue
                    due = e.idle_since + e.keep_alive_s
                    if due <= now:
                        log.info("unloading an idle model", model=e.name, idle_s=round(now - e.idle_since, 1))
                        await self._unload(e, f"idle for {e.keep_alive_s:g} s", "idle")
                        continue
                    nearest = due if nearest is None else min(nearest, due)
                except Exception as err:  # noqa: BLE001 - logged; the reaper goes on
                    log.error("idle unload failed", model=e.name, error=redact_text(f"{type(err).__name__}: {err}"))
            try:  # not wait_for: on 3.11 it swallows a cancellation that meets a wake-up
                async with asyncio.timeout(None if nearest is None else max(0.0, nearest - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass


def _watch(obj: Any) -> Callable[[], Any]:
    """A weak reference to a model being dropped (freed once the call returns None), or one that never says so."""
    if obj is None:
        return lambda: None
    try:
        return weakref.ref(obj)
    except TypeError:  # no weak references to it: taken as alive (a full collection)
        return lambda: True


async def _close(obj: Any, reason: str) -> None:
    """`obj.aclose(error)`: its waiting callers get `error` (an aclose() without parameters is just called)."""
    close = getattr(obj, "aclose", None)
    if close is not None:
        await (close(ModelRevoked(reason)) if inspect.signature(close).parameters else close())


ModelRegistry = ModelManager


def check_batching(e: Entry, spec: ModelSpec) -> None:
    """A model has one batcher: a new user that sets one of its batching options to another value than the one
    in use is refused (ModelConflict), not silently given the first user's."""
    have = e.spec.typed_options().model_dump()
    for key, value in spec.options.items():
        if key in BATCHING_OPTIONS and have.get(key) != value:
            raise ModelConflict(f"model {e.name!r} has one batcher, shared by every stage that uses it: its {key} is "
                                f"{have.get(key)!r} (used by {', '.join(sorted(r.label for r in e.refs)) or 'a loaded stage'}), this stage "
                                f"sets {value!r}; set the same value, or declare the model in models.catalog")

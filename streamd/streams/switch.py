"""Live changes of a pipeline's stages (PATCH /api/v1/pipelines/{name}): a stage's model (and the options the
stage can change while it runs, `Stage.live_options`), switched without stopping a stream or losing a frame.

- `change()`, on the daemon the request reaches: the changed stages' new models load while the old ones serve
  (`prepare_switch`: through the model manager, set up, one forward pass); a pipeline that does not run here has
  its changed stages set up once (the load is checked) and let go. Then the new version is written to Redis
  (conditional on the version it was made from), then every changed stage switches at once, between two of its
  batches: a batch runs with one model from start to end, and each stage runs its batches in order, so per stream
  every frame before the switch has the old model and every frame after it the new one. The old model's handle is
  closed: the manager unloads it after its keep_alive_s once nothing else uses it.
- The API names models the operator declared (`models.catalog`) or aliases, never a source: a path or URL from a
  request would have the daemon read any file (Ultralytics unpickles .pt files) or fetch past the egress policy.
- A load that fails leaves the old models serving, writes nothing, and publishes `model_switch_failed` on the
  events of each of the pipeline's streams here; a switch publishes `model_switched`.
- Every daemon follows the versions (`PipelineVersions`): one another daemon wrote is applied to the pipelines
  running here the same way (`_reconcile`: load, then switch; a failure is published, the old model serves on),
  and a pipeline started later, or after a restart, is built with its current version (`pipeline_config`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

from pydantic import ValidationError

from streamd import pipelines as pipeline_files
from streamd.config import Config, PipelineConfig, StageConfig
from streamd.errors import ConfigError, StreamdError
from streamd.log import get_logger, redact_text
from streamd.models.sources import ALIASES
from streamd.models.spec import OWNED_BY_MODEL
from streamd.pipeline import Pipeline
from streamd.pipeline_versions import Changes, PipelineStore, PipelineVersions
from streamd.stages import Stage, StageContext, build_stage

log = get_logger("streamd.switch")

Edit = tuple[str | int, dict[str, Any]]  # a stage (its name or index) and the options it gets


class SwitchRefused(StreamdError):
    """A change that cannot be made live (no such stage, an option the stage cannot change while it runs, an
    invalid value): nothing was loaded. `path` names the part of the request."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def apply(pcfg: PipelineConfig, changes: Changes, declared: Collection[str] = ()) -> PipelineConfig:
    """The pipeline with each named stage's options changed (a stage name no longer in it is skipped). A stage
    switched to a `declared` model loses the keys the declaration owns (device, half, runtime, lanes)."""
    stages = []
    for st in pcfg.stages:
        ch = changes.get(st.name or st.type)
        if ch:
            data = {**st.model_dump(exclude_unset=True), **ch}
            if ch.get("model") in declared:
                for key in OWNED_BY_MODEL.get(st.type, ()):
                    data.pop(key, None)
            st = StageConfig.model_validate(data)
        stages.append(st)
    return pcfg.model_copy(update={"stages": stages})


def _same(a: StageConfig, b: StageConfig) -> bool:
    return a.model_dump() == b.model_dump()


class ModelSwitches:
    def __init__(self, cfg: Config, pipelines: Any, ctx: StageContext, store: PipelineStore,
                 follow: PipelineStore, streams_of: Callable[[str], list[str]]):
        self.cfg = cfg
        self.pipelines = pipelines  # streamd.streams.pipelines.PipelineSet
        self._ctx = ctx
        self.store = store
        self.versions = PipelineVersions(follow, lambda rec: self.schedule(rec["pipeline"]))
        self._streams_of = streams_of  # pipeline name -> its streams on this daemon
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last: dict[str, dict[str, Any]] = {}  # pipeline -> its last switch here (state, version, reason ...)

    # -- building ----------------------------------------------------------------------------------------------------
    def pipeline_config(self, name: str, where: str) -> tuple[PipelineConfig, list[Stage]]:
        """The pipeline `name` with its current version's changes, its stages built. A version that no longer fits
        the configured pipeline (its file changed) is skipped with a warning: the pipeline runs as configured."""
        pcfg = pipeline_files.resolve(self.cfg, name, where)
        rec = self.versions.get(name)
        if rec["stages"]:
            try:
                changed = self._verify(name, pcfg, rec["stages"])
                return changed, self._build(name, changed, where)
            except (ConfigError, SwitchRefused, ValidationError) as e:
                self._refused(name, {st.name or st.type: _model(st) for st in pcfg.stages}, rec, e,
                              "the pipeline runs as configured")
        return pcfg, self._build(name, pcfg, where)

    def _verify(self, name: str, base: PipelineConfig, changes: Changes) -> PipelineConfig:
        """A stored version's changes checked as a change through the API is before it is applied (at a start, or
        followed): options the stage can change live, models declared here (models.catalog) or aliases, never a
        source a Redis record names (this daemon's catalog may differ from the writer's, or have changed since);
        every stage's options valid. The pipeline with the changes; SwitchRefused or ConfigError if they fail."""
        names = [st.name or st.type for st in base.stages]
        for stage, opts in changes.items():
            if stage not in names:
                continue  # a stage no longer in the pipeline: skipped (apply)
            st = base.stages[names.index(stage)]
            live = getattr(build_stage(st, f"pipelines.{name}.stages.{names.index(stage)}"), "live_options",
                           frozenset())
            fixed = sorted(set(opts) - live)
            if fixed:
                raise SwitchRefused(f"{stage}.{fixed[0]}", f"stage {stage}: {', '.join(fixed)} cannot change while "
                                    f"the pipeline runs (live: {', '.join(sorted(live)) or 'none'})")
            model = opts.get("model")
            if model is not None and model != _model(st):
                why = self._undeclared(model)
                if why is not None:
                    raise SwitchRefused(f"{stage}.model", f"stage {stage}: {why}")
        wanted = self._apply(base, changes)
        self._check(name, wanted)
        return wanted

    def _undeclared(self, model: Any) -> str | None:
        """Why `model` is not one the versions may name (None: declared in models.catalog, or an alias)."""
        if isinstance(model, str) and (model in self.cfg.models.catalog or model in ALIASES):
            return None
        declared = ", ".join(sorted(self.cfg.models.catalog)) or "none"
        return (f"model {model!r} is not declared: the API switches to models declared in models.catalog (declared: "
                f"{declared}) or aliases ({', '.join(sorted(ALIASES))}), never to a file or URL it names")

    def _refused(self, name: str, serving: dict[str, Any], rec: dict[str, Any], e: BaseException,
                 outcome: str) -> None:
        """A stored version that fails the checks is not applied: a warning, `last`, and `model_switch_failed` on
        the pipeline's streams here."""
        reason = redact_text(str(e) or type(e).__name__)
        log.warning(f"pipeline version not applied: {outcome}", pipeline=name, version=rec["version"], error=reason)
        stage = model = None
        for st_name, opts in rec["stages"].items():
            stage, model = st_name, opts.get("model") if isinstance(opts, dict) else None
            if model is not None:
                break
        now = serving.get(stage) if stage is not None else None
        self.last[name] = {"state": "failed", "version": rec["version"], "stage": stage, "model": model,
                           "ts": time.time(), "reason": reason}
        for sid in self._streams_of(name):
            self._ctx.events(sid, "model_switch_failed", {"pipeline": name, "version": rec["version"],
                                                          "stage": stage, "model": model, "serving": now,
                                                          "reason": reason})

    def _apply(self, pcfg: PipelineConfig, changes: Changes) -> PipelineConfig:
        return apply(pcfg, changes, self.cfg.models.catalog)

    @staticmethod
    def _build(name: str, pcfg: PipelineConfig, where: str) -> list[Stage]:
        return [build_stage(st, f"{where}[{name}].stages.{i}") for i, st in enumerate(pcfg.stages)]

    # -- a change through the API ------------------------------------------------------------------------------------
    async def change(self, name: str, edits: list[Edit], author: str, note: str | None,
                     rollback_to: int | None = None) -> dict[str, Any]:
        """Apply `edits` (or, with `rollback_to`, that version's changes) to the pipeline: load, write the version,
        switch. Returns the outcome. Raises SwitchRefused, ConfigError (the pipeline), the load's error (StageError,
        a ModelError), PipelineChanged, VersionNotFound, RedisError; in every case nothing changed."""
        base = pipeline_files.resolve(self.cfg, name, "pipeline")
        async with self._lock(name):
            cur = await self.store.current(name)
            if rollback_to is not None:
                target = (await self.store.version(name, rollback_to))["stages"]
            else:
                target = self._merge(base, cur["stages"], edits)
            target = _normalise(base, target)
            if target == cur["stages"]:
                return {"status": "unchanged", "record": cur, "switched": [], "streams": []}
            wanted = self._verify(name, base, target)  # a rollback's target too: a model declared here
            p = await self._running(name)
            plan = self._plan(p, wanted) if p is not None else None
            prepared = await self._prepare(name, plan, cur["version"] + 1) if plan is not None else []
            if plan is None:
                try:
                    await self._trial(name, self._apply(base, cur["stages"]), wanted)
                except Exception as e:
                    self.last[name] = {"state": "failed", "version": cur["version"] + 1, "stage": None,
                                       "model": None, "ts": time.time(), "reason": redact_text(str(e))}
                    raise
            try:
                rec = await self.store.put(name, target, author, note, cur["version"], rollback_to)
            except BaseException:
                for stage, _, s in prepared:
                    stage.discard(s)
                raise
            self.versions.set(rec)
            switched = self._commit(name, rec["version"], prepared)
        self.schedule(name)  # a pipeline that started meanwhile (with the old version) catches up
        return {"status": "switched" if p is not None else "saved", "record": rec, "switched": switched,
                "streams": self._streams_of(name) if p is not None else []}

    def _merge(self, base: PipelineConfig, current: Changes, edits: list[Edit]) -> Changes:
        """The current changes with `edits` on top; checks each edit names a stage and options it can change live."""
        names = [st.name or st.type for st in base.stages]
        out = {k: dict(v) for k, v in current.items()}
        for j, (ref, opts) in enumerate(edits):
            if isinstance(ref, int):
                if not 0 <= ref < len(names):
                    raise SwitchRefused(f"stages.{j}.stage", f"the pipeline has {len(names)} stages (0 to "
                                        f"{len(names) - 1}), no stage {ref}")
                stage = names[ref]
            elif ref in names:
                stage = ref
            else:
                raise SwitchRefused(f"stages.{j}.stage", f"no stage {ref!r} (stages: {', '.join(names)})")
            st = base.stages[names.index(stage)]
            live = getattr(build_stage(st, f"pipelines.{stage}"), "live_options", frozenset())
            fixed = sorted(set(opts) - live)
            if not live:
                raise SwitchRefused(f"stages.{j}.stage", f"a {st.type} stage cannot change while it runs (stages "
                                    "that can: detect)")
            if fixed:
                raise SwitchRefused(f"stages.{j}.{fixed[0]}", f"{', '.join(fixed)} cannot change while the "
                                    f"pipeline runs (live: {', '.join(sorted(live))})")
            model = opts.get("model")
            why = self._undeclared(model) if model is not None else None
            if why is not None:
                raise SwitchRefused(f"stages.{j}.model", why)
            out.setdefault(stage, {}).update(opts)
        return out

    def _check(self, name: str, wanted: PipelineConfig) -> None:
        """Every stage's options valid (ConfigError naming the key) before anything loads."""
        for i, st in enumerate(wanted.stages):
            where = f"pipelines.{name}.stages.{i}"
            build_stage(st, where)
            if self._ctx.models is not None:
                self._ctx.models.check_stage(st.model_dump(exclude_unset=True), where)

    async def _running(self, name: str) -> Pipeline | None:
        """The pipeline `name` running here once its setup is done; None if it does not run (or its setup fails)."""
        p = self.pipelines.get(name)
        task = self.pipelines.task(p) if p is not None else None
        if p is None or task is None:
            return None
        if not p.ready.is_set():
            ready = asyncio.ensure_future(p.ready.wait())
            try:
                await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
        return p if p.ready.is_set() and self.pipelines.running(p) else None

    @staticmethod
    def _plan(p: Pipeline, wanted: PipelineConfig) -> list[tuple[Stage, StageConfig]]:
        """The running stages whose options differ from `wanted`'s."""
        if [st.name or st.type for st in wanted.stages] != [st.name for st in p.stages]:
            raise ConfigError(f"pipelines.{p.name}", "the pipeline's file changed since it started: its stages "
                              "differ from the running ones (restart its streams)")
        plan = [(st, w) for st, w in zip(p.stages, wanted.stages) if not _same(st.cfg, w)]
        fixed = [st.name for st, _ in plan if not getattr(st, "live_options", None)]
        if fixed:
            raise ConfigError(f"pipelines.{p.name}", f"stage {fixed[0]} changed in the pipeline's file since it "
                              "started and cannot change while it runs (restart its streams)")
        return plan

    async def _prepare(self, name: str, plan: list[tuple[Stage, StageConfig]],
                       version: int | None) -> list[tuple[Stage, StageConfig, Any]]:
        """Load and set up every planned stage's new model while the old ones serve. On a failure: the ones
        prepared are let go, `model_switch_failed` is published, and the error raised."""
        prepared: list[tuple[Stage, StageConfig, Any]] = []
        stage = cfg = None
        try:
            for stage, cfg in plan:
                self.last[name] = {"state": "loading", "version": version, "stage": stage.name,
                                   "model": _model(cfg), "ts": time.time(), "reason": None}
                prepared.append((stage, cfg, await stage.prepare_switch(cfg)))
        except BaseException as e:
            for st, _, s in prepared:
                st.discard(s)
            if isinstance(e, Exception) and stage is not None and cfg is not None:
                self._failed(name, stage, cfg, version, e)
            raise
        return prepared

    async def _trial(self, name: str, current: PipelineConfig, wanted: PipelineConfig) -> None:
        """The pipeline does not run here: set each changed stage up once (its model loads and runs a frame), then
        let it go (the model stays loaded for its keep_alive_s)."""
        for i, (old, new) in enumerate(zip(current.stages, wanted.stages)):
            if _same(old, new):
                continue
            st = build_stage(new, f"pipelines.{name}.stages.{i}")
            st.bind(self._ctx)
            try:
                await st.setup()
            finally:
                await st.teardown()

    def _commit(self, name: str, version: int, prepared: list[tuple[Stage, StageConfig, Any]]) -> list[dict]:
        """Switch every prepared stage now (no await: all at once, between batches) and say so on each stream."""
        switched = []
        for stage, cfg, s in prepared:
            before = (getattr(stage, "opts", None), stage.model.entry.version if stage.model is not None else None)
            stage.switch(cfg, s)
            switched.append({"stage": stage.name, "model": _model(cfg), "model_version": _version(s.model),
                             "from_model": getattr(before[0], "model", None), "from_version": before[1]})
        streams = self._streams_of(name)
        for sw in switched:
            log.info("stage switched", pipeline=name, version=version, streams=len(streams), **sw)
            for sid in streams:
                self._ctx.events(sid, "model_switched", {"pipeline": name, "version": version, **sw})
        if switched:
            self.last[name] = {"state": "switched", "version": version, "stage": switched[-1]["stage"],
                               "model": switched[-1]["model"], "ts": time.time(), "reason": None}
        return switched

    def _failed(self, name: str, stage: Stage, cfg: StageConfig, version: int | None, e: BaseException) -> None:
        reason = redact_text(str(e) or type(e).__name__)
        serving = getattr(getattr(stage, "opts", None), "model", None)
        self.last[name] = {"state": "failed", "version": version, "stage": stage.name, "model": _model(cfg),
                           "ts": time.time(), "reason": reason}
        streams = self._streams_of(name)
        log.error("stage switch failed: the old model serves on", pipeline=name, stage=stage.name,
                  model=_model(cfg), serving=serving, error=reason, streams=len(streams))
        for sid in streams:
            self._ctx.events(sid, "model_switch_failed", {"pipeline": name, "version": version, "stage": stage.name,
                                                          "model": _model(cfg), "serving": serving,
                                                          "reason": reason})

    # -- following the versions ------------------------------------------------------------------------------------
    def start(self, name: str, edits: list[Edit], author: str, note: str | None,
              rollback_to: int | None = None) -> asyncio.Task[dict[str, Any]]:
        """`change()` as a task this object owns: it goes on when the client that asked goes away (stopped with
        the daemon)."""
        return self._track(asyncio.create_task(self.change(name, edits, author, note, rollback_to),
                                               name=f"change:{name}"))

    def schedule(self, name: str) -> None:
        """Bring the pipeline running here to its current version, in the background."""
        self._track(asyncio.create_task(self._reconcile(name), name=f"switch:{name}"))

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: the API answered with it, or not
            log.debug("pipeline change ended with an error", task=task.get_name(), error=str(task.exception()))

    async def _reconcile(self, name: str) -> None:
        try:
            async with self._lock(name):
                rec = self.versions.get(name)
                p = await self._running(name)
                if p is None:
                    return
                base = pipeline_files.resolve(self.cfg, name, "pipeline")
                try:
                    wanted = self._verify(name, base, rec["stages"])
                except (ConfigError, SwitchRefused, ValidationError) as e:
                    self._refused(name, {st.name: getattr(getattr(st, "opts", None), "model", None)
                                         for st in p.stages}, rec, e, "the pipeline's current models serve on")
                    return
                plan = self._plan(p, wanted)
                if not plan:
                    return
                log.info("switching to a pipeline version", pipeline=name, version=rec["version"],
                         stages=[st.name for st, _ in plan])
                prepared = await self._prepare(name, plan, rec["version"])
                self._commit(name, rec["version"], prepared)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - published by _prepare; the old models serve on
            log.warning("pipeline version not applied here", pipeline=name, error=str(e))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def run(self) -> None:
        await self.versions.run()

    async def aclose(self) -> None:
        """Stop following; changes and switches under way are cancelled (what they prepared is let go)."""
        self.versions.stop()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what GET /api/v1/pipelines shows -----------------------------------------------------------------------------
    def describe(self, name: str, pcfg: PipelineConfig) -> dict[str, Any]:
        """The pipeline's current version, its stages with those changes (and, running here, what each serves), and
        its last switch on this daemon."""
        rec = self.versions.get(name)
        try:
            eff = self._apply(pcfg, rec["stages"])
        except ValidationError:
            eff = pcfg
        p = self.pipelines.get(name)
        stages = []
        for i, st in enumerate(eff.stages):
            info: dict[str, Any] = {"type": st.type, "name": st.name or st.type}
            if _model(st) is not None:
                info["model"] = _model(st)
            s = getattr(p.stages[i], "serving", None) if p is not None and i < len(p.stages) else None
            if s is not None:
                info["serving"] = {"model": s.opts.model, "model_version": _version(s.model)}
            stages.append(info)
        return {"stages": stages, "version": rec["version"], "changes": rec["stages"], "changed_by": rec["author"],
                "changed_ts": rec["created_ts"], "last_switch": self.last.get(name)}


def _version(ref: Any) -> str | None:
    """A model handle's weights version (None: a stage without a model of the manager, e.g. a remote VLM)."""
    return None if ref is None else ref.entry.version


def _model(st: StageConfig) -> Any:
    return (st.model_extra or {}).get("model")


def _normalise(base: PipelineConfig, changes: Changes) -> Changes:
    """Changes without the options equal to the configured ones (a switch back to the configured model is no
    change), and without stages left with none."""
    by_name = {st.name or st.type: st.model_dump(exclude_unset=True) for st in base.stages}
    out = {}
    for stage, opts in changes.items():
        conf = by_name.get(stage, {})
        kept = {k: v for k, v in opts.items() if k not in conf or conf[k] != v}
        if kept:
            out[stage] = kept
    return out

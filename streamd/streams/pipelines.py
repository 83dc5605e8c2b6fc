"""The pipelines a daemon runs, by name: built when a stream first names one (stages validated, bound to the shared
models, prompts and sink), each run as one task. A pipeline whose setup fails fails the streams that use it, never
the daemon, and says why (`errors`, shown by /health). The end of a pipeline's work goes to the sink: results are
published, a frame a stage failed on is settled through its input's handle (a Redis entry is retried or
dead-lettered), other failed frames become `frame_failed` events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from streamd import pipelines as pipeline_files
from streamd.config import Config
from streamd.frames import Work
from streamd.log import get_logger
from streamd.metrics import Metrics
from streamd.pipeline import Pipeline
from streamd.stages import StageContext, build_stage

log = get_logger("streamd.pipelines")


def pipeline_config(cfg: Config, name: str, where: str) -> tuple[Any, list[Any]]:
    """The pipeline `name` means in `cfg` and its stages, built (their options checked). ConfigError names `where`."""
    pcfg = pipeline_files.resolve(cfg, name, where)
    stages = [build_stage(st, f"{where}[{name}].stages.{i}") for i, st in enumerate(pcfg.stages)]
    return pcfg, stages


def check_config(cfg: Config) -> None:
    """Everything `streamd validate` checks beyond the schema: pipelines exist and their stages' options."""
    import os

    for i, s in enumerate(cfg.streams):
        pipeline_config(cfg, s.pipeline, f"streams.{i}.pipeline")
    for name, pcfg in cfg.pipelines.items():
        for j, st in enumerate(pcfg.stages):
            build_stage(st, f"pipelines.{name}.stages.{j}")
    for t in cfg.api.tokens:
        t.value(dict(os.environ))


class PipelineSet(Mapping[str, Pipeline]):
    """The running pipelines by name (a read-only mapping); `get_or_start` builds and starts one."""

    def __init__(self, cfg: Config, metrics: Metrics, ctx: StageContext, sink: Any, prompt_cache: Any,
                 on_failed: Callable[[str, str], None]):
        self.cfg = cfg
        self._metrics = metrics
        self._ctx = ctx
        self._sink = sink
        self._prompt_cache = prompt_cache
        self._on_failed = on_failed  # (pipeline name, reason): its streams fail
        self._pipelines: dict[str, Pipeline] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.errors: dict[str, str] = {}  # pipelines whose setup failed: why
        self.switches: Any = None  # streamd.streams.switch.ModelSwitches: pipelines are built with their versions

    # -- Mapping -------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Pipeline:
        return self._pipelines[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pipelines)

    def __len__(self) -> int:
        return len(self._pipelines)

    # -- running ---------------------------------------------------------------------------------------------------
    def config(self, name: str, where: str) -> tuple[Any, list[Any]]:
        if self.switches is not None:  # with the live changes of its current version (models switched)
            return self.switches.pipeline_config(name, where)
        return pipeline_config(self.cfg, name, where)

    def get_or_start(self, name: str, where: str, tg: asyncio.TaskGroup) -> Pipeline:
        """The running pipeline `name`, started in `tg` if it is not running. Raises ConfigError (naming `where`)."""
        p = self._pipelines.get(name)
        if p is not None:
            return p
        pcfg, stages = self.config(name, where)
        for st in stages:
            st.bind(self._ctx)
        p = self._pipelines[name] = Pipeline(name, pcfg, stages, self._deliver, self._metrics)
        p.ingress.low_share = self.cfg.jobs.share
        self.errors.pop(name, None)
        p.prompts = self._prompt_cache
        self._tasks[name] = tg.create_task(self._run(p), name=f"pipeline:{name}")
        return p

    def start_for_job(self, name: str, where: str, tg: asyncio.TaskGroup) -> tuple[Pipeline, asyncio.Task[None]]:
        """A pipeline of its own for one job, built like `name` (its current version) and not among the running
        pipelines: a live frame never waits in a stage for a batch that holds a job's frames. Its stages share the
        loaded models with the live pipelines, whose batchers put live items first (a job's are their lower class).
        The caller cancels the task when the job ends; `failed` says why the pipeline stopped early. Raises
        ConfigError (naming `where`)."""
        pcfg, stages = self.config(name, where)
        for st in stages:
            st.bind(self._ctx)
        p = Pipeline(name, pcfg, stages, self._deliver, self._metrics)
        p.prompts = self._prompt_cache
        return p, tg.create_task(self._run_for_job(p), name=f"pipeline:{name}:{where}")

    @staticmethod
    async def _run_for_job(p: Pipeline) -> None:
        try:
            await p.run()
        except Exception as e:  # noqa: BLE001 - the job fails with the reason, nothing else does
            p.failed = f"pipeline {p.name!r} failed: {type(e).__name__}: {e}"
            log.error("a job's pipeline failed", pipeline=p.name, error=p.failed)

    def running(self, p: Pipeline) -> bool:
        """Whether `p` is still the pipeline of its name (a failed one is dropped)."""
        return self._pipelines.get(p.name) is p

    def task(self, p: Pipeline) -> asyncio.Task[None] | None:
        return self._tasks.get(p.name) if self.running(p) else None

    async def _run(self, p: Pipeline) -> None:
        try:
            await p.run()
        except Exception as e:  # noqa: BLE001 - a pipeline that cannot start fails its streams, not the daemon
            reason = f"pipeline {p.name!r} failed: {type(e).__name__}: {e}"
            log.error("pipeline failed", pipeline=p.name, error=reason)
            self._pipelines.pop(p.name, None)
            self.errors[p.name] = reason
            self._on_failed(p.name, reason)

    async def close(self) -> None:
        """No more streams: every pipeline drains what it holds and stops."""
        for p in self._pipelines.values():
            p.ingress.close()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def cancel(self) -> None:
        for t in self._tasks.values():
            t.cancel()

    async def _deliver(self, works: list[Work]) -> None:
        ok: list[Work] = []
        for w in works:
            f = w.frame
            if f.predict or f.job:  # a predict request's image (streams/predict.py), a job's frame (jobs/): answered
                f.ref.handle.answer(w)  # to its request or job, not published
                continue
            if w.error is not None:
                self._metrics.frames_failed.labels(f.stream_id).inc()
                if f.ref is not None:
                    try:  # the input decides: retried later, or dead-lettered after its deliveries
                        if f.ref.handle is not None:
                            await f.ref.handle.fail(f.ref, w.error)
                    except Exception as e:  # noqa: BLE001 - Redis down: the entry stays pending
                        log.warning("could not record a failed entry", stream=f.stream_id, error=str(e))
                    continue
                # a leased stream's (fleet mode): written under its lease, like its results
                self._sink.event(f.stream_id, "frame_failed", {"seq": f.seq, "reason": w.error},
                                 self._sink.lease_fence(f.stream_id))
            ok.append(w)
        if ok:
            await self._sink.publish_results(ok)

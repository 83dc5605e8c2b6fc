"""The daemon owns the lifecycle: startup(), run(), shutdown().

startup: glibc malloc thresholds for frame buffers (`streamd.memory`), Redis (the configured one, or an embedded
redis-server), the sink, and the pipelines the configured streams name (validated before anything runs). run: one
supervised task per stream, one task per pipeline, the sink, an event-loop lag monitor; returns when `stop` is
set, after draining in-flight frames within the grace period. shutdown: closes what startup opened. Streams can be
added and removed while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamd import pipelines as pipeline_files
from streamd.batching import FRAME_BUSY_RATE, FRAME_TICK_S, Doorbell
from streamd.config import Config, StreamConfig
from streamd.egress import EgressRules
from streamd.errors import StreamdError
from streamd.frames import Work
from streamd.log import get_logger, redact_url
from streamd.memory import tune_malloc
from streamd.metrics import Metrics
from streamd.pipeline import Pipeline
from streamd.redis_clients import redis_client
from streamd.redis_server import ManagedRedis
from streamd.sinks.redis import RedisSink
from streamd.sources.redis import default_consumer_name
from streamd.api_streams import StoredStreams, StreamExists, StreamNotFound
from streamd.models import ModelRegistry
from streamd.prompts import PromptCache, PromptStore
from streamd.stages import StageContext, build_stage
from streamd.supervisor import State, StreamRunner

log = get_logger("streamd.daemon")
CACHE_POOL = 4
_FLUSH_ON_REMOVE_S = 5.0  # a removed stream's buffered results: how long its removal waits for them (Redis up)


class Daemon:
    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.embedded: ManagedRedis | None = None
        self.redis_url: str = cfg.redis.url or ""
        self.redis: aioredis.Redis | None = None
        self._inputs_redis: aioredis.Redis | None = None
        self._cache_redis: aioredis.Redis | None = None
        self._fleet_redis: aioredis.Redis | None = None
        self.sink: RedisSink | None = None
        self.doorbell: Doorbell | None = None
        self.pipelines: dict[str, Pipeline] = {}
        self.runners: dict[str, StreamRunner] = {}
        self._stream_pipeline: dict[str, str] = {}
        self._clients: dict[str, aioredis.Redis] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.loop_lag_s: deque[float] = deque(maxlen=10_000)
        self.started = asyncio.Event()
        self.consumer = cfg.redis.consumer or default_consumer_name()
        self.models = ModelRegistry()
        self.prompts: PromptStore | None = None
        self.prompt_cache: PromptCache | None = None
        self.api_stream_ids: set[str] = set()
        self._groups_made: set[tuple[str, str, str]] = set()  # Redis consumer groups our inputs created
        self.stored: StoredStreams | None = None
        self._api_lock = asyncio.Lock()  # held while the streams kept in Redis are loaded
        self._stream_locks: dict[str, asyncio.Lock] = {}  # one API change of a stream at a time
        self.pipeline_errors: dict[str, str] = {}  # pipelines whose setup failed: why (shown by /health)
        self.api_url: str | None = None
        self.last_ping: tuple[float, asyncio.Future[bool]] | None = None  # /health's Redis PING, shared for 1 s
        self.fleet: Any = None  # streamd.fleet_streams.FleetStreams when fleet.enabled
        self.ready = False  # streams loaded and every started pipeline set up

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        # validate every stream's pipeline (and stage options) before anything starts
        for i, s in enumerate(self.cfg.streams):
            self._pipeline_config(s.pipeline, f"streams.{i}.pipeline")
        log.debug("malloc thresholds", tuned=tune_malloc())
        if not self.redis_url:
            self.embedded = ManagedRedis(self.cfg.redis.data_dir)
            await asyncio.to_thread(self.embedded.start)
            self.redis_url = self.embedded.url
            log.info("started embedded redis-server", url=self.redis_url, data_dir=self.cfg.redis.data_dir)
        # the API, the prompt store, the stored streams: api.redis_pool connections (a request waits up to 2 s for
        # one, then 503 busy)
        self.redis = redis_client(self.redis_url, self.cfg.api.redis_pool)
        self._inputs_redis = redis_client(self.redis_url)  # Redis inputs on the daemon's own Redis
        self._cache_redis = redis_client(self.redis_url, CACHE_POOL)  # the prompt cache's reads and pub/sub
        self.sink = RedisSink(self.redis, self.cfg.redis, self.metrics, self._settled)
        # decoder threads -> the loop
        self.doorbell = Doorbell(asyncio.get_running_loop(), FRAME_TICK_S, FRAME_BUSY_RATE)
        self.prompts = PromptStore(self.redis)
        self.stored = StoredStreams(self.redis)
        self.prompt_cache = PromptCache(PromptStore(self._cache_redis))

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain within the grace period."""
        assert self.sink is not None, "startup() first"
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            background = [tg.create_task(self.sink.run(), name="sink"),
                          tg.create_task(self._watch_loop_lag(), name="loop-lag")]
            assert self.prompt_cache is not None
            background.append(tg.create_task(self.prompt_cache.run(), name="prompts"))
            api = None
            if self.cfg.api.enabled:
                from streamd.api import ApiServer

                api = ApiServer(self, self.cfg.api)
                await api.start()
                self.api_url = api.url
            if self.cfg.fleet.enabled:
                from streamd.fleet_streams import FleetStreams

                self._fleet_redis = redis_client(self.redis_url, 8)
                self.fleet = FleetStreams(self, self._fleet_redis, _version())
                background.append(tg.create_task(self.fleet.run(), name="fleet"))
            for s in self.cfg.streams:
                self._offer(s, "config")
            if not await self._start_api_streams():  # Redis unreachable: keep trying in the background
                background.append(tg.create_task(self._retry_api_streams(), name="api-streams"))
            try:
                await asyncio.wait_for(self.prompt_cache.loaded.wait(), 5)
            except TimeoutError:
                log.warning("prompts not loaded yet (Redis unreachable?)")
            self.started.set()
            await stop.wait()
            if api is not None:
                await api.stop()
            if self.fleet is not None:  # hand every stream over at once, then stop
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.fleet.leave(), self.cfg.shutdown.grace_s)
            log.info("stopping: draining in-flight frames", grace_s=self.cfg.shutdown.grace_s)
            try:
                await asyncio.wait_for(self._drain(), self.cfg.shutdown.grace_s)
            except TimeoutError:
                log.warning("grace period over: cancelling", unpublished=len(self.sink))
            self.prompt_cache.stop()
            for t in [*self._tasks.values(), *background]:
                t.cancel()
        self._tg = None

    async def _drain(self) -> None:
        for r in self.runners.values():
            r.stop()
        runner_tasks = [t for k, t in self._tasks.items() if k.startswith("stream:")]
        await asyncio.gather(*runner_tasks, return_exceptions=True)
        for p in self.pipelines.values():
            p.ingress.close()
        await asyncio.gather(*(t for k, t in self._tasks.items() if k.startswith("pipeline:")),
                             return_exceptions=True)
        assert self.sink is not None
        while self.sink.healthy and len(self.sink):
            await self.sink.wait_idle()

    async def shutdown(self) -> None:
        await self.models.aclose()
        if self.sink is not None:
            await self.sink.aclose()
        for c in [self.redis, self._inputs_redis, self._cache_redis, self._fleet_redis, *self._clients.values()]:
            if c is not None:
                try:
                    await c.aclose()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None

    async def __aenter__(self) -> "Daemon":
        await self.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- streams ----------------------------------------------------------------------------------------------
    def _offer(self, s: StreamConfig, origin: str) -> None:
        """Start a stream here, or (fleet mode) let the fleet place it on one daemon."""
        if self.fleet is not None:
            self.fleet.offer(s, origin)
        else:
            self.add_stream(s, origin)

    def add_stream(self, s: StreamConfig, origin: str = "config") -> StreamRunner:
        """Start a stream (the daemon must be running). Raises ConfigError for an unknown pipeline. `origin` is
        "config" (the operator's file: its own host stays reachable) or "api" (the whole egress policy)."""
        assert self._tg is not None and self.sink is not None
        if s.id in self.runners and self.runners[s.id].state not in (State.STOPPED, State.FAILED):
            raise StreamdError(f"stream {s.id!r} exists")
        pipeline = self._pipeline(s.pipeline, f"streams.{s.id}.pipeline")
        sink = self.sink
        runner = StreamRunner(s, self.metrics, sink.event, self._client, self.consumer,
                              self.cfg.events.drop_event_interval_s, self.doorbell,
                              EgressRules.from_config(self.cfg.egress), origin)
        self.runners[s.id] = runner
        self._stream_pipeline[s.id] = s.pipeline
        pipeline.ingress.attach(s.id, runner.queue)
        self._tasks[f"stream:{s.id}"] = self._tg.create_task(self._run_stream(runner, pipeline), name=f"stream:{s.id}")
        log.info("stream added", stream=s.id, url=runner.url_redacted, pipeline=s.pipeline)
        return runner

    def add_failed_stream(self, s: StreamConfig, reason: str) -> StreamRunner:
        """Show a stream that cannot start (its pipeline is gone, its stored entry is invalid) as failed, with the
        reason; nothing runs for it. PATCH or DELETE through the API replace or remove it."""
        assert self.sink is not None
        runner = StreamRunner(s, self.metrics, self.sink.event, self._client, self.consumer,
                              self.cfg.events.drop_event_interval_s)
        self.runners[s.id] = runner
        runner.fail(reason)
        return runner

    # -- streams added through the API, kept in Redis --------------------------------------------------------
    async def _start_api_streams(self) -> bool:
        """Start the streams kept in Redis; one that cannot start is shown failed and never stops the daemon.
        False when Redis could not be read."""
        assert self.stored is not None
        async with self._api_lock:
            try:
                stored = await self.stored.load()
            except (RedisError, OSError) as e:
                log.warning("could not load API-added streams from Redis", error=str(e) or type(e).__name__)
                return False
            for s, problem in stored:
                if s.id in self.runners or (self.fleet is not None and s.id in self.fleet.cfgs):
                    continue  # a stream of the config file (or one added meanwhile) has this id
                self.api_stream_ids.add(s.id)
                if problem is None:
                    try:
                        self._offer(s, "api")
                        continue
                    except StreamdError as e:
                        problem = str(e)
                    except Exception as e:  # noqa: BLE001 - one stored stream's bug never stops the daemon
                        log.exception("stored stream crashed at start", stream=s.id)
                        problem = f"internal error: {type(e).__name__}: {e}"
                self.add_failed_stream(s, f"stored stream cannot start: {problem}")
        return True

    async def _retry_api_streams(self, interval_s: float = 1.0) -> None:
        while not await self._start_api_streams():
            await asyncio.sleep(interval_s)
        log.info("API-added streams loaded from Redis")

    async def api_put_stream(self, s: StreamConfig, replace: bool = False) -> StreamRunner:
        """Add (or, with `replace`, change) a stream, then keep it in Redis so a restarted or second daemon sees
        it. Only an accepted stream is kept: a ConfigError (bad pipeline) leaves the old stream running and Redis
        untouched; a Redis error stops the new stream again and restores the old one. A change of a running
        stream's `fps` or `stall_timeout_s` alone is applied without a restart (StreamRunner.apply: no reconnect,
        seq and trackers go on); a Redis error then leaves the stream as it was. Raises StreamExists /
        StreamNotFound when another request got there first."""
        assert self.stored is not None
        if self.fleet is not None and self.fleet.leases_kind(s):
            return await self._fleet_put_stream(s, replace)
        async with self._stream_lock(s.id):
            if (s.id in self.runners) != replace:
                raise StreamNotFound(s.id) if replace else StreamExists(s.id)
            running = self.runners.get(s.id)
            if running is not None and running.can_apply(s):
                await self.stored.save(s)
                running.apply(s)
                self.api_stream_ids.add(s.id)
                return running
            if s.pipeline not in self.pipelines:
                self._pipeline_config(s.pipeline, "pipeline")  # refused before the old stream is touched
            old = self.runners.get(s.id)
            if old is not None:
                await self.remove_stream(s.id)
            try:
                runner = self.add_stream(s, "api")
                try:
                    await self.stored.save(s)
                except Exception:
                    await self.remove_stream(s.id)
                    if old is None:
                        self.metrics.forget_stream(s.id)
                    raise
            except Exception:
                if old is not None:
                    self._restore_stream(old)
                raise
            self.api_stream_ids.add(s.id)
            return runner

    async def _fleet_put_stream(self, s: StreamConfig, replace: bool) -> StreamRunner | None:
        """Fleet mode: keep the stream in Redis and let the fleet place it (here when this daemon is its preferred
        owner: placed at once; otherwise another daemon takes it within a renew interval). The runner when it runs
        here, else None."""
        assert self.stored is not None and self.fleet is not None
        async with self._stream_lock(s.id):
            if self.has_stream(s.id) != replace:
                raise StreamNotFound(s.id) if replace else StreamExists(s.id)
            if not replace:
                self.fleet.admit(s.id)  # CapacityExhausted when the fleet cannot take another stream
            if s.pipeline not in self.pipelines:
                self._pipeline_config(s.pipeline, "pipeline")
            await self.stored.save(s)
            self.api_stream_ids.add(s.id)
            await self.fleet.fleet.release(s.id, "changed through the API")  # a no-op unless it runs here
            self.fleet.offer(s, "api")
            await self.fleet.fleet.tick()
            return self.runners.get(s.id)

    def has_stream(self, sid: str) -> bool:
        """A stream this daemon runs, or (fleet mode) one of the fleet's streams, wherever it runs."""
        return sid in self.runners or (self.fleet is not None and sid in self.fleet.cfgs)

    def stream_config(self, sid: str) -> StreamConfig:
        if sid in self.runners:
            return self.runners[sid].cfg
        assert self.fleet is not None
        return self.fleet.cfgs[sid][0]

    def stream_ids(self) -> list[str]:
        return sorted(set(self.runners) | (set(self.fleet.cfgs) if self.fleet is not None else set()))

    def _restore_stream(self, old: StreamRunner) -> None:
        try:
            self.add_stream(old.cfg, old.origin)
        except StreamdError as e:
            self.add_failed_stream(old.cfg, str(e))

    async def api_delete_stream(self, stream_id: str) -> None:
        """Forget the stream in Redis first (a Redis error leaves it running), then stop it."""
        assert self.stored is not None
        async with self._stream_lock(stream_id):
            if not self.has_stream(stream_id):
                raise StreamNotFound(stream_id)
            await self.stored.delete(stream_id)
            self.api_stream_ids.discard(stream_id)
            if self.fleet is not None and stream_id in self.fleet.cfgs:
                await self.fleet.withdraw(stream_id)  # stops it here if it runs here; the owner sees it go
            else:
                await self.remove_stream(stream_id, drop_group=True)
            self.metrics.forget_stream(stream_id)  # its series go with it (a replaced stream keeps them)
        self._stream_locks.pop(stream_id, None)

    def _stream_lock(self, stream_id: str) -> asyncio.Lock:
        """Changes of one stream are serialised; a slow change (a stream that takes seconds to stop) never holds up
        another stream's."""
        return self._stream_locks.setdefault(stream_id, asyncio.Lock())

    async def remove_stream(self, stream_id: str, drop_group: bool = False) -> None:
        """Stop a stream. `drop_group` (a DELETE): its Redis input's consumer group goes too (a replaced stream
        keeps it: the new one reads on where the old one stopped)."""
        runner = self.runners.pop(stream_id)
        runner.stop()
        task = self._tasks.get(f"stream:{stream_id}")
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        if self.sink is not None and self.sink.healthy:
            # its last results are buffered in the sink: once this returns, nothing more of the stream appears
            await self.sink.flushed(_FLUSH_ON_REMOVE_S)
        if drop_group:
            await self._drop_consumer_group(runner)

    async def _drop_consumer_group(self, runner: StreamRunner) -> None:
        """A removed stream's Redis input: the consumer group it created goes too, unless another stream reads
        the same key with the same group (the entries themselves are the user's and stay)."""
        src = runner.redis_source
        if src is None:
            return
        group = runner.cfg.redis_input.group
        ident = (runner.ref.url if runner.ref else "", src.key, group)
        if not (src.created_group or ident in self._groups_made):
            return  # the group was there before streamd: not ours to remove
        self._groups_made.add(ident)  # the last stream reading it removes it
        for other in self.runners.values():
            o = other.redis_source
            if other.ref is not None and other.ref.kind == "redis" and other.ref.key == src.key \
                    and other.ref.url == runner.ref.url and other.cfg.redis_input.group == group \
                    and other.state not in (State.STOPPED, State.FAILED) and (o is None or o is not src):
                return
        try:
            await src.r.xgroup_destroy(src.key, group)
            self._groups_made.discard(ident)
            log.info("consumer group removed", stream=runner.cfg.id, key=src.key, group=group)
        except Exception as e:  # noqa: BLE001 - Redis down: the group stays, nothing else is affected
            log.warning("consumer group not removed", stream=runner.cfg.id, error=str(e))

    async def _run_stream(self, runner: StreamRunner, pipeline: Pipeline) -> None:
        try:
            # frames wait for loaded models, not in a queue going stale
            ready = asyncio.ensure_future(pipeline.ready.wait())
            stopped = asyncio.ensure_future(runner.stopped.wait())
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
            await runner.run()
        except Exception as e:  # noqa: BLE001 - one stream's bug never stops the others
            log.exception("stream task crashed", stream=runner.cfg.id)
            runner._set_state(State.FAILED, f"internal error: {type(e).__name__}: {e}")
        # the queue is closed now; the pipeline reads what is left and delivers it, then forgets the stream (so a
        # tracker is never dropped while the stream's last frames are still on their way through the stages)
        while (len(runner.queue) or pipeline.in_flight(runner.cfg.id)) and \
                self.pipelines.get(pipeline.name) is pipeline:
            await asyncio.sleep(0.05)
        pipeline.ingress.detach(runner.cfg.id)
        pipeline.forget_stream(runner.cfg.id)
        self._tasks.pop(f"stream:{runner.cfg.id}", None)

    def _client(self, url: str) -> aioredis.Redis:
        if not url or url == self.redis_url:
            assert self._inputs_redis is not None
            return self._inputs_redis
        c = self._clients.get(url)
        if c is None:
            c = self._clients[url] = redis_client(url)
        return c

    # -- pipelines --------------------------------------------------------------------------------------------
    def _pipeline_config(self, name: str, where: str) -> Any:
        pcfg = pipeline_files.resolve(self.cfg, name, where)
        stages = [build_stage(st, f"{where}[{name}].stages.{i}") for i, st in enumerate(pcfg.stages)]
        return pcfg, stages

    def _pipeline(self, name: str, where: str) -> Pipeline:
        p = self.pipelines.get(name)
        if p is not None:
            return p
        pcfg, stages = self._pipeline_config(name, where)
        assert self.sink is not None
        ctx = StageContext(models=self.models, events=self.sink.event, prompts=self.prompt_cache,
                           publish=self.sink.record, fail_stream=self._fail_stream, metrics=self.metrics)
        for st in stages:
            st.bind(ctx)
        p = self.pipelines[name] = Pipeline(name, pcfg, stages, self._deliver, self.metrics)
        self.pipeline_errors.pop(name, None)
        p.prompts = self.prompt_cache
        assert self._tg is not None
        self._tasks[f"pipeline:{name}"] = self._tg.create_task(self._run_pipeline(p), name=f"pipeline:{name}")
        return p

    async def _run_pipeline(self, p: Pipeline) -> None:
        try:
            await p.run()
        except Exception as e:  # noqa: BLE001 - a pipeline that cannot start fails its streams, not the daemon
            reason = f"pipeline {p.name!r} failed: {type(e).__name__}: {e}"
            log.error("pipeline failed", pipeline=p.name, error=reason)
            for sid, name in list(self._stream_pipeline.items()):
                r = self.runners.get(sid)
                if name == p.name and r is not None:
                    r.fail(reason)
            self.pipelines.pop(p.name, None)
            self.pipeline_errors[p.name] = reason

    async def _deliver(self, works: list[Work]) -> None:
        assert self.sink is not None
        ok: list[Work] = []
        for w in works:
            f = w.frame
            if w.error is not None:
                self.metrics.frames_failed.labels(f.stream_id).inc()
                if f.ref is not None:
                    runner = self.runners.get(f.stream_id)
                    if runner is not None:
                        try:
                            await runner.failed(f.ref, w.error)
                        except Exception as e:  # noqa: BLE001 - Redis down: the entry stays pending
                            log.warning("could not record a failed entry", stream=f.stream_id, error=str(e))
                    continue
                self.sink.event(f.stream_id, "frame_failed", {"seq": f.seq, "reason": w.error})
            ok.append(w)
        if ok:
            await self.sink.publish_results(ok)

    def _fail_stream(self, stream_id: str, reason: str) -> None:
        """A stage failed this stream for good (its vocabulary cannot be set), also a file that ended while its last
        frames were in the pipeline; the other streams run on. A removed stream is not in `runners` any more."""
        r = self.runners.get(stream_id)
        if r is not None and r.state is not State.FAILED:
            r.fail(reason)

    def _settled(self, ref: Any) -> None:
        for r in self.runners.values():
            if r.ref is not None and r.ref.key == ref.key:
                r.settled(ref)

    # -- monitoring ------------------------------------------------------------------------------------------
    async def _watch_loop_lag(self, interval_s: float = 0.1) -> None:
        loop = asyncio.get_running_loop()
        last: dict[str, tuple[int, int]] = {}
        last_t = loop.time()
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval_s)
            now = loop.time()
            lag = max(0.0, now - t0 - interval_s)
            self.loop_lag_s.append(lag)
            self.metrics.loop_lag.observe(lag)
            if now - last_t < 1.0:
                continue
            dt, last_t = now - last_t, now
            for sid, r in list(self.runners.items()):
                self.metrics.queue_depth.labels(sid).set(len(r.queue))
                dec, out = r.decoded, self.sink.results_by_stream.get(sid, 0) if self.sink is not None else 0
                pdec, pout = last.get(sid, (0, 0))
                if dec >= pdec:
                    self.metrics.frames_in.labels(sid).inc(dec - pdec)
                r.fps_in, r.fps_out = max(0, dec - pdec) / dt, max(0, out - pout) / dt
                last[sid] = (dec, out)

    def stream_info(self, sid: str) -> dict[str, Any]:
        if sid not in self.runners:
            return self._remote_info(sid)
        r = self.runners[sid]
        return {"id": sid, "url": r.url_redacted, "pipeline": r.cfg.pipeline, "state": r.state.value,
                "reason": r.reason, "reason_code": r.reason_code, "last_error": r.last_error, "fps": r.fps, "fps_in": round(r.fps_in, 2), "fps_out": round(r.fps_out, 2),
                "frames_sampled": r.frames, "frames_decoded": r.decoded, "dropped": r.drops.total,
                "queue_depth": len(r.queue), "last_frame_ts": r.last_frame_ts,
                "results": self.sink.results_by_stream.get(sid, 0) if self.sink is not None else 0,
                "source": "api" if sid in self.api_stream_ids else "config",
                "owner": self.fleet.member_id if self.fleet is not None else None}

    def _remote_info(self, sid: str) -> dict[str, Any]:
        """A fleet stream another daemon runs (or none yet): what its owner's heartbeat says."""
        assert self.fleet is not None
        s, origin = self.fleet.cfgs[sid]
        remote = self.fleet.remote(sid) or {}
        owner = remote.get("owner")
        return {"id": sid, "url": redact_url(s.url), "pipeline": s.pipeline,
                "state": remote.get("state", "connecting"),
                "reason": None if owner else "waiting for a daemon of the fleet to take it",
                "reason_code": None, "last_error": None, "fps": s.fps, "fps_in": 0.0,
                "fps_out": remote.get("fps_out", 0.0), "frames_sampled": 0, "frames_decoded": 0, "dropped": 0,
                "queue_depth": 0, "last_frame_ts": None, "results": 0, "source": origin, "owner": owner}

    def status(self) -> dict[str, Any]:
        return {
            "redis": {"healthy": self.sink is not None and self.sink.healthy, "buffered": len(self.sink) if self.sink is not None else 0,
                      "last_error": self.sink.last_error if self.sink is not None else None},
            "streams": {sid: self.stream_info(sid) for sid in self.runners},
        }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamd")
    except PackageNotFoundError:
        return "unknown"


def check_config(cfg: Config) -> None:
    """Everything `streamd validate` checks beyond the schema: pipelines exist and their stages' options."""
    for i, s in enumerate(cfg.streams):
        pcfg = pipeline_files.resolve(cfg, s.pipeline, f"streams.{i}.pipeline")
        for j, st in enumerate(pcfg.stages):
            build_stage(st, f"streams.{i}.pipeline[{s.pipeline}].stages.{j}")
    for name, pcfg in cfg.pipelines.items():
        for j, st in enumerate(pcfg.stages):
            build_stage(st, f"pipelines.{name}.stages.{j}")
    for t in cfg.api.tokens:
        t.value(dict(os.environ))

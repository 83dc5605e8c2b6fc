"""The daemon owns the lifecycle: startup(), run(), shutdown(); it composes the parts and owns none of their logic.

startup: glibc malloc thresholds for frame buffers (`streamd.memory`), Redis (the configured one, or an embedded
redis-server), one client per role, the sink, the prompt store and cache, the models, the stream manager and the
pipelines (the configured streams' pipelines validated before anything runs). run: the sink, the prompt cache, an
event-loop lag monitor, the control API, the fleet, the streams; returns when `stop` is set, after draining
in-flight frames within the grace period. shutdown: closes what startup opened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import redis.asyncio as aioredis

from streamd.batching import FRAME_BUSY_RATE, FRAME_TICK_S, Doorbell
from streamd.config import Config
from streamd.egress import EgressRules, StreamEgress
from streamd.frame_store import FrameLimits, FrameStore
from streamd.jobs.manager import JobManager
from streamd.log import get_logger
from streamd.aiocompat import fix_wait_for
from streamd.memory import tune_malloc
from streamd.metrics import Metrics
from streamd.models import ModelManager
from streamd.pipeline_versions import PipelineStore
from streamd.prompts import PromptCache, PromptStore
from streamd.redis_clients import redis_client
from streamd.redis_server import ManagedRedis
from streamd.sinks.redis import RedisSink
from streamd.sources.redis import default_consumer_name
from streamd.stages import StageContext
from streamd.streams.manager import StreamManager
from streamd.streams.pipelines import PipelineSet, pipeline_config
from streamd.streams.switch import ModelSwitches

log = get_logger("streamd.daemon")
CACHE_POOL = 4


class Daemon:
    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.embedded: ManagedRedis | None = None
        self.redis_url: str = cfg.redis.url or ""
        self.redis: aioredis.Redis | None = None  # the API's, the prompt store's, the stored streams'
        self._clients: dict[Any, aioredis.Redis] = {}  # Redis inputs: by URL, by (URL, policy) on other servers
        self._role_clients: list[aioredis.Redis] = []
        self.sink: RedisSink | None = None
        self.frames: FrameStore | None = None  # recent frames per stream (snapshots)
        self.models = ModelManager(cfg.models, self.metrics)  # the catalog: lazy loads, budgets, idle unloads
        self.prompts: PromptStore | None = None
        self.prompt_cache: PromptCache | None = None
        self.streams: StreamManager = None  # type: ignore[assignment] - made by startup()
        self.pipelines: PipelineSet = None  # type: ignore[assignment] - made by startup()
        self.jobs: JobManager = None  # type: ignore[assignment] - made by startup()
        self.loop_lag_s: deque[float] = deque(maxlen=10_000)
        self.started = asyncio.Event()
        self.consumer = cfg.redis.consumer or default_consumer_name()
        self.api_url: str | None = None
        self.api: Any = None  # streamd.api.ApiServer while it runs

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        # validate every stream's pipeline (and stage options) before anything starts
        for i, s in enumerate(self.cfg.streams):
            pipeline_config(self.cfg, s.pipeline, f"streams.{i}.pipeline")
        log.debug("malloc thresholds", tuned=tune_malloc())
        fix_wait_for()  # before 3.12 asyncio.wait_for can swallow a cancellation (redis-py's every write uses it)
        if not self.redis_url:
            self.embedded = ManagedRedis(self.cfg.redis.data_dir)
            await asyncio.to_thread(self.embedded.start)
            self.redis_url = self.embedded.url
            log.info("started embedded redis-server", url=self.redis_url, data_dir=self.cfg.redis.data_dir)
        # the API, the prompt store, the stored streams: api.redis_pool connections (a request waits up to 2 s for
        # one, then 503 busy)
        self.redis = self._role(self.cfg.api.redis_pool)
        inputs = self._role(None)  # Redis inputs on the daemon's own Redis
        self._clients[self.redis_url] = inputs
        # the sink writes on a connection of its own; on a Redis Cluster through a client of its own (the API's
        # busy pool must never look like Redis being down to the sink)
        self.sink = RedisSink(self._role(None) if self.cfg.redis.cluster else self.redis, self.cfg.redis,
                              self.metrics)
        f = self.cfg.frames
        self.frames = FrameStore(FrameLimits(f.per_stream, f.max_bytes_per_stream, f.max_age_s, f.per_stream),
                                 f.max_total_bytes, f.jpeg_quality, metrics=self.metrics)
        self.sink.frames = self.frames  # each published frame kept (a few per stream), told its result's entry id
        self.prompts = PromptStore(self.redis)
        self.prompt_cache = PromptCache(PromptStore(self._role(CACHE_POOL)))  # its reads and pub/sub
        # decoder threads -> the loop
        doorbell = Doorbell(asyncio.get_running_loop(), FRAME_TICK_S, FRAME_BUSY_RATE)
        self.streams = StreamManager(self.cfg, self.metrics, self.redis, self.sink, doorbell, self._client,
                                     self.consumer, self.started)
        self.streams.frames = self.frames
        # jobs (streamd/jobs/): what the stages say about a job's frames goes to the job, not to a stream's keys
        self.jobs = JobManager(self.cfg, self.metrics, None, self.redis, self.prompts, self.sink, doorbell,
                               self.frames)
        ctx = StageContext(models=self.models, events=self.jobs.events, prompts=self.prompt_cache,
                           publish=self.jobs.publish, fail_stream=self.streams.fail_stream, metrics=self.metrics,
                           jobs_share=self.cfg.jobs.share)
        await self.models.start()  # preloads, the idle-unload task
        self.pipelines = self.streams.pipelines = PipelineSet(self.cfg, self.metrics, ctx, self.sink,
                                                              self.prompt_cache, self.streams.pipeline_failed)
        self.jobs.pipelines = self.pipelines
        # live model switches, versioned in Redis (its reads and pub/sub on the cache's kind of pool)
        self.pipelines.switches = ModelSwitches(self.cfg, self.pipelines, ctx, PipelineStore(self.redis),
                                                PipelineStore(self._role(CACHE_POOL)), self._pipeline_streams)

    def _pipeline_streams(self, pipeline: str) -> list[str]:
        return sorted(sid for sid, r in self.streams.runners.items() if r.cfg.pipeline == pipeline)

    def _role(self, max_connections: int | None) -> aioredis.Redis:
        c = redis_client(self.redis_url, max_connections, cluster=self.cfg.redis.cluster)
        self._role_clients.append(c)
        return c

    def _client(self, url: str, egress: StreamEgress | None = None) -> aioredis.Redis:
        """The client Redis inputs on the server at `url` share (the daemon's own Redis when `url` is empty or is
        `redis.url`: the operator's, not subject to the stream egress policy; another server is a single Redis).
        Another server's connections go through the stream's egress policy on every (re)connect (`egress`, or the
        configured policy with no trusted host): inputs with the same policy (rules, trusted host) share a client."""
        url = url or self.redis_url
        key: Any = url
        if url != self.redis_url:
            if egress is None:
                egress = StreamEgress(EgressRules.from_config(self.cfg.egress), "redis")
            key = (url, egress.rules, egress.trusted_host)
        c = self._clients.get(key)
        if c is None:
            policy = None if url == self.redis_url or egress is None else \
                StreamEgress(egress.rules, "redis-input", egress.trusted_host)
            c = self._clients[key] = redis_client(url, egress=policy)
            self._role_clients.append(c)
        return c

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain within the grace period."""
        assert self.sink is not None and self.prompt_cache is not None, "startup() first"
        streams = self.streams
        async with asyncio.TaskGroup() as tg:
            streams.bind(tg)
            self.jobs.bind(tg)
            background = [tg.create_task(self.sink.run(), name="sink"),
                          tg.create_task(self._watch_loop_lag(), name="loop-lag"),
                          tg.create_task(self.prompt_cache.run(), name="prompts")]
            if self.cfg.jobs.enabled:  # job leases: renewed, and a lost daemon's jobs taken over
                background.append(tg.create_task(self.jobs.watch(), name="jobs-watch"))
            switches = self.pipelines.switches
            background.append(tg.create_task(switches.run(), name="pipeline-versions"))
            try:  # pipelines start with their switched models (Redis unreachable: as configured, switched later)
                await asyncio.wait_for(switches.versions.tried.wait(), 5)
            except TimeoutError:
                log.warning("pipeline versions not loaded yet (Redis unreachable?)")
            api = None
            if self.cfg.api.enabled:
                from streamd.api import ApiServer

                api = ApiServer(streams, self.prompts, self.models, self.metrics, self.cfg, self.jobs)
                await api.start()
                self.api = api
                self.api_url = streams.api_url = api.url
            if self.cfg.fleet.enabled:
                from streamd.streams.fleet import FleetStreams

                streams.fleet = FleetStreams(streams, self._role(8), _version())
                background.append(tg.create_task(streams.fleet.run(), name="fleet"))
            for s in self.cfg.streams:
                streams.offer(s, "config")
            if not await streams.start_api_streams():  # Redis unreachable: keep trying in the background
                background.append(tg.create_task(streams.retry_api_streams(), name="api-streams"))
            try:
                await asyncio.wait_for(self.prompt_cache.loaded.wait(), 5)
            except TimeoutError:
                log.warning("prompts not loaded yet (Redis unreachable?)")
            self.started.set()
            await stop.wait()
            if api is not None:
                await api.stop()
            if streams.fleet is not None:  # hand every stream over at once, then stop
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(streams.fleet.leave(), self.cfg.shutdown.grace_s)
            log.info("stopping: draining in-flight frames", grace_s=self.cfg.shutdown.grace_s)
            try:
                await asyncio.wait_for(self._drain(), self.cfg.shutdown.grace_s)
            except TimeoutError:
                log.warning("grace period over: cancelling", unpublished=len(self.sink))
            self.prompt_cache.stop()
            await switches.aclose()
            streams.cancel()
            for t in background:
                t.cancel()
        streams.bind(None)
        self.jobs.bind(None)

    async def _drain(self) -> None:
        await self.jobs.drain()  # jobs are cancelled (said in their documents), streams drain
        await self.streams.drain()

    async def shutdown(self) -> None:
        await self.models.aclose()
        if self.frames is not None:
            self.frames.close()
        if self.sink is not None:
            await self.sink.aclose()
        for c in self._role_clients:
            with contextlib.suppress(Exception):  # closing a dead connection
                await c.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None

    async def __aenter__(self) -> "Daemon":
        await self.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

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
            if now - last_t >= 1.0:
                self.streams.measure(now - last_t, last)
                last_t = now


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamd")
    except PackageNotFoundError:
        return "unknown"

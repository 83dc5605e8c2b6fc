"""The stream manager: which streams run here, started, changed and stopped through one place.

Streams come from the config file and from the control API (kept in Redis by `store.py`, so a restarted or second
daemon runs them too). In fleet mode (`fleet.py`) a stream that needs an owner runs on exactly one daemon: this
manager offers it to the fleet, which calls `add_stream` / `remove_stream` as leases come and go. Each running
stream is one `StreamRunner` (supervisor.py) feeding its pipeline; when it ends, the pipeline's end-of-stream
marker says when its last frame is through and the stages have forgotten it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamd.batching import Doorbell
from streamd.config import Config, StreamConfig
from streamd.egress import EgressRules
from streamd.errors import SourceError, StreamdError
from streamd.fleet import ConfigStreamInFleet, StandingAside
from streamd.log import get_logger
from streamd.metrics import Metrics
from streamd.pipeline import Pipeline
from streamd.sources import parse_reference
from streamd.streams.groups import ConsumerGroups
from streamd.streams.info import StreamInfo
from streamd.streams.pipelines import PipelineSet
from streamd.streams.predict import Predictor, PredictUnavailable
from streamd.streams.store import StoredStreams, StreamExists, StreamNotFound
from streamd.streams.supervisor import State, StreamRunner

log = get_logger("streamd.streams")
_FLUSH_ON_REMOVE_S = 5.0  # a removed stream's buffered results: how long its removal waits for them (Redis up)


def _reads_elsewhere(old: StreamRunner, s: StreamConfig) -> bool:
    """Whether the changed stream `s` no longer reads the Redis input (server, key, consumer group) `old` read."""
    if old.ref is None or old.ref.kind != "redis":
        return False
    try:
        ref = parse_reference(s.url)
    except SourceError:
        return True
    return (ref.kind, ref.url, ref.key, s.redis_input.group) != ("redis", old.ref.url, old.ref.key,
                                                                  old.cfg.redis_input.group)


class StreamManager(StreamInfo):
    def __init__(self, cfg: Config, metrics: Metrics, redis: aioredis.Redis, sink: Any, doorbell: Doorbell,
                 client: Callable[..., aioredis.Redis], consumer: str, started: asyncio.Event):
        self.cfg = cfg
        self.metrics = metrics
        self.redis = redis  # the API's client (the stored streams; /health's PING)
        self.sink = sink
        self.doorbell = doorbell
        self.client = client  # url -> the Redis client Redis inputs on that server use
        self.consumer = consumer
        self.started = started  # set once the configured and stored streams were offered
        self.store = StoredStreams(redis)
        self.pipelines: PipelineSet = None  # type: ignore[assignment] - set by the daemon (it needs fail_stream)
        self.runners: dict[str, StreamRunner] = {}
        self.api_stream_ids: set[str] = set()
        self.fleet: Any = None  # streamd.streams.fleet.FleetStreams when fleet.enabled
        self.api_url: str | None = None
        self.frames: Any = None  # streamd.frame_store.FrameStore: recent frames per stream (set by the daemon)
        self._groups = ConsumerGroups()
        self._stream_pipeline: dict[str, str] = {}
        self._tasks: dict[StreamRunner, asyncio.Task[None]] = {}  # by runner: a stream id re-added while its old
        # runner is still finishing has two
        self._tg: asyncio.TaskGroup | None = None
        self._api_lock = asyncio.Lock()  # held while the streams kept in Redis are loaded
        # one API change of a stream at a time: the lock, and how many requests hold it or wait for it (the entry goes
        # when none does: refused requests for ever new ids leave nothing behind)
        self._stream_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self.predict = Predictor(self, cfg.api.predict, metrics)  # single images (POST /api/v1/predict/{pipeline})

    def bind(self, tg: asyncio.TaskGroup | None) -> None:
        """The task group streams and pipelines run in (the daemon's), or None once it is gone."""
        self._tg = tg

    # -- starting and stopping -----------------------------------------------------------------------------------
    def offer(self, s: StreamConfig, origin: str) -> None:
        """Start a stream here, or (fleet mode) let the fleet place it on one daemon."""
        if self.fleet is not None:
            self.fleet.offer(s, origin)
        else:
            self.add_stream(s, origin)

    def _emitter(self, fence: tuple[str, str] | None) -> Callable[..., None]:
        """How a stream's runner publishes its events: plain, or (fleet mode, a leased stream) under the lease it
        runs with (`fence`: lease key, token): its events are written only while that lease holds, like its
        results, so a daemon that lost the lease publishes no stale event (a `state` event of its stop)."""
        if fence is None:
            return self.sink.event
        event = self.sink.event

        def emit(stream_id: str, kind: str, fields: dict[str, Any] | None = None) -> None:
            event(stream_id, kind, fields, fence)

        return emit

    def add_stream(self, s: StreamConfig, origin: str = "config",
                   fence: tuple[str, str] | None = None) -> StreamRunner:
        """Start a stream (the daemon must be running). Raises ConfigError for an unknown pipeline. `origin` is
        "config" (the operator's file: its own host stays reachable) or "api" (the whole egress policy). `fence`
        (fleet mode): the lease its events are written under."""
        assert self._tg is not None, "the daemon is not running"
        if s.id in self.runners and self.runners[s.id].state not in (State.STOPPED, State.FAILED):
            raise StreamdError(f"stream {s.id!r} exists")
        if s.paused:  # kept, shown stopped: nothing connects (PATCH paused: false replaces it with a running one)
            runner = StreamRunner(s, self.metrics, self._emitter(fence), self.client, self.consumer,
                                  self.cfg.events.drop_event_interval_s)
            self.runners[s.id] = runner
            runner._set_state(State.STOPPED, "paused", "paused")
            runner.stop()
            return runner
        pipeline = self.pipelines.get_or_start(s.pipeline, f"streams.{s.id}.pipeline", self._tg)
        runner = StreamRunner(s, self.metrics, self._emitter(fence), self.client, self.consumer,
                              self.cfg.events.drop_event_interval_s, self.doorbell,
                              EgressRules.from_config(self.cfg.egress), origin, tuple(self.cfg.egress.rtsp_transports))
        self.runners[s.id] = runner
        self._stream_pipeline[s.id] = s.pipeline
        if self.frames is not None:  # re-scoring keeps more of its frames (keep_frames); else the snapshot few
            self.frames.set_limits(s.id, self._keep_limits(s))
        ended = pipeline.attach(s.id, runner.queue)
        self._tasks[runner] = self._tg.create_task(self._run_stream(runner, pipeline, ended), name=f"stream:{s.id}")
        log.info("stream added", stream=s.id, url=runner.url_redacted, pipeline=s.pipeline)
        return runner

    def _keep_limits(self, s: StreamConfig) -> Any:
        from streamd.frame_store import FrameLimits

        k = s.keep_frames
        if k is None:
            return None
        raw = min(self.cfg.frames.per_stream, k.max_frames)
        return FrameLimits(k.max_frames, k.max_bytes, k.max_age_s, raw)

    def start_pipeline(self, name: str, where: str) -> Pipeline:
        """The running pipeline `name`, started if none runs (a predict request's: streams/predict.py). Raises
        ConfigError naming `where`; PredictUnavailable while the daemon does not run."""
        if self._tg is None:
            raise PredictUnavailable("the daemon is not running")
        return self.pipelines.get_or_start(name, where, self._tg)

    def add_failed_stream(self, s: StreamConfig, reason: str) -> StreamRunner:
        """Show a stream that cannot start (its pipeline is gone, its stored entry is invalid) as failed, with the
        reason; nothing runs for it. PATCH or DELETE through the API replace or remove it."""
        runner = StreamRunner(s, self.metrics, self.sink.event, self.client, self.consumer,
                              self.cfg.events.drop_event_interval_s)
        self.runners[s.id] = runner
        runner.fail(reason)
        return runner

    def add_ended_stream(self, s: StreamConfig, origin: str, state: State, reason: str | None,
                         code: str | None) -> StreamRunner:
        """Fleet mode: a stream that ended (end of input) on the daemon that ran it before, shown as it ended;
        nothing plays (its end was announced once, by that daemon). PATCH or DELETE through the API replace it."""
        runner = StreamRunner(s, self.metrics, self.sink.event, self.client, self.consumer,
                              self.cfg.events.drop_event_interval_s, origin=origin)
        self.runners[s.id] = runner
        runner.state, runner.reason, runner.reason_code = state, reason, code if reason else None
        if state is State.FAILED:
            runner.last_error = reason
        self.metrics.stream_state.labels(s.id, state.value).set(1)
        runner.stop()
        return runner

    async def remove_stream(self, stream_id: str, drop_group: bool = False) -> None:
        """Stop a stream and wait until its last frames are through and published. `drop_group` (a DELETE): its
        Redis input's consumer group goes too (a replaced stream keeps it: the new one reads on from there)."""
        runner = self.runners.pop(stream_id)
        runner.stop()
        task = self._tasks.get(runner)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        if self.sink.healthy:  # its last results are buffered in the sink: once this returns, nothing more appears
            await self.sink.flushed(_FLUSH_ON_REMOVE_S)
        if drop_group:
            await self._groups.drop(runner, self.runners.values())

    async def _run_stream(self, runner: StreamRunner, pipeline: Pipeline, ended: asyncio.Future[None]) -> None:
        sid = runner.cfg.id
        try:
            # frames wait for loaded models, not in a queue going stale
            ready = asyncio.ensure_future(pipeline.ready.wait())
            stopped = asyncio.ensure_future(runner.stopped.wait())
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
            await runner.run()
        except Exception as e:  # noqa: BLE001 - one stream's bug never stops the others
            log.exception("stream task crashed", stream=sid)
            runner._set_state(State.FAILED, f"internal error: {type(e).__name__}: {e}")
        # the queue is closed now: its end marker follows the last frame through the stages, and the stages forget
        # the stream once it is through (a tracker is never dropped while the stream's frames are on their way)
        if not pipeline.ready.is_set():
            pipeline.detach(runner.queue)  # nothing of it entered: its setup is still going on (or failed)
        task = self.pipelines.task(pipeline)
        if task is not None and not ended.done():
            await asyncio.wait({ended, task}, return_when=asyncio.FIRST_COMPLETED)
        if self.fleet is not None and ended.done():
            # an end for good is recorded, behind the stream's last results (all in the sink now: written first), so
            # the stream's next owner does not play it again, and no result of it is missing then
            self.fleet.finished(runner)
        self._tasks.pop(runner, None)

    async def drain(self) -> None:
        """Stop every stream, let the pipelines finish what they hold, publish it."""
        for r in self.runners.values():
            r.stop()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.pipelines.close()
        while self.sink.healthy and len(self.sink):
            await self.sink.wait_idle()

    def cancel(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        self.pipelines.cancel()

    def fail_stream(self, stream_id: str, reason: str) -> None:
        """A stage failed this stream for good (its vocabulary cannot be set), also a file that ended while its last
        frames were in the pipeline; the other streams run on. A removed stream is not in `runners` any more."""
        r = self.runners.get(stream_id)
        if r is not None and r.state is not State.FAILED:
            r.fail(reason)

    def pipeline_failed(self, name: str, reason: str) -> None:
        """A pipeline could not start: the streams using it fail with the reason."""
        for sid, pname in list(self._stream_pipeline.items()):
            r = self.runners.get(sid)
            if pname == name and r is not None:
                r.fail(reason)

    # -- streams added through the API, kept in Redis --------------------------------------------------------------
    async def start_api_streams(self) -> bool:
        """Start the streams kept in Redis; one that cannot start is shown failed and never stops the daemon.
        False when Redis could not be read."""
        async with self._api_lock:
            try:
                stored = await self.store.load()
            except (RedisError, OSError) as e:
                log.warning("could not load API-added streams from Redis", error=str(e) or type(e).__name__)
                return False
            for s, problem in stored:
                if s.id in self.runners or (self.fleet is not None and s.id in self.fleet.cfgs):
                    continue  # a stream of the config file (or one added meanwhile) has this id
                self.api_stream_ids.add(s.id)
                if problem is None:
                    try:
                        self.offer(s, "api")
                        continue
                    except StreamdError as e:
                        problem = str(e)
                    except Exception as e:  # noqa: BLE001 - one stored stream's bug never stops the daemon
                        log.exception("stored stream crashed at start", stream=s.id)
                        problem = f"internal error: {type(e).__name__}: {e}"
                self.add_failed_stream(s, f"stored stream cannot start: {problem}")
        return True

    async def retry_api_streams(self, interval_s: float = 1.0) -> None:
        while not await self.start_api_streams():
            await asyncio.sleep(interval_s)
        log.info("API-added streams loaded from Redis")

    async def api_put_stream(self, s: StreamConfig, replace: bool = False, pending: bool = False) \
            -> StreamRunner | None:
        """Add (or, with `replace`, change) a stream, then keep it in Redis so a restarted or second daemon sees
        it. Only an accepted stream is kept: a ConfigError (bad pipeline) leaves the old stream running and Redis
        untouched; a Redis error stops the new stream again and restores the old one. A change of a running
        stream's `fps` or `stall_timeout_s` alone is applied without a restart (StreamRunner.apply: no reconnect,
        `seq` and trackers go on). In fleet mode the fleet places it (the runner when it runs here, else None); a
        new stream the fleet has no room for is refused (CapacityExhausted), or with `pending` kept until a daemon
        has room."""
        if self.fleet is not None and self.fleet.leases_kind(s):
            return await self._fleet_put_stream(s, replace, pending)
        async with self._stream_lock(s.id):
            self._check_not_aside()
            if (s.id in self.runners) != replace:
                raise StreamNotFound(s.id) if replace else StreamExists(s.id)
            old = self.runners.get(s.id)
            if old is not None and old.can_apply(s):
                await self.store.save(s)  # a Redis error leaves the stream as it was
                old.apply(s)
                self.api_stream_ids.add(s.id)
                return old
            if s.pipeline not in self.pipelines:
                self.pipelines.config(s.pipeline, "pipeline")  # ConfigError before the old stream is touched
            if old is not None:
                await self.remove_stream(s.id)
            try:
                runner = self.add_stream(s, "api")
                try:
                    await self.store.save(s)
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
            if old is not None and _reads_elsewhere(old, s):  # its Redis input's group on the old key (or the old
                await self._groups.drop(old, self.runners.values())  # group) is left unless another stream reads it
            return runner

    async def _fleet_put_stream(self, s: StreamConfig, replace: bool, pending: bool) -> StreamRunner | None:
        """Fleet mode: keep the stream in Redis and let the fleet place it (here when this daemon is its preferred
        owner: placed at once; otherwise another daemon takes it within a renew interval)."""
        async with self._stream_lock(s.id):
            async with self.fleet.local_change(s.id):  # a sync under way leaves the stream alone
                self._check_not_aside()
                if self.has_stream(s.id) != replace:
                    raise StreamNotFound(s.id) if replace else StreamExists(s.id)
                if not replace and (self.elsewhere(s.id) is not None
                                    or self.fleet.fleet.wanted_elsewhere(s.id, named=True)):
                    # another live daemon's config file names it (it runs it, or will once it has room: full,
                    # restarting, over its load limit): an API stream of that id would take it over
                    raise StreamExists(s.id)
                if not (replace or pending):
                    self.fleet.admit(s.id)  # CapacityExhausted when the fleet cannot take another stream
                try:
                    if s.pipeline not in self.pipelines:
                        self.pipelines.config(s.pipeline, "pipeline")
                    known = self.fleet.cfgs.get(s.id)
                    await self.store.save(s)
                    self.api_stream_ids.add(s.id)
                    await self.fleet.fleet.release(s.id, "changed through the API")  # a no-op unless it runs here
                    if known is None or known[0] != s:  # changed: it plays from its start. The same again (an
                        await self.fleet.forget_end(s.id)  # idempotent PUT) keeps its end, whichever daemon got it
                    self.fleet.offer(s, "api")
                finally:
                    self.fleet.unreserve(s.id)
            # outside local_change: a sync meanwhile may see it deleted through another daemon (it is withdrawn)
            await self.fleet.fleet.place(s.id)  # here at once when this daemon is its preferred owner: not a whole
            return self.runners.get(s.id)  # tick, which would wait for the one under way (a rebalance, a slow Redis)

    def _check_not_aside(self) -> None:
        """Fleet mode: a daemon standing aside (another running daemon has its fleet.member_id) changes no stream
        (StandingAside): it holds no lease, so a DELETE would stop nothing, and the shared records (the stream's
        end) are the fleet's."""
        if self.fleet is not None and (why := self.fleet.fleet.standing_aside()) is not None:
            raise StandingAside(why)

    def _restore_stream(self, old: StreamRunner) -> None:
        try:
            self.add_stream(old.cfg, old.origin)
        except StreamdError as e:
            self.add_failed_stream(old.cfg, str(e))

    async def api_delete_stream(self, stream_id: str) -> None:
        """Forget the stream in Redis first (a Redis error leaves it running), then stop it. In fleet mode a stream of
        the config file that other live daemons want is not deleted (ConfigStreamInFleet)."""
        async with self._stream_lock(stream_id), (self.fleet.local_change(stream_id) if self.fleet is not None
                                                  else contextlib.nullcontext()):  # a sync under way leaves it alone
            self._check_not_aside()
            if not self.has_stream(stream_id):
                raise StreamNotFound(stream_id)
            if self.fleet is not None and self.fleet.cfgs.get(stream_id, (None, ""))[1] == "config" \
                    and (others := self.fleet.fleet.wanted_elsewhere(stream_id)):
                raise ConfigStreamInFleet(stream_id, others)  # their config files would start it again
            await self.store.delete(stream_id)
            self.api_stream_ids.discard(stream_id)
            if self.fleet is not None and stream_id in self.fleet.cfgs:
                await self.fleet.withdraw(stream_id)  # stops it here if it runs here; the owner sees it go
                await self.fleet.forget_end(stream_id)
            else:
                await self.remove_stream(stream_id, drop_group=True)
            await self.store.forget_marks(stream_id)
            self.forget_stream(stream_id)

    def forget_stream(self, stream_id: str) -> None:
        """A deleted stream (through this daemon's API, or in fleet mode another's: its owner forgets it when it
        sees it go): its metric series, recent frames and result count go with it (a replaced stream keeps them)."""
        self.metrics.forget_stream(stream_id)
        if self.frames is not None:
            self.frames.drop(stream_id)
        forget = getattr(self.sink, "forget_stream", None)
        if forget is not None:
            forget(stream_id)

    @contextlib.asynccontextmanager
    async def _stream_lock(self, stream_id: str) -> AsyncIterator[None]:
        """Changes of one stream are serialised; a slow change (a stream that takes seconds to stop) never holds up
        another stream's. The id's entry lives while a request holds or waits for its lock."""
        entry = self._stream_locks.get(stream_id)
        if entry is None:
            entry = self._stream_locks[stream_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0 and self._stream_locks.get(stream_id) is entry:
                del self._stream_locks[stream_id]

    # -- what streams there are ------------------------------------------------------------------------------------
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

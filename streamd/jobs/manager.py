"""The jobs of a daemon: accepted, queued, at most `jobs.max_running` running at once, their documents and records
in Redis (store.py). Past `jobs.max_queued` waiting jobs, a new one is refused (JobsFull: 503 with Retry-After).

The manager also routes what the stages say about a job's stream id (`_job:<id>`): VLM records and events go to the
job, never to a stream's Redis keys (the daemon builds the stages' context with `events` and `publish` from here).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

from streamd.config import Config
from streamd.egress import EgressRules
from streamd.errors import StreamdError
from streamd.frames import JOB_PREFIX
from streamd.jobs.options import JobSpec
from streamd.jobs.runner import TERMINAL, Job
from streamd.jobs.sources import RecordedSource, StoredSource
from streamd.jobs.store import JobStore, LeaseLost
from streamd.log import get_logger, redact_url
from streamd.metrics import Metrics

log = get_logger("streamd.jobs")

SETTLE_WAIT_S = 10.0  # a GET of a job that has just ended waits at most this for its last records to be written


class JobError(StreamdError):
    """A job that cannot be accepted; the API maps each kind to its code."""


class JobsFull(JobError):
    def __init__(self, queued: int, bound: int, retry_after_s: int):
        super().__init__(f"{queued} jobs wait already (jobs.max_queued {bound}); try again in {retry_after_s} s")
        self.queued, self.bound, self.retry_after_s = queued, bound, retry_after_s


class JobInvalid(JobError):
    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.details = code, details or {}


class JobsUnavailable(JobError):
    """The daemon does not run (or stops): no job starts."""


class JobManager:
    def __init__(self, cfg: Config, metrics: Metrics, pipelines: Any, redis: Any, prompts: Any, sink: Any,
                 doorbell: Any = None, frames: Any = None):
        self.cfg = cfg
        self.jcfg = cfg.jobs
        self.metrics = metrics
        self.pipelines = pipelines  # streamd.streams.pipelines.PipelineSet
        self.store = JobStore(redis, cfg.jobs.ttl_s, cfg.jobs.records_maxlen, cfg.jobs.lease_ttl_s)
        from streamd.fleet import default_member_id

        self.member_id = cfg.fleet.member_id or default_member_id()  # in job leases and documents
        self.prompt_store = prompts
        self.sink = sink
        self.doorbell = doorbell
        self.frames = frames  # the streams' stored frames (re-score), when the daemon keeps them
        self.jobs: dict[str, Job] = {}  # queued and running (ended ones are read from Redis)
        self._queue: deque[Job] = deque()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._durations: deque[float] = deque(maxlen=20)
        self._missing: dict[str, float] = {}  # job id -> when its lease was first seen missing (watch())
        self.uploading = 0  # uploads being received (POST /api/v1/jobs with a file): at most jobs.max_uploads

    def bind(self, tg: asyncio.TaskGroup | None) -> None:
        self._tg = tg

    # -- routing what the stages say -----------------------------------------------------------------------------
    def events(self, stream_id: str, kind: str, fields: dict[str, Any] | None = None) -> None:
        if stream_id.startswith(JOB_PREFIX):
            return  # a job's tracks and tags are in its summary; its state in its document
        self.sink.event(stream_id, kind, fields)

    def publish(self, key: str, maxlen: int, record: dict[str, Any]) -> None:
        sid = record.get("stream_id") or ""
        if sid.startswith(JOB_PREFIX):
            job = self.jobs.get(sid[len(JOB_PREFIX):])
            if job is not None:
                job.vlm(record)
            return
        self.sink.record(key, maxlen, record)

    # -- accepting ------------------------------------------------------------------------------------------------
    def refuse_if_full(self) -> None:
        if len(self._queue) >= self.jcfg.max_queued and len(self._tasks) >= self.jcfg.max_running:
            raise JobsFull(len(self._queue), self.jcfg.max_queued, self.retry_after_s())

    def retry_after_s(self) -> int:
        """About when a place frees: the mean duration of recent jobs over the jobs running (at least 1 s)."""
        if not self._durations:
            return 10
        mean = sum(self._durations) / len(self._durations)
        return int(min(3600, max(1, math.ceil(mean / max(1, self.jcfg.max_running)))))

    async def _prompts(self, spec: JobSpec, jid: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for kind, choice in spec.prompts.items():
            if choice.text is not None:
                if kind != "vlm":
                    raise JobInvalid("invalid_body", "an inline prompt is a vlm prompt; a vocabulary is a stored "
                                     "version (scope, version)", {"path": f"prompts.{kind}"})
                out[kind] = {"kind": kind, "scope": f"job:{jid}", "version": 0, "text": choice.text,
                             "schema": choice.schema_}
                continue
            from streamd.prompts import PromptNotFound

            try:
                rec = await self.prompt_store.version(kind, choice.scope or "", int(choice.version or 0))
            except PromptNotFound:
                raise JobInvalid("prompt_not_found", f"no {kind} prompt version {choice.version} in scope "
                                 f"{choice.scope!r}", {"path": f"prompts.{kind}"}) from None
            if rec.get("deleted"):
                raise JobInvalid("prompt_not_found", f"{kind} prompt version {choice.version} in scope "
                                 f"{choice.scope!r} is a deletion", {"path": f"prompts.{kind}"})
            out[kind] = rec
        return out

    def upload_path(self, jid: str) -> Path:
        d = Path(self.jcfg.upload_dir)
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{jid}.upload"

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    async def submit(self, spec: JobSpec, *, jid: str | None = None, upload: str | None = None,
                     origin: str = "api", filename: str | None = None) -> Job:
        """Accept a job (queued; started when a place is free). `upload`: the path of its uploaded (or, `streamd
        analyze`, local) video. Raises JobsFull, JobInvalid, ConfigError (the pipeline)."""
        if self._tg is None:
            raise JobsUnavailable("the daemon is not running")
        self.refuse_if_full()
        self.pipelines.config(spec.pipeline, "pipeline")  # ConfigError for an unknown or invalid pipeline
        jid = jid or self.new_id()
        prompts = await self._prompts(spec, jid)
        src = spec.source
        if upload is not None:
            doc: dict[str, Any] = {"kind": "upload" if origin == "api" else "file", "name": filename}
        elif src is not None and src.url is not None:
            doc = {"kind": "url", "url": redact_url(src.url)}
        elif src is not None and src.stream is not None:
            doc = {"kind": "stream", "stream": src.stream, "from": src.from_, "to": src.to}
            if self.frames is None:
                raise JobInvalid("invalid_body", "this daemon keeps no stream frames (frame_store)",
                                 {"path": "source.stream"})
        else:
            raise JobInvalid("invalid_body", "a job needs a source: url, stream, or an uploaded file",
                             {"path": "source"})
        job = Job(jid, spec, doc, self.jcfg, self.store, prompts)
        job.upload_path = upload if origin == "api" else None
        job.source = self._source(job, spec, upload, origin)
        self._own(job)
        await self.store.save_spec(jid, {"spec": spec.model_dump(by_alias=True, exclude_none=True),
                                         "prompts": prompts, "upload": upload, "origin": origin})
        await job.save(new=True)
        self._enqueue(job)
        log.info("job accepted", job=jid, pipeline=spec.pipeline, source=doc["kind"])
        return job

    def _own(self, job: Job) -> None:
        job.token, job.daemon = f"{self.member_id}|{secrets.token_hex(8)}", self.member_id
        self.jobs[job.id] = job

    def _enqueue(self, job: Job) -> None:
        self._queue.append(job)
        self._start_next()

    def _source(self, job: Job, spec: JobSpec, upload: str | None, origin: str) -> Any:
        s = spec.sampling
        fps = None if s.mode == "every_frame" else s.max_fps if s.mode == "scene" else s.fps
        if upload is not None:
            return RecordedSource(job.sid, upload, fps, self.jcfg, EgressRules.from_config(self.cfg.egress),
                                  self.metrics, self.doorbell, "config", spec.max_duration_s)
        assert spec.source is not None
        if spec.source.url is not None:
            return RecordedSource(job.sid, spec.source.url, fps, self.jcfg, EgressRules.from_config(self.cfg.egress),
                                  self.metrics, self.doorbell, origin, spec.max_duration_s)
        now = time.time()
        f, t = spec.source.from_, spec.source.to
        t0 = 0.0 if f is None else now + f if f < 0 else f
        t1 = now if t is None else now + t if t < 0 else t
        return StoredSource(self.frames, spec.source.stream or "", t0, t1, fps)

    async def _earlier(self, src: StoredSource) -> dict[int, list[dict[str, Any]]]:
        """Re-score: the stream's own VLM answers about the window's frames (newest first from its VLM stream, back
        to the window's start), by seq."""
        import json

        from streamd import keys

        seqs, out = set(src.seqs), {}
        key, end = keys.vlm_key(src.stream_id), "+"
        for _ in range(50):  # at most 50 pages of 1000
            page = await self.store.r.xrevrange(key, end, "-", count=1000)
            for eid, fields in page:
                rec = json.loads(fields[b"record"])
                if rec.get("kind") == "answer" and rec.get("seq") in seqs:
                    out.setdefault(rec["seq"], []).append(rec)
            if len(page) < 1000 or json.loads(page[-1][1][b"record"]).get("capture_ts", 0) < src.t0:
                break
            end = f"({page[-1][0].decode()}"
        return out

    # -- running ----------------------------------------------------------------------------------------------------
    def _start_next(self) -> None:
        while self._queue and len(self._tasks) < self.jcfg.max_running and self._tg is not None:
            job = self._queue.popleft()
            self._tasks[job.id] = self._tg.create_task(self._run(job), name=f"job:{job.id}")

    async def _run(self, job: Job) -> None:
        """A job from start to end; never raises into the daemon's task group (a bug or a Redis error fails the
        job, logged, and the daemon goes on)."""
        t0 = time.monotonic()
        try:
            await self._run_job(job)
        except Exception as e:  # noqa: BLE001 - a job's end, never the daemon's
            log.exception("job failed unexpectedly", job=job.id)
            job._fail(f"internal error: {type(e).__name__}: {e}"[:500], "internal")
            with contextlib.suppress(Exception):
                await job.save()
        finally:
            job.finished.set()
            self._durations.append(time.monotonic() - t0)
            self._tasks.pop(job.id, None)
            self.jobs.pop(job.id, None)
            self.metrics.forget_stream(job.sid)
            if not job.lease_lost:  # lost: the daemon that took the job over runs it again from that upload
                job.discard()
            self._start_next()

    async def _run_job(self, job: Job) -> None:
        if getattr(job.source, "total", None) == 0:  # a re-score with nothing kept: no pipeline to start
            job._fail(f"no kept frames of stream {job.stream_id!r} captured in the window (its keep_frames "
                      "bounds them)", "not_found")
            await job.save()
            return
        try:  # the job's own pipeline: its frames never hold a live stream's frames back in a stage
            p, task = self.pipelines.start_for_job(job.spec.pipeline, f"jobs.{job.id}.pipeline", self._tg)
        except StreamdError as e:
            job._fail(str(e), "invalid_pipeline")
            job.finished.set()
            await job.save()
            return
        try:
            if isinstance(job.source, StoredSource):
                try:
                    job.summary.earlier = await self._earlier(job.source)
                except Exception as e:  # noqa: BLE001 - Redis down: the new answers alone
                    log.warning("could not read a stream's earlier answers", job=job.id, error=str(e))
            await job.run(p, task)
        finally:
            task.cancel()  # the job is over: what its stages still hold is not wanted (they let their models go)
            await asyncio.gather(task, return_exceptions=True)
        if job.state == "failed" and job.reason_code == "pipeline_stopped":
            err = p.failed
            if err:
                job.reason, job.reason_code = err, "pipeline_failed"
                await job.save()

    # -- leases: a job whose daemon is lost ---------------------------------------------------------------------
    async def watch(self) -> None:
        """Renew the leases of this daemon's jobs and take over the jobs whose daemon was lost, every third of
        jobs.lease_ttl_s (a Redis error: tried again next round)."""
        every = max(0.2, self.jcfg.lease_ttl_s / 3)
        while True:
            ok = await self.lease_round()
            await asyncio.sleep(every if ok else min(every, 0.5))  # Redis back: our leases re-taken at once

    async def lease_round(self) -> bool:
        """One round of watch(); False: Redis failed it (what this daemon saw missing is forgotten: after an outage
        every lease may have expired, its holder's too, and the holder re-takes its own on its next round)."""
        try:
            await self._renew()
            await self._recover()
            return True
        except Exception as e:  # noqa: BLE001 - Redis away: the next round
            self._missing.clear()
            log.warning("job leases: a round failed", error=str(e) or type(e).__name__)
            return False

    async def _renew(self) -> None:
        for job in list(self.jobs.values()):
            if job.token and not job.lease_lost and not await self.store.renew(job.id, job.token):
                job.lose()
                if job in self._queue:  # never started here: nothing else ends it
                    self._queue.remove(job)
                    self.jobs.pop(job.id, None)
                    job.finished.set()

    async def _recover(self) -> None:
        """Take over the jobs whose lease this daemon has seen missing for a whole jobs.lease_ttl_s, from a round
        whose Redis link was healthy and with none failing since (a lease that expired in a Redis outage is its
        holder's to re-take: it renews every third of the TTL)."""
        now = time.monotonic()
        seen, self._missing = self._missing, {}
        for jid in await self.store.unowned(set(self.jobs)):
            first = seen.get(jid, now)
            if now - first < self.jcfg.lease_ttl_s:
                self._missing[jid] = first
                continue
            token = f"{self.member_id}|{secrets.token_hex(8)}"
            if not await self.store.claim(jid, token):
                continue  # another daemon was first
            try:
                await self._take_over(jid, token)
            except LeaseLost:
                pass
            except Exception:  # noqa: BLE001 - this job only
                log.exception("a lost daemon's job could not be taken over", job=jid)

    async def _take_over(self, jid: str, token: str) -> None:
        doc = await self.store.get(jid)
        if doc is None:
            await self.store.forget(jid)  # expired
            return
        if doc["state"] in TERMINAL:
            await self.store.save(doc, token)  # ended meanwhile: leaves the active set
            return
        lost_from, started = doc.get("daemon"), doc.get("started_ts") is not None
        attempt = int(doc.get("attempt") or 1)
        lost = list(doc.get("lost") or [])
        if started:
            lost.append({"attempt": attempt, "daemon": lost_from, "state": doc["state"],
                         "progress": doc.get("progress"), "noticed_by": self.member_id,
                         "noticed_ts": round(time.time(), 6)})
        log.warning("job's daemon lost: its lease expired", job=jid, daemon=lost_from, state=doc["state"])
        why = None
        saved = await self.store.spec(jid)
        if await self.store.cancel_requested(jid):
            doc.update(state="cancelled", reason="cancelled through the API (while its daemon was lost)",
                       reason_code="cancelled")
        elif started and attempt > self.jcfg.retries:
            why = f"jobs.retries ({self.jcfg.retries}) used"
        elif saved is None:
            why = "what it needs to run again is gone"
        else:
            why = self._not_again(doc, saved)
        if doc["state"] not in TERMINAL and why is None:
            assert saved is not None
            spec = JobSpec.model_validate(saved["spec"])
            job = Job(jid, spec, doc["source"], self.jcfg, self.store, saved.get("prompts") or {})
            job.created_ts = float(doc["created_ts"])
            job.attempt, job.lost = attempt + 1 if started else attempt, lost
            upload, origin = saved.get("upload"), saved.get("origin") or "api"
            job.upload_path = upload if origin == "api" else None
            job.source = self._source(job, spec, upload, origin)
            job.token, job.daemon = token, self.member_id
            await self.store.restart_records(jid, token)
            self.jobs[jid] = job
            await job.save()
            self._enqueue(job)
            log.info("job taken over: runs again from the start", job=jid, attempt=job.attempt)
            return
        if doc["state"] not in TERMINAL:
            doc.update(state="failed", reason=f"the daemon running the job ({lost_from}) was lost (its lease "
                       f"expired) and it is not run again: {why}", reason_code="daemon_lost")
        doc.update(ended_ts=round(time.time(), 6), lost=lost, daemon=self.member_id)
        await self.store.save(doc, token)
        if saved and saved.get("origin") == "api" and saved.get("upload"):
            with contextlib.suppress(OSError):
                os.unlink(saved["upload"])  # on this host when the lost daemon was (the upload is not used again)

    @staticmethod
    def _not_again(doc: dict[str, Any], saved: dict[str, Any]) -> str | None:
        """Why a lost job cannot run again here (None: it can)."""
        kind = (doc.get("source") or {}).get("kind")
        if kind == "stream":
            return "a re-score reads the frames the lost daemon kept in its memory"
        if kind in ("upload", "file") and not (saved.get("upload") and os.path.exists(saved["upload"])):
            return "its uploaded file was on the lost daemon's host"
        return None

    # -- reading and cancelling ------------------------------------------------------------------------------------
    async def get(self, jid: str) -> dict[str, Any] | None:
        """A job's document. A job that has just ended is said to have ended once its last records are in Redis
        (its runner's final write, bounded by SETTLE_WAIT_S): a client that reads the records on seeing `done`
        gets them all."""
        job = self.jobs.get(jid)
        if job is not None:
            if job.state in TERMINAL and not job.finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.finished.wait(), SETTLE_WAIT_S)
            return job.document()
        return await self.store.get(jid)

    async def cancel(self, jid: str) -> dict[str, Any] | None:
        """Cancel a queued or running job (within a second: its source closes, queued frames are discarded);
        an ended job's document as it is. None: no such job."""
        job = self.jobs.get(jid)
        if job is None:  # ended, or (fleet) another daemon's: that one cancels it within a second
            doc = await self.store.get(jid)
            if doc is not None and doc["state"] not in TERMINAL:
                await self.store.request_cancel(jid)
            return doc
        if job in self._queue:
            self._queue.remove(job)
            job.cancel()
            self.jobs.pop(jid, None)
            job.finished.set()
            job.discard()  # its upload goes now: a queued job never reaches _run's cleanup
            await job.save()
            return job.document()
        job.cancel()
        return job.document()

    async def drain(self) -> None:
        """The daemon stops: queued jobs are cancelled, running ones too (their documents say so)."""
        for job in list(self._queue):
            job.cancel()
            job.finished.set()
            job.discard()
            with contextlib.suppress(Exception):
                await job.save()
        self._queue.clear()
        for job in list(self.jobs.values()):
            if job.state not in TERMINAL:
                job.cancel()
                job.reason = "the daemon stopped"
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

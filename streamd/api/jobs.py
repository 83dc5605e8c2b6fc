"""Handlers of /api/v1/jobs: one-shot jobs over a recorded video (an http(s) URL, fetched through the egress policy
when the job runs, or an uploaded file) or a stream's stored frames (streamd/jobs/). A job is accepted (202) and
queued; its document (state, progress, the summary when done) and its records (paged) are read back until they
expire (jobs.ttl_s)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, Field, ValidationError

from streamd import jsonsafe
from streamd import pipelines as pipeline_files
from streamd.api.body import json_body
from streamd.api.context import CFG, JOBS, streams
from streamd.api.errors import ApiError, json_response, validation_details
from streamd.api.security import SERVER_QUERY, check_authority
from streamd.errors import ConfigError, SourceError
from streamd.jobs.manager import JobInvalid, JobsFull, JobsUnavailable
from streamd.jobs.options import JobSpec
from streamd.sources import parse_reference

CHUNK = 1 << 16
LIST_QUERY = ({"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0,
                                                                             "maximum": 1_000_000}},
              {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                            "maximum": 500, "default": 50}})
RESULTS_QUERY = ({"name": "after", "in": "query", "required": False, "description": "the `next` cursor of the page "
                  "before", "schema": {"type": "string", "pattern": r"^[0-9]{1,20}-[0-9]{1,20}$"}},
                 {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                               "maximum": 1000, "default": 100}})
JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class JobProgress(BaseModel):
    fraction: float = Field(..., ge=0, le=1, description="media time done / total (1 when done); monotonic")
    frames_done: int = Field(..., ge=0, description="frames through the pipeline")
    frames_total: int | None = Field(..., description="frames the job will analyse (an estimate until done; null: "
                                     "unknown yet)")
    frames_looked_at: int = Field(..., ge=0, description="frames the source gave (scene sampling keeps fewer)")
    media_s_done: float = Field(..., ge=0, description="media time analysed, seconds")
    media_s_total: float | None = Field(..., description="the video's length, seconds (null: unknown yet)")
    eta_s: float | None = Field(..., description="seconds to go, from the rate so far (null: not running)")


class JobInfo(BaseModel):
    id: str
    state: JobState
    reason: str | None = Field(..., description="why it failed or was cancelled (done: where a bounded job "
                               "stopped)")
    reason_code: str | None = Field(..., description="failed: the source's typed reason (http_status, "
                                    "egress_refused, not_media, ...), pipeline_failed, internal, daemon_lost (its "
                                    "daemon was lost and it is not run again), live_source (a source with no end "
                                    "and no max_duration_s); cancelled; done: max_duration (stopped there), "
                                    "unknown_length_cap (media of unknown length stopped at "
                                    "jobs.unknown_length_cap_s)")
    pipeline: str
    source: dict[str, Any] = Field(..., description="kind (url, upload, file, stream) and what it names "
                                   "(credentials redacted)")
    sampling: dict[str, Any]
    max_duration_s: float | None = Field(None, description="the bound on media time asked for (null: the whole "
                                         "video)")
    live: bool = Field(False, description="the source has no end (a live playlist, a camera): read up to "
                       "max_duration_s")
    unknown_length: bool = Field(False, description="HTTP media of unknown length (chunked, no Content-Length): "
                                 "read to its end, at most jobs.unknown_length_cap_s of media")
    prompts: dict[str, Any] = Field(..., description="the prompt versions the job's frames use, by kind (an "
                                    "inline prompt: scope job:<id>, version 0)")
    created_ts: float
    started_ts: float | None
    ended_ts: float | None
    progress: JobProgress
    daemon: str | None = Field(None, description="the daemon (fleet member id) running it, or that ended it")
    attempt: int = Field(1, ge=1, description="1, or 2... when it runs again after its daemon was lost (every "
                         "record carries it; the records of a lost attempt are removed)")
    lost: list[dict[str, Any]] = Field(default_factory=list, description="each attempt whose daemon was lost: "
                                       "attempt, daemon, state, progress, noticed_by, noticed_ts")
    summary: dict[str, Any] | None = Field(None, description="when done: frames, labels, tracks (label, first/last "
                                           "seen, frames), vlm (per stage: captions, summaries, tags with time "
                                           "ranges, compare for a re-score), scene_cuts, timings_ms per stage")


class JobList(BaseModel):
    total: int = Field(..., ge=0)
    offset: int = Field(..., ge=0)
    limit: int = Field(..., ge=1)
    jobs: list[JobInfo]


class JobResults(BaseModel):
    records: list[dict[str, Any]] = Field(..., description="type frame: a result record of a frame (as a stream's "
                                          "results, with job_id); type vlm: a VLM record")
    next: str | None = Field(..., description="the cursor of the next page (`after`), null at the end")


def _jobs(request: web.Request) -> Any:
    jobs = request.app.get(JOBS)
    if jobs is None or not streams(request).cfg.jobs.enabled:
        raise ApiError(503, "jobs_unavailable", "this daemon takes no jobs (jobs.enabled)",
                       headers={"Retry-After": "60"})
    return jobs


_DIGITS = re.compile(r"[0-9]{1,20}")


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    try:
        v = default if raw is None else int(raw)
    except ValueError:
        raise ApiError(422, "invalid_query", f"{name} is an integer", {"path": name}) from None
    if not lo <= v <= hi:
        raise ApiError(422, "invalid_query", f"{name} is between {lo} and {hi}", {"path": name})
    return v


def _job_id(request: web.Request) -> str:
    jid = request.match_info["job"]
    if len(jid) != 16 or any(c not in "0123456789abcdef" for c in jid):
        raise ApiError(404, "job_not_found", f"no job {jid!r}")
    return jid


LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt")  # feeds with no end: a job reads them up to max_duration_s


def _check_url(url: str, allowed: list[str], max_duration_s: float | None) -> None:
    """An http(s) URL (never a file or another FFmpeg protocol), or with max_duration_s a live feed (RTSP, RTMP,
    SRT; without it 422 live_source: it would never end), and only where api.allowed_schemes has its scheme; its
    address is checked by the egress policy when the job runs (a refused one fails the job with reason_code
    egress_refused)."""
    try:
        ref = parse_reference(url)
    except SourceError as e:
        raise ApiError(422, "scheme_not_allowed", str(e), {"path": "source.url"}) from None
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    if scheme in LIVE_SCHEMES and scheme in allowed:
        if max_duration_s is None:
            raise ApiError(422, "live_source", f"a {scheme} feed is live: a job over it never ends; set "
                           "max_duration_s to analyse a slice of it", {"path": "max_duration_s"})
        if SERVER_QUERY.search(urlsplit(url).query):
            raise ApiError(422, "server_mode_not_allowed", "the URL asks FFmpeg to listen (a server mode): not from "
                           "the API", {"path": "source.url"})
        check_authority(ref.url)
        return
    if scheme not in ("http", "https") or scheme not in allowed or ref.kind not in ("url", "hls"):
        raise ApiError(422, "scheme_not_allowed", f"a job's URL is http or https, where api.allowed_schemes has it "
                       f"(not {scheme!r})", {"path": "source.url"})
    check_authority(ref.url)


def _spec(data: Any) -> JobSpec:
    try:
        return JobSpec.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        raise ApiError(422, "invalid_body", "the body does not match the schema", validation_details(e)) from None


async def _upload(request: web.Request, jobs: Any, jid: str) -> tuple[JobSpec, str, str | None]:
    """multipart/form-data: a `job` part (JSON, optional) and a file part, written to the upload folder within
    jobs.max_upload_bytes (413 upload_too_large past it, nothing kept)."""
    limit = jobs.jcfg.max_upload_bytes
    spec: JobSpec | None = None
    path, name = None, None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "job" and part.filename is None:
                raw = await part.read(decode=False)
                if len(raw) > 65_536:
                    raise ApiError(413, "body_too_large", "the job part is over 64 KiB")
                try:
                    spec = _spec(jsonsafe.loads(raw or b"{}"))
                except ValueError as e:
                    raise ApiError(400, "invalid_json", f"the job part is not valid JSON: {str(e)[:200]}") from None
            elif path is None and (part.filename is not None or part.name == "file"):
                path, name = str(jobs.upload_path(jid)), (part.filename or "")[:200] or None
                await _save(part, path, limit)
    except ApiError:
        if path is not None:
            _unlink(path)
        raise
    except Exception as e:  # noqa: BLE001 - a malformed multipart body must not reach the 500 handler
        if path is not None:
            _unlink(path)
        if isinstance(e, web.HTTPRequestEntityTooLarge):  # a part over api.max_body_bytes (the job part's read)
            raise ApiError(413, "body_too_large", "a multipart part other than the file is over api.max_body_bytes") \
                from None
        raise ApiError(422, "invalid_body", f"the multipart body cannot be read: {type(e).__name__}",
                       {"errors": [{"path": "<body>", "message": "malformed multipart body", "type": "multipart"}]}) \
            from None
    if path is None:
        raise ApiError(422, "invalid_body", "the multipart body has no file part (a part with a filename, or named "
                       "file)", {"errors": [{"path": "file", "message": "missing", "type": "missing"}]})
    spec = spec or JobSpec()
    if spec.source is not None:
        _unlink(path)
        raise ApiError(422, "invalid_body", "an uploaded file is the job's source: the job part names none",
                       {"errors": [{"path": "source", "message": "must be null with a file", "type": "upload"}]})
    return spec, path, name


async def _bounded_upload(request: web.Request, jobs: Any, jid: str) -> tuple[JobSpec, str, str | None]:
    """`_upload` within jobs.max_uploads at once (503 jobs_full past it, before a byte is read) and within
    jobs.upload_timeout_s (408 upload_timeout, nothing kept): a slow or stalled client holds neither disk nor a
    place for long."""
    if jobs.uploading >= jobs.jcfg.max_uploads:
        raise ApiError(503, "jobs_full", f"{jobs.uploading} uploads are being received (jobs.max_uploads); try "
                       "again", {"retry_after_s": 1}, headers={"Retry-After": "1"})
    jobs.uploading += 1
    path = str(jobs.upload_path(jid))
    try:
        async with asyncio.timeout(jobs.jcfg.upload_timeout_s):
            return await _upload(request, jobs, jid)
    except TimeoutError:
        _unlink(path)
        raise ApiError(408, "upload_timeout", f"the upload did not arrive within jobs.upload_timeout_s "
                       f"({jobs.jcfg.upload_timeout_s:g} s); nothing was kept") from None
    finally:
        jobs.uploading -= 1


async def _save(part: BodyPartReader, path: str, limit: int) -> None:
    n = 0
    with open(path, "wb") as f:
        while chunk := await part.read_chunk(CHUNK):
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "upload_too_large", f"the upload is over jobs.max_upload_bytes ({limit})",
                               {"max_upload_bytes": limit})
            f.write(chunk)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def job_create(request: web.Request) -> web.Response:
    """Accept a job: 202 with its document (state queued or running) and Location."""
    jobs = _jobs(request)
    jobs_full(jobs)
    jid = jobs.new_id()
    upload, name = None, None
    if request.content_type == "multipart/form-data":
        cl = request.content_length
        if cl is not None and cl > jobs.jcfg.max_upload_bytes + 65_536 * 2:
            raise ApiError(413, "upload_too_large", f"the upload is over jobs.max_upload_bytes "
                           f"({jobs.jcfg.max_upload_bytes})", {"max_upload_bytes": jobs.jcfg.max_upload_bytes})
        spec, upload, name = await _bounded_upload(request, jobs, jid)
    elif request.content_type == "application/json":
        spec = await json_body(request, JobSpec)
        if spec.source is None:
            raise ApiError(422, "invalid_body", "a job needs a source (url or stream) unless a file is uploaded",
                           {"errors": [{"path": "source", "message": "missing", "type": "missing"}]})
        if spec.source.url is not None:
            _check_url(spec.source.url, request.app[CFG].allowed_schemes, spec.max_duration_s)
    else:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {request.content_type!r}: send "
                       "application/json, or multipart/form-data with a file part (and a job part)",
                       {"content_type": request.content_type})
    if spec.pipeline not in pipeline_files.available(streams(request).cfg):
        if upload:
            _unlink(upload)
        raise ApiError(422, "invalid_pipeline", f"no pipeline {spec.pipeline!r}", {"path": "pipeline"})
    try:
        job = await jobs.submit(spec, jid=jid, upload=upload, origin="api", filename=name)
    except Exception as e:
        if upload:
            _unlink(upload)
        raise _error(e) from None
    doc = job.document()
    return json_response(doc, status=202, headers={"Location": f"/api/v1/jobs/{job.id}"})


def jobs_full(jobs: Any) -> None:
    try:
        jobs.refuse_if_full()
    except JobsFull as e:
        raise _error(e) from None


def _error(e: Exception) -> Exception:
    if isinstance(e, JobsFull):
        return ApiError(503, "jobs_full", str(e), {"queued": e.queued, "max_queued": e.bound,
                                                   "retry_after_s": e.retry_after_s},
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, JobInvalid):
        status = 404 if e.code == "prompt_not_found" else 422
        return ApiError(status, e.code, str(e), e.details)
    if isinstance(e, ConfigError):
        return ApiError(422, "invalid_pipeline", str(e), {"path": "pipeline", "key": e.key})
    if isinstance(e, JobsUnavailable):
        return ApiError(503, "jobs_unavailable", str(e), headers={"Retry-After": "1"})
    return e


async def jobs_list(request: web.Request) -> web.Response:
    offset = _int(request, "offset", 0, 0, 1_000_000)
    limit = _int(request, "limit", 50, 1, 500)
    total, docs = await _jobs(request).store.page(offset, limit)
    for d in docs:
        d.pop("summary", None)
    return json_response({"total": total, "offset": offset, "limit": limit, "jobs": docs})


async def job_get(request: web.Request) -> web.Response:
    doc = await _jobs(request).get(_job_id(request))
    if doc is None:
        raise ApiError(404, "job_not_found", f"no job {request.match_info['job']!r} (or it expired)")
    return json_response(doc)


async def job_results(request: web.Request) -> web.Response:
    jid = _job_id(request)
    jobs = _jobs(request)
    limit = _int(request, "limit", 100, 1, 1000)
    after = request.query.get("after")
    if after is not None and not _entry_id(after):
        raise ApiError(422, "invalid_query", "after is a cursor a page answered (next)", {"path": "after"})
    if await jobs.get(jid) is None:
        raise ApiError(404, "job_not_found", f"no job {jid!r} (or it expired)")
    records, nxt = await jobs.store.records(jid, after, limit)
    return json_response({"records": records, "next": nxt})


def _entry_id(s: str) -> bool:
    # each part a 64-bit number in ASCII digits, as Redis takes it (a 20-digit number past 2**64 - 1 is refused by
    # Redis: a 503; '²' is a digit to str.isdigit, not to int())
    ms, _, n = s.partition("-")
    return bool(_DIGITS.fullmatch(ms) and _DIGITS.fullmatch(n)) and max(int(ms), int(n)) < 1 << 64


async def job_delete(request: web.Request) -> web.Response:
    """Cancel a queued or running job; an ended one's document as it is."""
    doc = await _jobs(request).cancel(_job_id(request))
    if doc is None:
        raise ApiError(404, "job_not_found", f"no job {request.match_info['job']!r} (or it expired)")
    return json_response(doc)

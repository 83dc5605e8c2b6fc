"""The route table, the OpenAPI document built from it, and the application (build_app)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

import streamd.api.responses as R
from streamd.api.cluster import cluster
from streamd.api.context import AUTH, AUTH_FAILURES, CFG, JOBS, LIMITER, METRICS, MODELS, PROMPTS, STREAM_LOCKS, \
    STREAMS
from streamd.api.errors import json_response
from streamd.api.etag import KeyedLocks
from streamd.api.health import PING, health, health_live, health_ready, metrics
from streamd.api.jobs import (LIST_QUERY, RESULTS_QUERY, JobInfo, JobList, JobResults, job_create, job_delete, job_get,
                              job_results, jobs_list)
from streamd.api.middleware import Route, auth_mw, cors_mw, errors_mw, same_site_mw
from streamd.api.models import ModelCatalog, ModelInfo, model_delete, model_load, models_list
from streamd.api.pipelines import (PipelineHistory, PipelinePatch, PipelineRollback, SwitchOutcome,
                                   pipeline_history, pipeline_patch, pipeline_rollback)
from streamd.api.live import LIVE, LiveFeeds, results_live
from streamd.api.page import add_page
from streamd.api.predict import PredictAnswer, predict
from streamd.api.results import MAX_LIMIT, snapshot, stream_events, stream_results, stream_vlm
from streamd.api.prompts import prompt_delete, prompt_get, prompt_history, prompt_put, prompt_rollback, prompts_list
from streamd.api.schemas import PromptUpdate, Rollback, StreamPatch
from streamd.api.segment import SegmentCreated, SegmentObjects, SegmentPrompt, segment_delete, segment_objects, \
    segment_prompt
from streamd.api.security import Authenticator, AuthFailures, RateLimiter
from streamd.api.streams import pipelines_list, stream_create, stream_delete, stream_get, stream_update, streams_list
from streamd.config import ApiConfig, StreamConfig
from streamd.jobs.options import JobSpec
from streamd.metrics import Metrics
from streamd.prompts import PromptStore
from streamd.streams.manager import StreamManager


async def openapi(request: web.Request) -> web.Response:
    from streamd.api.openapi import document

    return json_response(document(ROUTES))


async def docs(request: web.Request) -> web.Response:
    from streamd.api.openapi import docs_html

    return web.Response(text=docs_html(ROUTES), content_type="text/html")


P = "/api/v1"
_ENTRY = {"type": "string", "pattern": r"^[0-9]{1,20}(-[0-9]{1,20})?$", "example": "1718000000000-0"}
PAGING = ({"name": "after", "in": "query", "required": False, "schema": _ENTRY,
           "description": "entries after this id (oldest first); without it, the newest `limit`"},
          {"name": "limit", "in": "query", "required": False,
           "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}})
LIVE_QUERY = ({"name": "after", "in": "query", "required": False, "schema": _ENTRY,
               "description": "as Last-Event-ID: resume after this entry"},
              {"name": "timeout_s", "in": "query", "required": False,
               "schema": {"type": "number", "minimum": 0, "maximum": 86400, "default": 0},
               "description": "end the response after this long (0: when the client goes)"})
SNAPSHOT_QUERY = ({"name": "overlay", "in": "query", "required": False, "schema": {"enum": ["true", "false"]}},
                  {"name": "entry", "in": "query", "required": False, "schema": _ENTRY,
                   "description": "the frame of this result (404 frame_not_found once no longer kept)"})
ROUTES: list[Route] = [
    Route("GET", "/health/live", health_live, None, "the event loop answers (never depends on Redis)", tag="health",
          response=R.Live),
    Route("GET", "/health/ready", health_ready, None, "Redis reachable and models loaded", tag="health",
          response=R.Ready),
    Route("GET", "/health", health, "read", "summary with per-stream states", tag="health", response=R.Health),
    Route("GET", "/metrics", metrics, "read", "Prometheus metrics", tag="health"),
    Route("GET", "/openapi.json", openapi, "read", "this API's OpenAPI 3 document", tag="docs"),
    Route("GET", "/docs", docs, "read", "human-readable API reference", tag="docs"),
    Route("GET", f"{P}/streams", streams_list, "read", "list streams", response=R.StreamList),
    Route("POST", f"{P}/streams", stream_create, "operate", "add a stream", StreamConfig, ok=201,
          response=R.StreamInfo, etag=True),
    Route("GET", f"{P}/streams/{{id}}", stream_get, "read", "one stream's state and rates", response=R.StreamInfo,
          etag=True),
    Route("PATCH", f"{P}/streams/{{id}}", stream_update, "operate",
          "change a stream (fps, stall_timeout_s: live; other fields restart it)", StreamPatch, response=R.StreamInfo,
          etag=True, if_match=True),
    Route("DELETE", f"{P}/streams/{{id}}", stream_delete, "operate", "remove a stream", ok=204, if_match=True),
    *[Route("GET", f"{P}/streams/{{id}}/{kind}", handler, "read", f"the stream's {what}, paged from Redis: after "
            "`after` (an entry id, oldest first), or the newest `limit`", tag="results", response=R.EntryPage,
            query=PAGING) for kind, handler, what in (("results", stream_results, "result records"),
                                                       ("events", stream_events, "events"),
                                                       ("vlm", stream_vlm, "VLM answers"))],
    Route("GET", f"{P}/streams/{{id}}/results/live", results_live, "read", "new result records as Server-Sent "
          "Events (id: the entry id; resumes after Last-Event-ID or ?after=; without them the newest first)",
          tag="results", media="text/event-stream", query=LIVE_QUERY),
    Route("GET", f"{P}/streams/{{id}}/snapshot.jpg", snapshot, "read", "the stream's latest frame (or the frame of "
          "result ?entry=), JPEG; ?overlay=true draws its result record (boxes, labels, track ids, masks)",
          tag="results", media="image/jpeg", query=SNAPSHOT_QUERY),
    Route("POST", f"{P}/streams/{{id}}/segment", segment_prompt, "operate", "prompt SAM 2 with points and/or a box: "
          "a new object followed from the stream's next frame (its pipeline has a segment stage)", SegmentPrompt,
          ok=201, response=SegmentCreated),
    Route("GET", f"{P}/streams/{{id}}/segment", segment_objects, "read", "the objects the segment stage follows on "
          "the stream, and its memory bank", response=SegmentObjects),
    Route("DELETE", f"{P}/streams/{{id}}/segment/{{object_id}}", segment_delete, "operate", "stop following an "
          "object (from the stream's next frame)", ok=204),
    Route("GET", f"{P}/prompts", prompts_list, "read", "current prompts of every scope", tag="prompts",
          response=R.PromptList),
    Route("GET", f"{P}/prompts/{{kind}}/{{scope}}", prompt_get, "read", "current version", tag="prompts",
          response=R.PromptRecord, etag=True),
    Route("PUT", f"{P}/prompts/{{kind}}/{{scope}}", prompt_put, "operate", "new version", PromptUpdate,
          tag="prompts", ok=201, response=R.PromptRecord, etag=True, if_match=True),
    Route("DELETE", f"{P}/prompts/{{kind}}/{{scope}}", prompt_delete, "operate",
          "delete: a tombstone version (history kept); the next scope's prompt applies", tag="prompts",
          response=R.PromptRecord, if_match=True),
    Route("GET", f"{P}/prompts/{{kind}}/{{scope}}/history", prompt_history, "read", "versions, newest first",
          tag="prompts", response=R.PromptHistory),
    Route("POST", f"{P}/prompts/{{kind}}/{{scope}}/rollback", prompt_rollback, "operate",
          "new version with an old version's content", Rollback, tag="prompts", ok=201, response=R.PromptRecord,
          etag=True, if_match=True),
    Route("GET", f"{P}/pipelines", pipelines_list, "read", "pipelines and the models they use", tag="pipelines",
          response=R.PipelineList),
    Route("PATCH", f"{P}/pipelines/{{pipeline}}", pipeline_patch, "operate", "change stages live (a detect stage's "
          "model, conf, iou, classes, labels, imgsz, max_det): the new models load while the old serve, then every "
          "stream switches between two batches; a new version, kept in Redis", PipelinePatch, tag="pipelines",
          response=SwitchOutcome),
    Route("GET", f"{P}/pipelines/{{pipeline}}/history", pipeline_history, "read", "versions, newest first",
          tag="pipelines", response=PipelineHistory),
    Route("POST", f"{P}/pipelines/{{pipeline}}/rollback", pipeline_rollback, "operate", "a new version with an old "
          "version's changes (0: as configured), switched the same way", PipelineRollback, tag="pipelines",
          response=SwitchOutcome),
    Route("GET", f"{P}/models", models_list, "read", "the model catalog: state, device, precision, memory, load "
          "time, last use, users; budgets per device", tag="models", response=ModelCatalog),
    Route("POST", f"{P}/models/{{id}}/load", model_load, "operate", "load a model now (idle models are unloaded "
          "if its device's budget needs it)", tag="models", response=ModelInfo),
    Route("DELETE", f"{P}/models/{{id}}", model_delete, "operate", "unload a model (409 while streams use it, "
          "unless ?force=true, which fails them)", tag="models", response=ModelInfo),
    Route("POST", f"{P}/predict/{{pipeline}}", predict, "operate", "one image (image/jpeg, image/png or multipart "
          "with a file part) through a pipeline, batched with its live frames: its outputs as JSON (503 overloaded "
          "with Retry-After past api.predict.queue_size)", tag="pipelines", response=PredictAnswer),
    Route("GET", f"{P}/cluster", cluster, "read", "the daemons sharing this Redis (fleet mode) and their load",
          tag="health", response=R.Cluster),
    Route("POST", f"{P}/jobs", job_create, "operate", "a job: a recorded video (source.url, http(s), fetched through "
          "the egress policy; or multipart/form-data with a file part and a `job` part) or a stream's stored frames "
          "(source.stream, from, to) through a pipeline, once, at a lower priority than live streams: 202 and its "
          "document (413 upload_too_large past jobs.max_upload_bytes, 503 jobs_full with Retry-After)", JobSpec,
          tag="jobs", ok=202, response=JobInfo),
    Route("GET", f"{P}/jobs", jobs_list, "read", "jobs, newest first (?offset, ?limit), until they expire",
          tag="jobs", response=JobList, query=LIST_QUERY),
    Route("GET", f"{P}/jobs/{{job}}", job_get, "read", "a job's state, progress and (done) summary", tag="jobs",
          response=JobInfo),
    Route("GET", f"{P}/jobs/{{job}}/results", job_results, "read", "a job's records, in order, paged (?after=next "
          "cursor, ?limit)", tag="jobs", response=JobResults, query=RESULTS_QUERY),
    Route("DELETE", f"{P}/jobs/{{job}}", job_delete, "operate", "cancel a queued or running job (within a second); "
          "an ended job's document as it is", tag="jobs", response=JobInfo),
]


def build_app(streams: StreamManager, prompts: PromptStore, models: Any, metrics: Metrics, cfg: ApiConfig,
              environ: dict[str, str], jobs: Any = None) -> web.Application:
    """The application: it reaches the daemon's parts through typed keys (STREAMS, PROMPTS, MODELS, METRICS)."""
    table = {(r.method, r.path): r for r in ROUTES}
    app = web.Application(client_max_size=cfg.max_body_bytes,
                          middlewares=[errors_mw, cors_mw, same_site_mw, auth_mw(table)])
    app[STREAMS] = streams
    app[PROMPTS] = prompts
    app[MODELS] = models
    app[METRICS] = metrics
    app[PING] = {}
    app[CFG] = cfg
    app[AUTH] = Authenticator(cfg, environ)
    app[LIMITER] = RateLimiter(cfg.rate_limit_per_s, cfg.rate_limit_burst)
    app[AUTH_FAILURES] = AuthFailures(cfg.auth_failure_limit, cfg.auth_failure_window_s)
    app[STREAM_LOCKS] = KeyedLocks()
    if jobs is not None:
        app[JOBS] = jobs
    app[LIVE] = LiveFeeds(lambda: streams.client(""))  # blocking reads on the inputs' pool, never the API's
    app.on_shutdown.append(app[LIVE].close)
    if cfg.ui:
        add_page(app)  # the web page at / (no token needed to load it; every call it makes needs one)
    for r in ROUTES:
        if r.method == "GET":
            app.router.add_get(r.path, r.handler, allow_head=True)  # HEAD too
        else:
            app.router.add_route(r.method, r.path, r.handler)
    return app


"""What the handlers share: typed keys of the application and the request, and the parts of the daemon they serve
(the stream manager, the prompt store, the models, the metrics) — never the daemon itself."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamd.api.etag import KeyedLocks
from streamd.api.security import Authenticator, AuthFailures, Principal, RateLimiter
from streamd.config import ApiConfig
from streamd.metrics import Metrics
from streamd.prompts import PromptStore
from streamd.streams.manager import StreamManager

STREAMS = web.AppKey("streams", StreamManager)
PROMPTS = web.AppKey("prompts", PromptStore)
MODELS = web.AppKey("models", object)  # the model registry (streamd.models)
METRICS = web.AppKey("metrics", Metrics)
CFG = web.AppKey("cfg", ApiConfig)
AUTH = web.AppKey("auth", Authenticator)
LIMITER = web.AppKey("limiter", RateLimiter)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailures)
STREAM_LOCKS = web.AppKey("stream_locks", KeyedLocks)  # one API change of a stream at a time (If-Match holds)
JOBS = web.AppKey("jobs", object)  # streamd.jobs.manager.JobManager (absent: the daemon takes no jobs)
PRINCIPAL = web.RequestKey("principal", Principal)


def streams(request: web.Request) -> StreamManager:
    return request.app[STREAMS]


def prompts(request: web.Request) -> PromptStore:
    return request.app[PROMPTS]


def models(request: web.Request) -> Any:
    return request.app[MODELS]

"""schemathesis hooks for tests/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Random URLs are almost never valid stream references, so most generated streams would be refused before they
exist. For three in four generated stream bodies (POST and PATCH) the URL is swapped for a `redis:` key in the daemon's
own Redis and the pipeline for the model-free `frame_info`: those streams are really created, then read, changed
and removed by the stateful phase, with every other generated field (fps, queue, reconnect, redis_input ...) as
generated (FFmpeg options dropped). The others keep their URLs, so URL and option validation are fuzzed
too. No traffic leaves the host.
"""

import re
import zlib
from pathlib import Path

import schemathesis

# pipelines that load models (torch, YOLO, a VLM endpoint): a stream body naming one, or none (= `default`), gets
# `frame_info` instead; made-up pipeline names are kept (and refused with 422)
MODEL_PIPELINES = {p.stem for p in (Path(__file__).parent.parent / "pipelines").glob("*.yaml")} - {"frame_info"}


def _named(pipeline):
    """A generated pipeline value as a name to look up (a negative case may make it a list or an object)."""
    return pipeline if isinstance(pipeline, str) else None


@schemathesis.hook("map_body")
def redis_streams(context, body):
    op = context.operation
    if op is not None and op.path == "/api/v1/jobs" and isinstance(body, dict):
        if _named(body.get("pipeline", "default")) in MODEL_PIPELINES:  # jobs: model-free, as streams
            body = {**body, "pipeline": "frame_info"}
        return body
    if op is None or not op.path.startswith("/api/v1/streams") or not isinstance(body, dict):
        return body
    body = dict(body)
    if _named(body.get("pipeline", "default" if op.method.upper() == "POST" else None)) in MODEL_PIPELINES:
        body["pipeline"] = "frame_info"
    url = body.get("url")
    if isinstance(url, str) and zlib.crc32(url.encode()) % 4:
        key = re.sub(r"[^A-Za-z0-9_.:-]", "", url)[:40] or "x"
        body.update(url=f"redis:frames:fuzz:{key}", pipeline="frame_info")
        body.pop("ffmpeg_options", None)  # random option names are refused (and mean nothing to a Redis input)
    return body


@schemathesis.hook("filter_failure")
def readiness_is_not_a_server_error(context, failure, case, response):
    """/health/ready answers 503 `not_ready` while a pipeline the fuzzer just started loads: documented, kept."""
    if case.operation.path == "/health/ready" and response.status_code == 503:
        return response.json()["error"]["code"] != "not_ready"
    return True


@schemathesis.hook("map_query")
def live_responses_end(context, query):
    """Server-Sent Events last until the client goes: the fuzzer's end at once (timeout_s), after what was there."""
    op = context.operation
    if op is not None and op.path.endswith("/results/live"):
        query = {**(query or {}), "timeout_s": 0.05}
    return query

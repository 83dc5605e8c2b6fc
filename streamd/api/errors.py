"""One error shape for every API error: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamd import jsonsafe


# every code the API answers with: code -> (HTTP status, when). README.md's error table and the OpenAPI document
# list these; tests/test_api_hardening.py checks that the code uses no other.
CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "not a valid HTTP request (e.g. a request line or header over 8190 bytes); the "
                         "connection is closed"),
    "invalid_json": (400, "the body is not JSON: a syntax error, not UTF-8, NaN/Infinity or a number out of range, "
                          "nested deeper than 64 levels"),
    "invalid_cursor": (400, "after, entry or Last-Event-ID is not a Redis stream entry id (<ms>-<seq>)"),
    "unauthorized": (401, "no bearer token, or an unknown one (with WWW-Authenticate)"),
    "forbidden": (403, "the token lacks the scope the route needs (details.needed)"),
    "cors_denied": (403, "a CORS preflight from an origin not in api.cors_origins"),
    "host_not_allowed": (403, "no tokens (loopback only): the Host header is not a loopback name or address with "
                              "the API's port (a DNS-rebinding page names its own host)"),
    "cross_origin_refused": (403, "no tokens (loopback only): an Origin other than the API's own or one in "
                                  "api.cors_origins, or Sec-Fetch-Site: cross-site"),
    "not_found": (404, "no such route"),
    "stream_not_found": (404, "no stream with that id"),
    "prompt_not_found": (404, "no prompt (or no such version) for that kind and scope"),
    "prompt_deleted": (404, "the prompt was deleted: its current version is a tombstone (details.version); its "
                            "history is kept and a PUT or rollback makes it live again"),
    "unknown_prompt_kind": (404, "the prompt kind is not vlm or vocabulary"),
    "segment_object_not_found": (404, "the stream's segment stage follows no object with that id (lost objects "
                                      "are gone)"),
    "job_not_found": (404, "no job with that id, or it expired (jobs.ttl_s)"),
    "model_not_found": (404, "no model with that name in the catalog (GET /api/v1/models lists them)"),
    "pipeline_not_found": (404, "no pipeline with that name (GET /api/v1/pipelines lists them; predict: "
                                "details.available too), or a rollback to a version it never had (details.version)"),
    "frame_not_found": (404, "snapshot: no frame of the stream is kept (yet), or the frame of the result asked for "
                             "(entry) is no longer kept (frames: in the config)"),
    "method_not_allowed": (405, "the route does not take that method (see Allow)"),
    "stream_exists": (409, "POST of a stream id that exists (fleet mode: also one another live daemon's config file "
                           "names while nobody runs it; details.members)"),
    "stream_in_config": (409, "fleet mode: DELETE of a stream of the config file that other live daemons' config "
                              "files name too (details.members: they would run it again), or a PATCH or DELETE of "
                              "a stream only other daemons' config files name; edit the config files"),
    "standing_aside": (409, "fleet mode: a POST, PATCH or DELETE of a stream through a daemon standing aside "
                            "(another running daemon has its fleet.member_id: it takes no part in the fleet, "
                            "details.other_instance); send it to another daemon"),
    "segment_unavailable": (409, "/streams/{id}/segment: the stream's pipeline has no segment stage or has not "
                                 "started, or (fleet mode) another daemon runs the stream"),
    "segment_object_limit": (409, "a segment prompt past the stage's max_objects for the stream (details.max_objects)"),
    "pipeline_changed": (409, "a pipeline change lost a race: another daemon wrote a version (details.version) "
                              "while this one's models loaded; nothing was written, send it again"),
    "model_in_use": (409, "DELETE of a model that streams use (details.users); ?force=true unloads it anyway and "
                          "fails those streams with the reason"),
    "model_conflict": (409, "the change sets a batching option (forward_batch, generate_batch, max_wait_ms) of a "
                            "shared model to another value than the one its batcher runs with"),
    "insufficient_memory": (409, "the model does not fit its device's budget (models.budget) even with every idle "
                                 "model unloaded: details.holders names the models holding the memory (in use, "
                                 "pinned or loading), details.needed_bytes and budget_bytes the sizes"),
    "precondition_failed": (412, "If-Match does not match the stream's or prompt's current ETag, or nothing "
                                 "exists to match (details.current_etag, null then)"),
    "body_too_large": (413, "the body is over api.max_body_bytes"),
    "image_too_large": (413, "predict: the image is over api.predict.max_image_bytes, or its width x height (read "
                             "from its header, before decoding) over api.predict.max_pixels"),
    "upload_timeout": (408, "jobs: the upload did not arrive whole within jobs.upload_timeout_s (nothing is kept)"),
    "upload_too_large": (413, "jobs: the uploaded video is over jobs.max_upload_bytes (nothing is kept)"),
    "unsupported_media_type": (415, "predict: the body is not image/* or multipart/form-data; jobs: not "
                                    "application/json or multipart/form-data; no tokens (loopback only): a POST, "
                                    "PUT, PATCH or DELETE body of another route that is not application/json "
                                    "(details.content_type)"),
    "invalid_body": (422, "the body does not match the schema (details.errors name each path), or is not an object"),
    "invalid_url": (422, "the stream URL cannot be used (e.g. a host name label over 63 characters)"),
    "live_source": (422, "a job over a live feed (RTSP, RTMP, SRT) without max_duration_s: it would never end"),
    "scheme_not_allowed": (422, "a URL scheme not in api.allowed_schemes (files and FFmpeg pseudo-protocols never)"),
    "server_mode_not_allowed": (422, "the URL asks FFmpeg to listen (listen, mode=listener ...)"),
    "option_not_allowed": (422, "an FFmpeg option the API does not take (details.allowed)"),
    "invalid_option_value": (422, "an FFmpeg option's value outside its schema (details.expected)"),
    "redis_key_not_allowed": (422, "a redis: input outside api.redis_key_prefix, or one of streamd's own keys"),
    "egress_refused": (422, "the URL's host is not global (loopback, private ...) and egress.allow does not name it"),
    "unresolvable_host": (422, "the URL's host name does not resolve"),
    "invalid_pipeline": (422, "an unknown pipeline, or one whose stages cannot be built"),
    "model_load_failed": (422, "the model cannot be loaded (a missing file, a download while offline, a runtime "
                               "that refuses it): details.reason"),
    "invalid_image": (422, "predict: the image cannot be decoded (not a JPEG, PNG, WEBP, BMP or TIFF image; "
                           "truncated or corrupt), or a multipart body without a file part: details.reason"),
    "pipeline_failed": (422, "predict: the pipeline cannot start (a model that cannot load, a stage whose setup "
                             "fails): details.reason"),
    "invalid_scope": (422, "the prompt scope is not global, pipeline:<name> or stream:<id>"),
    "invalid_query": (422, "a query parameter out of its range (offset/limit of a history, admission of a new "
                           "stream, ...): details.path names it"),
    "rate_limited": (429, "too many requests for this token or client address (see Retry-After)"),
    "too_many_auth_failures": (429, "api.auth_failure_limit refused tokens from this client address within "
                                    "api.auth_failure_window_s: refused without checking the token (see Retry-After)"),
    "http_error": (400, "another HTTP error aiohttp raised (its status)"),
    "internal": (500, "a bug: logged with its traceback, never shown"),
    "predict_failed": (500, "predict: a stage failed on the image (details.reason, as a result record's error)"),
    "not_ready": (503, "/health/ready: not started, Redis unreachable or models loading (see Retry-After)"),
    "redis_unavailable": (503, "streams and prompts live in Redis, which is unreachable (see Retry-After)"),
    "busy": (503, "every Redis connection of the API's pool (api.redis_pool) stayed in use for 2 s (see "
                  "Retry-After)"),
    "overloaded": (503, "predict: the pipeline holds api.predict.queue_size predict images already; Retry-After "
                        "(details.retry_after_s) is the images in flight over the measured answers per second, at "
                        "least 1 s"),
    "predict_timeout": (503, "predict: no answer within api.predict.timeout_s (see Retry-After)"),
    "pipeline_unavailable": (503, "predict: the pipeline stopped before answering (the daemon is stopping); try "
                                  "again (see Retry-After)"),
    "jobs_full": (503, "jobs: jobs.max_queued jobs wait already (see Retry-After: about when one ends)"),
    "jobs_unavailable": (503, "jobs: this daemon takes no jobs (jobs.enabled false), or it is stopping"),
    "capacity_exhausted": (503, "fleet mode: every daemon runs its fleet.max_streams or is over its load limit "
                                "(fleet.max_busy, fleet.max_drop_fraction); try again later (see Retry-After; "
                                "details.streams, details.capacity, details.overloaded), or add the stream with "
                                "?admission=pending"),
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": {} if details is None else details}}
    return json_response(body, status=status, headers=headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Every API body: JSON without NaN or Infinity (a stray one is written as null)."""
    return web.json_response(body, status=status, headers=headers, dumps=jsonsafe.dumps)


def validation_details(exc: Any) -> dict[str, Any]:
    """pydantic errors as {"errors": [{"path": "reconnect.max_s", "message": ..., "type": ...}]}."""
    return {"errors": [{"path": ".".join(str(p) for p in e["loc"]) or "<body>", "message": e["msg"],
                        "type": e["type"]} for e in exc.errors()]}

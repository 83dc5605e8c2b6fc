"""The OpenAPI 3.1 document and a plain HTML reference page (no external assets: works offline)."""

from __future__ import annotations

import html
import re
from typing import Any

from streamd import __version__
from streamd.api.errors import CODES
from streamd.config import STREAM_ID_PATTERN
from streamd.prompts import SCOPE_RE

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "details"], "properties": {
        "code": {"type": "string", "enum": list(CODES),
                 "description": "; ".join(f"`{c}` ({s}): {why}" for c, (s, why) in CODES.items())},
        "message": {"type": "string", "description": "for people; may change between versions"},
        "details": {"type": "object", "description": "`{}` when there is nothing to add; `invalid_body`: "
                                                      "`errors`, a list of {path, message, type}"}}}},
}
STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted: still under way", 204: "No Content",
               400: "Bad JSON, a bad HTTP request or a bad entry id (invalid_cursor)",
               401: "No or invalid token", 403: "Token lacks the scope", 404: "Not found", 409: "Conflict",
               412: "If-Match does not match the current ETag (details.current_etag)",
               413: "Body too large", 415: "Unsupported Content-Type", 422: "Invalid body, URL or parameter",
               429: "Rate limited (see Retry-After)", 500: "A stage failed on the image (predict_failed)",
               503: "Not ready, Redis unreachable, busy or overloaded (see Retry-After)"}
# request examples (schemathesis sends them too): a camera, and frames pushed into the daemon's own Redis
EXAMPLES = {
    "StreamConfig": {
        "camera": {"value": {"id": "gate", "url": "rtsp://cam.example/h264", "fps": 2, "pipeline": "detect-track"}},
        "redis": {"value": {"id": "yard", "url": "redis:frames:yard", "fps": 1, "pipeline": "frame_info"}},
    },
    "StreamPatch": {"fps": {"value": {"fps": 1}}, "queue": {"value": {"queue_size": 4, "drop_policy": "drop_oldest"}}},
    "PromptUpdate": {"vlm": {"value": {"text": "Is the gate open?", "note": "v2"}},
                     "vocabulary": {"value": {"phrases": ["forklift", "person in hi-vis"]}}},
    "Rollback": {"version": {"value": {"version": 1}}},
    "PipelinePatch": {"model": {"value": {"stages": [{"stage": "detect", "model": "person"}], "note": "back to the "
                                          "person detector"}},
                      "conf": {"value": {"stages": [{"stage": 0, "conf": 0.5, "max_det": 20}]}}},
    "PipelineRollback": {"configured": {"value": {"version": 0}}},
}
PATH_EXAMPLES = {"id": "yard", "kind": "vlm", "scope": "global", "pipeline": "detect", "object_id": "1",
                 "job": "0123456789abcdef"}
# bodies that are not JSON: POST /api/v1/predict/{pipeline} takes an image, raw or as a multipart file part
_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY = {"required": True, "description": "the image: JPEG or PNG (WEBP, BMP, TIFF decode too), at most "
              "api.predict.max_image_bytes, width x height at most api.predict.max_pixels",
              "content": {"image/jpeg": {"schema": _BINARY}, "image/png": {"schema": _BINARY},
                          "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY}}}}}
IF_MATCH = {
    "name": "If-Match", "in": "header", "required": False,
    "description": "RFC 9110: `*` or a list of strong ETags (as GET answered them); the change is made only if the "
                   "current ETag is one of them (`*`: if it exists), else 412 `precondition_failed`. Without it, "
                   "no condition.",
    "schema": {"type": "string", "pattern": r'^(\*|(W/)?"[!#-~]*"( ?, ?(W/)?"[!#-~]*")*)$'},
    "example": '"v1"'}
ETAG = {"description": "strong validator of the current version: a prompt's `\"v<version>\"`, a stream's a short "
                       "hash of its configuration (state and rates change without it); send it back in If-Match",
        "schema": {"type": "string"}}
# routes that read or write state kept in Redis answer 503 while it is unreachable
REDIS_PATHS = ("/api/v1/streams", "/api/v1/prompts", "/api/v1/pipelines/{pipeline}")


def _schema(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    s = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
    for name, d in s.pop("$defs", {}).items():
        components[name] = d
    components[model.__name__] = s
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document(routes: list[Any]) -> dict[str, Any]:
    components: dict[str, Any] = {"Error": ERROR}
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "tags": [r.tag], "operationId": operation_id(r.method, r.path)}
        params = re.findall(r"{(\w+)}", r.path)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": _path_schema(p),
                                 "example": PATH_EXAMPLES[p]} for p in params]
        if r.path.endswith("/history"):
            op.setdefault("parameters", []).extend([
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}])
        if r.method == "DELETE" and r.tag == "prompts":
            op.setdefault("parameters", []).append(
                {"name": "note", "in": "query", "required": False, "description": "kept with the tombstone version",
                 "schema": {"type": "string", "maxLength": 1000}})
        if r.method == "POST" and r.path.endswith("/streams"):
            op.setdefault("parameters", []).append(
                {"name": "admission", "in": "query", "required": False, "schema": {"enum": ["refuse", "pending"]},
                 "description": "fleet mode, when no daemon has room: refuse (503 capacity_exhausted) or keep the "
                                "stream pending until one has"})
        if r.query:
            op.setdefault("parameters", []).extend(r.query)
        if r.if_match:
            op.setdefault("parameters", []).append(IF_MATCH)
        if r.path.startswith("/api/v1/predict/"):
            op["requestBody"] = IMAGE_BODY
        if r.body is not None:
            media: dict[str, Any] = {"schema": _schema(r.body, components)}
            if r.body.__name__ in EXAMPLES:
                media["examples"] = EXAMPLES[r.body.__name__]
            op["requestBody"] = {"required": True, "content": {"application/json": media}}
            if r.body.__name__ == "JobSpec":  # or an uploaded video
                op["requestBody"]["content"]["multipart/form-data"] = {"schema": {
                    "type": "object", "properties": {"job": {"type": "string", "description": "JobSpec as JSON, "
                                                             "without source"}, "file": _BINARY}}}
        responses: dict[str, Any] = {}
        ok: dict[str, Any] = {"description": STATUS_TEXT[r.ok]}
        if r.ok != 204:
            ctype = "text/plain" if r.path == "/metrics" else "text/html" if r.path == "/docs" else r.media
            schema = _schema(r.response, components) if r.response is not None else \
                {"type": "string"} if ctype != "application/json" else {"type": "object"}
            ok["content"] = {ctype: {"schema": schema}}
        if r.etag:
            ok["headers"] = {"ETag": ETAG}
        if r.method == "POST" and r.path.endswith("/streams"):
            ok["links"] = _stream_links()
        responses[str(r.ok)] = ok
        codes = [429]
        if r.scope is not None:
            codes += [401, 403]
        if r.body is not None:
            codes += [400, 413, 422]
        if params:
            codes += [404, 422]
        if r.method == "POST" and r.path.endswith("/streams"):
            codes += [409, 422, 503]  # 422 invalid_query (admission), 503 capacity_exhausted
        if r.if_match:
            codes.append(412)
        if "/segment" in r.path:
            codes.append(409)  # segment_unavailable, segment_object_limit
        if r.path.startswith("/api/v1/pipelines/{pipeline}") and r.method != "GET":  # a live change of stages
            responses["202"] = {**ok, "description": "the new models still load after timeout_s: the switch goes "
                                "on (its outcome: GET /api/v1/pipelines, events)"}
            codes.append(409)  # pipeline_changed, insufficient_memory
        if r.path.startswith("/api/v1/predict/"):
            codes += [413, 415, 422, 500, 503]  # image_too_large, unsupported_media_type, invalid_image ...
        if r.path.startswith("/api/v1/jobs"):
            codes += [422, 503] + ([404, 413, 415] if r.method == "POST" else [])  # jobs_full, upload_too_large ...
        if r.query:
            codes += [400, 422] if any(q["name"] in ("after", "entry") for q in r.query) else [422]
        if r.method == "DELETE" and r.tag == "prompts":
            codes.append(422)  # invalid_query: a note over 1000 characters
        if r.method in ("DELETE", "PATCH") and r.path.endswith("/streams/{id}"):
            codes.append(409)  # stream_in_config, standing_aside (fleet mode)
        if r.path == "/health/ready" or r.path.startswith(REDIS_PATHS):
            codes.append(503)
        for c in sorted(set(codes)):
            responses[str(c)] = {"description": STATUS_TEXT[c],
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        op["responses"] = responses
        if r.scope is None:
            op["security"] = []
        else:
            op["description"] = f"Needs a token with the `{r.scope}` scope (when tokens are configured)."
            if r.body is not None and r.body.__name__ in ("StreamConfig", "StreamPatch"):
                op["description"] += (" The URL's host is checked against the egress policy when the stream is "
                                      "added (422 `egress_refused`, `unresolvable_host`): a host that resolves to "
                                      "a loopback, private, link-local, CGNAT or other non-global address is "
                                      "refused whatever the token, unless the operator's `egress.allow` names it.")
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "streamd control API", "version": __version__,
                 "description": "Streams at run time, versioned prompts, health and metrics."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


def operation_id(method: str, path: str) -> str:
    return f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower())}"


def _stream_links() -> dict[str, Any]:
    """OpenAPI links: the stream a POST created is the one to GET, PATCH and DELETE (stateful fuzzing)."""
    item = "/api/v1/streams/{id}"
    return {f"{m.title()}Stream": {"operationId": operation_id(m, item), "parameters": {"id": "$response.body#/id"}}
            for m in ("GET", "PATCH", "DELETE")}


def _path_schema(name: str) -> dict[str, Any]:
    if name == "kind":
        return {"type": "string", "enum": ["vlm", "vocabulary"]}
    if name == "scope":
        return {"type": "string", "pattern": SCOPE_RE.pattern}
    if name == "job":
        return {"type": "string", "pattern": r"^[0-9a-f]{16}$"}
    if name == "object_id":
        return {"type": "string", "pattern": r"^[0-9]{1,18}$"}
    return {"type": "string", "pattern": STREAM_ID_PATTERN}


def docs_html(routes: list[Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{r.method}</code></td><td><code>{html.escape(r.path)}</code></td>"
        f"<td>{html.escape(r.scope or 'public')}</td><td>{html.escape(r.summary)}</td></tr>" for r in routes)
    return ("<!doctype html><html><head><meta charset=utf-8><title>streamd API</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:.3em 1em;border-bottom:1px solid #ddd}</style>"
            f"</head><body><h1>streamd control API {__version__}</h1>"
            "<p>Machine-readable: <a href=/openapi.json>/openapi.json</a>. Errors: "
            "<code>{\"error\": {\"code\", \"message\", \"details\"}}</code>. Auth: <code>Authorization: Bearer "
            "TOKEN</code> when tokens are configured.</p>"
            f"<table><tr><th>method</th><th>path</th><th>scope</th><th>what</th></tr>{rows}</table></body></html>")

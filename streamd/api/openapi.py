"""The OpenAPI 3.1 document and a plain HTML reference page (no external assets: works offline)."""

from __future__ import annotations

import html
import re
from typing import Any

from streamd import __version__

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}},
}
STATUS_TEXT = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad JSON", 401: "No or invalid token",
               403: "Token lacks the scope", 404: "Not found", 409: "Conflict", 413: "Body too large",
               422: "Invalid body, URL or parameter", 429: "Rate limited (see Retry-After)",
               503: "Not ready"}


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
        op: dict[str, Any] = {"summary": r.summary, "tags": [r.tag],
                              "operationId": f"{r.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', r.path.lower())}"}
        params = re.findall(r"{(\w+)}", r.path)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": _path_schema(p)} for p in params]
        if r.path.endswith("/history"):
            op.setdefault("parameters", []).extend([
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}])
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema(r.body,
                                                                                                       components)}}}
        responses: dict[str, Any] = {}
        ok = {"description": STATUS_TEXT[r.ok]}
        if r.ok != 204:
            ctype = "text/plain" if r.path == "/metrics" else "text/html" if r.path == "/docs" else "application/json"
            ok["content"] = {ctype: {"schema": {"type": "string"} if ctype != "application/json" else {}}}
        responses[str(r.ok)] = ok
        codes = [429]
        if r.scope is not None:
            codes += [401, 403]
        if r.body is not None:
            codes += [400, 413, 422]
        if params:
            codes += [404, 422]
        if r.method == "POST" and r.path.endswith("/streams"):
            codes.append(409)
        if r.path == "/health/ready":
            codes.append(503)
        for c in sorted(set(codes)):
            responses[str(c)] = {"description": STATUS_TEXT[c],
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        op["responses"] = responses
        if r.scope is None:
            op["security"] = []
        else:
            op["description"] = f"Needs a token with the `{r.scope}` scope (when tokens are configured)."
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


def _path_schema(name: str) -> dict[str, Any]:
    if name == "kind":
        return {"type": "string", "enum": ["vlm", "vocabulary"]}
    if name == "scope":
        return {"type": "string", "pattern": r"^(global|pipeline:[A-Za-z0-9_.:-]{1,128}|stream:[A-Za-z0-9_.:-]{1,128})$"}
    return {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,128}$"}


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

"""Handlers of /api/v1/prompts: versioned prompts in the prompt store (PROMPTS)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from streamd.api.body import json_body as _json_body
from streamd.api.body import offset_limit
from streamd.api.context import AUTH, PRINCIPAL
from streamd.api.context import prompts as _prompts
from streamd.api.errors import ApiError, json_response
from streamd.api.etag import if_match, precondition_failed, prompt_etag, prompt_versions
from streamd.api.schemas import PromptUpdate, Rollback
from streamd.api.security import Principal
from streamd.api.streams import _with_etag
from streamd.log import get_logger
from streamd.prompts import KINDS, SCOPE_RE, PreconditionFailed, PromptDeleted, PromptNotFound, RollbackToDeletion

log = get_logger("streamd.api")


# -- prompts --------------------------------------------------------------------------------------------------
def _prompt_key(request: web.Request) -> tuple[str, str]:
    kind, scope = request.match_info["kind"], request.match_info["scope"]
    if kind not in KINDS:
        raise ApiError(404, "unknown_prompt_kind", f"prompt kinds: {', '.join(KINDS)}")
    if not SCOPE_RE.match(scope):
        raise ApiError(422, "invalid_scope", "scope is global, pipeline:<name> or stream:<id>", {"path": "scope"})
    return kind, scope


def _author(request: web.Request, given: str | None) -> str:
    p: Principal = request[PRINCIPAL]
    return p.name if request.app[AUTH].enabled else (given or "anonymous")


IGNORED_BY_KIND = {"vlm": frozenset({"phrases"}), "vocabulary": frozenset({"text", "schema_"})}


async def prompts_list(request: web.Request) -> web.Response:
    return json_response({"prompts": await _prompts(request).all_current()})


def _deleted(e: PromptDeleted) -> ApiError:
    rec = e.record
    return ApiError(404, "prompt_deleted", f"the {rec['kind']} prompt for {rec['scope']} was deleted (version "
                    f"{rec['version']}); its history is kept", {"version": rec["version"]})


def _prompt_precondition_failed(e: PreconditionFailed) -> ApiError:
    return precondition_failed(None if e.current is None else prompt_etag(e.current))


async def prompt_get(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    try:
        rec = await _prompts(request).current(kind, scope)
    except PromptDeleted as e:
        raise _deleted(e) from None
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no {kind} prompt for {scope}") from None
    return _with_etag(json_response(rec), prompt_etag(rec["version"]))


async def prompt_put(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    body = await _json_body(request, PromptUpdate)
    ignored = sorted("schema" if f == "schema_" else f for f in body.model_fields_set & IGNORED_BY_KIND[kind])
    if ignored:  # refused, not dropped: the client meant something the prompt would not do
        raise ApiError(422, "invalid_body", f"a {kind} prompt takes no {', '.join(ignored)}",
                       {"errors": [{"path": f, "message": f"not used by a {kind} prompt", "type": "extra_forbidden"}
                                   for f in ignored]})
    if kind == "vlm" and not body.text:
        raise ApiError(422, "invalid_body", "a vlm prompt needs text", {"path": "text"})
    if kind == "vocabulary" and not body.phrases:
        raise ApiError(422, "invalid_body", "a vocabulary needs phrases", {"path": "phrases"})
    content: dict[str, Any] = {"text": body.text} if kind == "vlm" else {"phrases": body.phrases}
    if kind == "vlm" and body.schema_ is not None:
        content["schema"] = body.schema_
    try:
        rec = await _prompts(request).put(
            kind, scope, content, _author(request, body.author), body.note,
            if_match=prompt_versions(if_match(request)))
    except PreconditionFailed as e:
        raise _prompt_precondition_failed(e) from None
    return _with_etag(json_response(rec, status=201), prompt_etag(rec["version"]))


async def prompt_delete(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    note = request.query.get("note")
    if note is not None and len(note) > 1000:
        raise ApiError(422, "invalid_query", "note is at most 1000 characters", {"path": "note"})
    try:
        rec = await _prompts(request).delete(
            kind, scope, _author(request, None), note, if_match=prompt_versions(if_match(request)))
    except PromptDeleted as e:
        raise _deleted(e) from None
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no {kind} prompt for {scope}") from None
    except PreconditionFailed as e:
        raise _prompt_precondition_failed(e) from None
    log.info("prompt deleted through the API", kind=kind, scope=scope, version=rec["version"],
             by=request[PRINCIPAL].name)
    return json_response(rec)


async def prompt_history(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    offset, limit = offset_limit(request)
    try:
        total, items = await _prompts(request).history(kind, scope, offset, limit)
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no {kind} prompt for {scope}") from None
    return json_response({"total": total, "offset": offset, "limit": limit, "versions": items})


async def prompt_rollback(request: web.Request) -> web.Response:
    kind, scope = _prompt_key(request)
    body = await _json_body(request, Rollback)
    try:
        rec = await _prompts(request).rollback(
            kind, scope, body.version, _author(request, body.author), body.note,
            if_match=prompt_versions(if_match(request)))
    except PromptNotFound:
        raise ApiError(404, "prompt_not_found", f"no version {body.version} of the {kind} prompt for {scope}") \
            from None
    except RollbackToDeletion as e:
        raise ApiError(422, "invalid_body", f"{e}: DELETE the prompt instead", {"errors": [
            {"path": "version", "message": "a deletion (tombstone) version", "type": "value_error"}]}) from None
    except PreconditionFailed as e:
        raise _prompt_precondition_failed(e) from None
    return _with_etag(json_response(rec, status=201), prompt_etag(rec["version"]))



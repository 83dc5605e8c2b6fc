"""Request bodies: JSON read within the size and nesting bounds, parsed into a pydantic model once (422 with
the failing path otherwise)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from streamd import jsonsafe
from streamd.api.errors import ApiError, validation_details

MAX_DEPTH = 64  # arrays and objects in a request body (a prompt's JSON schema is the deepest part)


def _depth(data: Any) -> int:
    """How deeply arrays and objects nest in `data` (without recursion)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def _raw_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, outside strings, without parsing it. Only scanned when
    the text has more than MAX_DEPTH opening brackets at all (a normal body has a handful)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    in_str = escaped = False
    for c in raw:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


async def json_body(request: web.Request, model: Any) -> Any:
    """The body as `model`; any parser error is a 400 `invalid_json`, a body the schema refuses a 422. A body that
    nests deeper than MAX_DEPTH is refused before it is parsed: the parser's RecursionError leaves CPython 3.11's
    recursion bookkeeping out of step (a later `ast.parse` in the process fails with SystemError)."""
    raw = await request.read()  # raises 413 past client_max_size
    if _raw_depth(raw) > MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests arrays or objects deeper than {MAX_DEPTH} levels")
    try:
        data = jsonsafe.loads(raw or b"null")  # NaN, Infinity and 1e999 are refused, not read as floats
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", f"the body nests arrays or objects deeper than {MAX_DEPTH} levels") \
            from None
    if _depth(data) > MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests arrays or objects deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_body", "the body must be a JSON object",
                       {"errors": [{"path": "<body>", "message": "not an object", "type": "dict_type"}]})
    try:  # strict types ("2" is no number, "yes" no boolean); JSON mode, so enums still come as their strings
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        raise ApiError(422, "invalid_body", "the body does not match the schema", validation_details(e)) from None



def offset_limit(request: web.Request, default_limit: int = 50, most: int = 500) -> tuple[int, int]:
    """A history page's `?offset=&limit=` (422 invalid_query outside offset >= 0, 1 <= limit <= most)."""
    try:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query.get("limit", str(default_limit)))
    except ValueError:
        raise ApiError(422, "invalid_query", "offset and limit are integers") from None
    if offset < 0 or not 1 <= limit <= most:
        raise ApiError(422, "invalid_query", f"offset >= 0 and 1 <= limit <= {most}")
    return offset, limit

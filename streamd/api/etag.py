"""Entity tags and `If-Match` (RFC 9110 8.8.3, 13.1.1): optimistic concurrency for streams and prompts.

A prompt's ETag is `"v<version>"`; a stream's is a short hash of its configuration (what a PATCH changes: state and
rates change without it). Both are strong validators; `If-Match` compares strongly, so a weak tag never matches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from streamd.api.errors import ApiError

# entity-tag = [ W/ ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text; a list separated by commas
_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_PROMPT_TAG = re.compile(r"v([1-9][0-9]{0,17})")


def stream_etag(config: Any) -> str:
    """The ETag of a stream's configuration (a StreamConfig): the same on every daemon of a fleet."""
    data = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(data.encode()).hexdigest()[:16] + '"'


def prompt_etag(version: int) -> str:
    return f'"v{version}"'


def if_match(request: web.Request) -> str | list[str] | None:
    """The request's If-Match: None (none sent), "*", or its strong tags with their quotes (a malformed field, or
    one with weak tags only, gives tags that match nothing: the condition is false, 412)."""
    fields = request.headers.getall("If-Match", [])
    if not fields:
        return None
    value = ", ".join(fields).strip()
    if value == "*":
        return "*"
    tags: list[str] = []
    pos = 0
    while pos < len(value):
        m = _TAG.match(value, pos)
        if m is None or m.end() == pos:
            return []  # malformed: nothing can match
        if m.group(1) is None:
            tags.append(f'"{m.group(2)}"')
        pos = m.end()
    return tags


def prompt_versions(tags: str | list[str] | None) -> str | list[int] | None:
    """If-Match for the prompt store: None, "*" or the versions its tags name."""
    if tags is None or tags == "*":
        return tags
    return [int(m.group(1)) for t in tags if (m := _PROMPT_TAG.fullmatch(t[1:-1]))]


def matches(tags: str | list[str] | None, current: str | None) -> bool:
    """Whether If-Match holds for the current ETag (None: nothing exists)."""
    if tags is None:
        return True
    if current is None:
        return False
    return tags == "*" or current in tags


def precondition_failed(current: str | None) -> ApiError:
    return ApiError(412, "precondition_failed", "If-Match does not match the current ETag" if current else
                    "If-Match: nothing exists to match", {"current_etag": current})


class KeyedLocks:
    """One asyncio lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

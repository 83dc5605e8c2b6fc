"""Plain media over HTTP(S) read through the egress policy, as a file PyAV reads.

FFmpeg's own HTTP client resolves the host again (after the policy checked it), follows redirects anywhere and
cannot be interrupted mid-read. `EgressReader` is a seekable file object for `av.open`: the decoder thread's reads
and seeks become ranged GETs made by the stream's `StreamEgress` on the event loop (resolved once, every redirect hop
checked, connected to the checked address), one response streamed until a seek moves elsewhere. `interrupt()`
cancels a read in flight, so a closed source's thread returns at once instead of waiting out a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import re
import threading
from typing import Any

from streamd.egress import EgressError, StreamEgress
from streamd.errors import SourceError
from streamd.log import redact_url

_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_SKIP_MAX = 256 * 1024  # a forward seek this short reads on instead of making a new request


class Interrupted(SourceError):
    """The reader was closed while a read was in flight."""


class EgressReader(io.RawIOBase):
    def __init__(self, egress: StreamEgress, url: str, loop: asyncio.AbstractEventLoop, *, timeout_s: float,
                 headers: dict[str, str] | None = None):
        super().__init__()
        self._egress = egress
        self._url = url
        self._loop = loop
        self._timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._pos = 0
        self.size: int | None = None  # from Content-Length / Content-Range; None for a live (unsized) stream
        self.ranges = False  # the server answers byte ranges
        self._resp: Any = None
        self._resp_pos = 0
        self._fut: concurrent.futures.Future[Any] | None = None
        self._lock = threading.Lock()
        self._interrupted = False
        self.requests = 0
        self.error: SourceError | None = None  # a read that failed (the body ended early): not the end of the media
        # the entity's validator (its ETag, else its Last-Modified) from the first response: a later request of this
        # reader must get the same entity (sent as If-Range with a range), and a reconnect's reader is compared
        # with it by the source (a body replaced between connections is never resumed into)
        self.validator: str | None = None

    # -- loop side --------------------------------------------------------------------------------------------
    async def _open(self, pos: int) -> None:
        await self._release()
        headers = dict(self._headers)
        if pos:
            headers["Range"] = f"bytes={pos}-"
            if self.validator is not None and not self.validator.startswith("W/"):  # weak ETags: no If-Range
                headers["If-Range"] = self.validator  # changed since: the whole new body (200), caught below
        self.requests += 1
        resp = await self._egress.request(self._url, timeout_s=self._timeout_s, headers=headers)
        validator = entity_validator(resp.headers)
        if self.validator is None:
            self.validator = validator
        elif validator is not None and validator != self.validator:
            resp.release()
            raise changed_entity(self._url, self.validator, validator)
        if resp.status == 206:
            m = _RANGE.match(resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != pos:
                resp.release()
                raise SourceError(f"{redact_url(self._url)} answered a byte range it was not asked for",
                                  code="http_status")
            self.ranges = True
            if m.group(3) != "*":
                self.size = int(m.group(3))
        else:
            if pos:  # no ranges: read on from the start up to `pos` (bounded by the file itself)
                self._resp, self._resp_pos = resp, 0
                await self._skip(pos)
                return
            if resp.content_length is not None and "chunked" not in resp.headers.get("Transfer-Encoding", ""):
                self.size = resp.content_length
            self.ranges = resp.headers.get("Accept-Ranges", "").lower() == "bytes"
        self._resp, self._resp_pos = resp, pos

    async def _skip(self, pos: int) -> None:
        while self._resp_pos < pos:
            chunk = await asyncio.wait_for(self._resp.content.read(min(65536, pos - self._resp_pos)),
                                           self._timeout_s)
            if not chunk:
                break
            self._resp_pos += len(chunk)

    async def _read(self, n: int) -> bytes:
        if self.size is not None and self._pos >= self.size:
            return b""
        if self._resp is not None and self._resp_pos < self._pos <= self._resp_pos + _SKIP_MAX:
            await self._skip(self._pos)
        if self._resp is None or self._resp_pos != self._pos:
            await self._open(self._pos)
        try:
            data = await asyncio.wait_for(self._resp.content.read(n), self._timeout_s)
        except TimeoutError:
            self.error = EgressError(f"no data from {redact_url(self._url)} for {self._timeout_s:g} s", "timeout")
            raise self.error from None
        except Exception as e:  # noqa: BLE001 - aiohttp's payload errors: a dropped connection
            self.error = SourceError(f"reading {redact_url(self._url)} failed: {type(e).__name__}: {e}",
                                     code="unreachable")
            raise self.error from None
        self._resp_pos += len(data)
        return data

    async def start(self) -> None:
        """Loop side, before `av.open`: the first request (its errors are the open's), which says whether this is
        a recording (a size: seekable) or a live feed (no size: read as a pipe)."""
        await self._open(0)

    async def _learn_size(self) -> None:
        if self.size is None and self._resp is None:
            await self._open(self._pos)

    async def _release(self) -> None:
        if self._resp is not None:
            self._resp.release()
            self._resp = None

    # -- thread side ------------------------------------------------------------------------------------------
    def _call(self, coro: Any) -> Any:
        with self._lock:
            if self._interrupted:
                coro.close()
                raise Interrupted("the source was closed")
            fut = self._fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise Interrupted("the source was closed") from None
        finally:
            self._fut = None

    def interrupt(self) -> None:
        """Any thread: fail the read in flight and every later one."""
        with self._lock:
            self._interrupted = True
            fut = self._fut
        if fut is not None:
            fut.cancel()
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._release(), self._loop)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.size is not None

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 20
        data = self._call(self._read(n))
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            self._call(self._learn_size())
            if self.size is None:
                return -1  # FFmpeg's "unknown size" (an exception here would fail the open)
            pos = self.size + offset
        else:
            raise OSError(f"unsupported whence {whence}")
        if pos < 0:
            raise OSError("seek before the start")
        self._pos = pos
        return pos

    def close(self) -> None:
        if not self.closed and not self._loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._release(), self._loop)
            except RuntimeError:
                pass
        super().close()


def entity_validator(headers: Any) -> str | None:
    """What says which version of a resource a response carries: its ETag, else its Last-Modified (None: neither)."""
    v = headers.get("ETag") or headers.get("Last-Modified")
    return v.strip()[:256] if v and v.strip() else None


def changed_entity(url: str, was: str, now: str) -> SourceError:
    return SourceError(f"{redact_url(url)} changed between requests (validator {was[:64]!r}, now {now[:64]!r}): "
                       "another body cannot be resumed into", permanent=True, code="source_changed")


def http_headers(opts: dict[str, str]) -> dict[str, str]:
    """FFmpeg's HTTP options, for the policy's own requests."""
    headers: dict[str, str] = {}
    if opts.get("user_agent"):
        headers["User-Agent"] = opts["user_agent"]
    if opts.get("referer"):
        headers["Referer"] = opts["referer"]
    for line in opts.get("headers", "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return headers


__all__ = ["EgressReader", "Interrupted", "changed_entity", "entity_validator", "http_headers"]

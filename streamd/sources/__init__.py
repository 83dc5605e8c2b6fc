"""Sources: PyAV ones push frames into the stream's queue from a decoder thread, the Redis one is an async
iterator of Frames (the two contracts: `streamd.sources.base`). The kind is picked from the reference:

| reference                                   | kind   | notes                                        |
|---------------------------------------------|--------|----------------------------------------------|
| ``rtsp://``, ``rtsps://``                   | rtsp   | PyAV, TCP transport by default               |
| ``http(s)://…/x.m3u8`` (or ``hls+http(s)://``)| hls  | followed by streamd (sources/hls.py)         |
| other ``http(s)://``, ``rtmp://``, ``srt://``, ``udp://``, ``tcp://`` | url | HTTP(S): sources/httpio.py; others FFmpeg |
| a path or ``file://``                       | file   | realtime (like a camera) or fast playback    |
| ``redis://host:port/db#key``, ``redis:key`` | redis  | frames pushed into a Redis stream            |
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from streamd.errors import SourceError

AV_SCHEMES = {"rtsp", "rtsps", "http", "https", "rtmp", "rtmps", "srt", "udp", "tcp", "hls+http", "hls+https"}
LIVE_KINDS = {"rtsp", "hls", "url"}


@dataclass(frozen=True, slots=True)
class SourceRef:
    kind: str  # rtsp | hls | url | file | redis
    url: str  # what PyAV opens, or the Redis URL (without the fragment)
    key: str | None = None  # Redis stream key

    @property
    def live(self) -> bool:
        return self.kind in LIVE_KINDS


_ENCODE_HINT = "in a user name or password, write '#', '?', '/' and '@' percent-encoded: %23, %3F, %2F, %40"


def authority_problem(url: str) -> str | None:
    """Why the host part of `url` cannot be read unambiguously, or None. Never quotes the URL: a password holding
    an unencoded '#', '?' or '/' ends the authority early, and what follows (urllib's "port") is a piece of it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError past 65535 or for a non-number
    except ValueError:
        return f"the URL's port is not a number up to 65535 ({_ENCODE_HINT})"
    scheme = parts.scheme.lower()
    if "://" in url and scheme not in ("http", "https", "hls+http", "hls+https", "file", "redis", "rediss", "unix") \
            and _cut_userinfo(url.split("://", 1)[1][len(parts.netloc):]):
        return f"the URL has an '@' right after its host: a password cut short? ({_ENCODE_HINT})"
    return None


def _cut_userinfo(rest: str) -> bool:
    """Whether what follows the authority (FFmpeg's av_url_split and urllib agree: it ends at the first '/', '?' or
    '#') reads as the tail of a user name or password that held an unencoded '/', '?' or '#': an '@' before the
    next '/' (`admin:1234#hunter@host/cam`, `admin:12/pw@host/cam`). An '@' further on, in a later path segment or
    a query (`/live/cam@1`, `/live/x?user=bob@example.com`), is the path's or the query's own."""
    if not rest:
        return False
    first = rest[1:] if rest[0] == "/" else rest
    return "@" in first.split("/", 1)[0]


def parse_reference(ref: str) -> SourceRef:
    """Classify a stream reference. Raises a permanent SourceError for unknown schemes or malformed references."""
    ref = ref.strip()
    if not ref:
        raise SourceError("empty stream reference", permanent=True)
    if "://" not in ref and not ref.startswith("redis:"):
        if len(ref) > 1 and ref[1] == ":" and ref[0].isalpha():  # windows drive letter
            return SourceRef("file", ref)
        if ":" in ref.split("/")[0]:
            scheme = ref.split(":", 1)[0]
            raise SourceError(f"unsupported scheme {scheme!r}", permanent=True)
        return SourceRef("file", ref)
    try:
        parts = urlsplit(ref)
    except ValueError as e:
        raise SourceError(f"malformed reference: {e}", permanent=True) from None
    scheme = parts.scheme.lower()
    problem = authority_problem(ref)
    if problem:
        raise SourceError(problem, permanent=True)
    if scheme == "file":
        return SourceRef("file", unquote(parts.path))
    if scheme in ("redis", "rediss", "unix"):
        key = unquote(parts.fragment) if parts.fragment else None
        if key is None and "://" not in ref:  # redis:key shorthand (the daemon's own Redis)
            key = unquote(parts.path)
            return SourceRef("redis", "", key or None)
        if not key:
            raise SourceError("a redis reference names its stream key after '#': redis://host:6379/0#frames",
                              permanent=True)
        return SourceRef("redis", ref.split("#", 1)[0], key)
    if scheme not in AV_SCHEMES:
        raise SourceError(f"unsupported scheme {scheme!r}", permanent=True)
    if not parts.hostname:
        raise SourceError("the URL has no host", permanent=True)
    if scheme.startswith("hls+"):
        return SourceRef("hls", ref[4:])
    if scheme in ("rtsp", "rtsps"):
        return SourceRef("rtsp", ref)
    if scheme in ("http", "https") and parts.path.lower().endswith((".m3u8", ".m3u")):
        return SourceRef("hls", ref)
    return SourceRef("url", ref)

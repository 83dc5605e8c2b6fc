"""Auth (bearer tokens with scopes, compared in constant time), rate limits, CORS, and stream URL checks."""

from __future__ import annotations

import hmac
import re
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus, urlsplit

from aiohttp import web

from streamd.api.errors import ApiError
from streamd.config import ApiConfig, EgressConfig
from streamd.egress import EgressError, EgressRules, StreamEgress
from streamd.errors import SourceError
from streamd.sources import authority_problem, parse_reference

SCOPE_RANK = {"read": 0, "operate": 1, "admin": 2}
_INT = r"[0-9]{1,12}"
_FFLAGS = "nobuffer|discardcorrupt|genpts|igndts|ignidx|nofillin|noparse|sortdts|fastseek"
# FFmpeg options a client may set through the API, each with the values it may take: plain values only (no
# listen or server mode: `rtsp_flags` and `listen` are not here; no control characters, so no header injection)
API_FFMPEG_OPTIONS: dict[str, tuple[re.Pattern[str], int | None, str]] = {
    # tcp (interleaved) alone: it goes through streamd's RTSP relay (no redirect followed); with udp FFmpeg sends to
    # whatever address the SETUP reply names, with http(s) its HTTP client follows redirects anywhere
    "rtsp_transport": (re.compile(r"tcp"), None, "tcp (udp, udp_multicast, http and https would let the RTSP "
                       "server send FFmpeg past the egress policy)"),
    "user_agent": (re.compile(r"[\x20-\x7e]{1,256}"), None, "1-256 printable ASCII characters"),
    "buffer_size": (re.compile(_INT), 64 << 20, "bytes, at most 64 MiB"),
    "max_delay": (re.compile(_INT), 60_000_000, "microseconds, at most 60 s"),
    "reorder_queue_size": (re.compile(_INT), 10_000, "packets, at most 10000"),
    "probesize": (re.compile(_INT), 50_000_000, "bytes, at most 50 MB"),
    "analyzeduration": (re.compile(_INT), 60_000_000, "microseconds, at most 60 s"),
    "fflags": (re.compile(rf"(?:[+-]?(?:{_FFLAGS}))+"), None, f"+/- flags among {_FFLAGS.replace('|', ', ')}"),
}
# query parameters that turn a client into a server (tcp/rtmp `listen`, SRT listener and rendezvous modes)
SERVER_QUERY = re.compile(r"(?:^|[?&;])(?:listen(?:=|&|;|$)|listen_timeout=|mode=(?:listener|server|rendezvous))",
                           re.IGNORECASE)


def server_query(url: str) -> bool:
    """Whether the URL's query asks for a server mode, read as FFmpeg reads it: from the first '?' (even after a
    '#'), option names and values URL-decoded (`%6Cisten=1` is `listen=1`)."""
    query = url.split("?", 1)[1] if "?" in url else ""
    return any(SERVER_QUERY.search(q) for q in (query, unquote(query), unquote_plus(query)))


def check_ffmpeg_options(options: dict[str, str]) -> None:
    """Raises ApiError(422) for an option a client may not set or a value outside its schema."""
    bad = sorted(set(options) - set(API_FFMPEG_OPTIONS))
    if bad:
        raise ApiError(422, "option_not_allowed", f"ffmpeg options not allowed from the API: {', '.join(bad)}",
                       {"path": "ffmpeg_options", "allowed": sorted(API_FFMPEG_OPTIONS)})
    for name, value in options.items():
        pattern, limit, expected = API_FFMPEG_OPTIONS[name]
        ok = isinstance(value, str) and pattern.fullmatch(value) is not None
        if ok and limit is not None:
            ok = int(value) <= limit
        if not ok:
            raise ApiError(422, "invalid_option_value", f"ffmpeg option {name}: expected {expected}",
                           {"path": f"ffmpeg_options.{name}", "expected": expected})


def check_redis_key(key: str, cfg: ApiConfig) -> None:
    """A Redis input added through the API reads only keys under `api.redis_key_prefix`, never streamd's own."""
    if key.startswith("streamd:") or not key.startswith(cfg.redis_key_prefix):
        raise ApiError(422, "redis_key_not_allowed",
                       f"a redis input added through the API must read a key under {cfg.redis_key_prefix!r} "
                       "(api.redis_key_prefix), never one of streamd's own keys", {"path": "url"})


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def allows(self, needed: str) -> bool:
        rank = SCOPE_RANK[needed]
        return any(SCOPE_RANK[s] >= rank for s in self.scopes)


ANONYMOUS = Principal("anonymous", frozenset({"admin"}))


class Authenticator:
    def __init__(self, cfg: ApiConfig, environ: dict[str, str]):
        self._tokens = [(t.value(environ).encode(), Principal(t.name, frozenset(t.scopes))) for t in cfg.tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def principal(self, request: web.Request) -> Principal:
        if not self._tokens:
            return ANONYMOUS  # loopback only (enforced when the config is loaded)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "a bearer token is required",
                           headers={"WWW-Authenticate": 'Bearer realm="streamd"'})
        given = token.strip().encode()
        found = None
        for value, principal in self._tokens:  # check every token: the time taken does not tell which matched
            if hmac.compare_digest(value, given):
                found = principal
        if found is None:
            raise ApiError(401, "unauthorized", "invalid token",
                           headers={"WWW-Authenticate": 'Bearer realm="streamd", error="invalid_token"'})
        return found


class RateLimiter:
    """A token bucket per client key."""

    def __init__(self, rate_per_s: float, burst: int):
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str) -> float:
        """0 if allowed, else seconds until the next request would be."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 10_000:
            self._buckets.clear()
        return (1 - tokens) / self.rate


class AuthFailures:
    """Failed authentications (a token presented and refused) per client address, over a sliding window: an address
    with `limit` failures within `window_s` is refused (429) without its token being checked until the oldest of
    them is `window_s` old. Requests without a token and successful ones do not count."""

    def __init__(self, limit: int, window_s: float):
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if times is not None and not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, key: str) -> float:
        """0 if `key` may try, else seconds until it may."""
        now = time.monotonic()
        times = self._recent(key, now)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.001, times[0] + self.window_s - now)

    def failed(self, key: str) -> None:
        now = time.monotonic()
        if len(self._failures) > 10_000:  # many addresses: forget those whose failures are over
            for k in list(self._failures):
                self._recent(k, now)
        self._failures.setdefault(key, deque(maxlen=self.limit)).append(now)


def check_authority(url: str) -> None:
    """A host name DNS can carry (no label over 63 characters, no empty label as in `a..b`, no control character
    or space) and a port that is a number up to 65535. Raises ApiError(422) `invalid_url`."""
    problem = authority_problem(url)
    if problem:  # a port that is not a number: never quoted (a piece of a password holding '#', '?' or '/')
        raise ApiError(422, "invalid_url", problem, {"path": "url", "reason": problem})
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in host):
            raise ValueError("a control character or space in the host name")
        host.encode("idna")
        parts.port  # noqa: B018 - raises ValueError past 65535 or for a non-number
    except (UnicodeError, ValueError) as e:
        reason = str(e).rpartition("(")[2].rstrip(")") or "not a valid host name"
        raise ApiError(422, "invalid_url", f"the URL's host or port is not valid: {reason}",
                       {"path": "url", "reason": reason}) from None


async def check_stream_url(url: str, cfg: ApiConfig, egress: EgressConfig | None = None,
                           ffmpeg_options: dict[str, str] | None = None) -> None:
    """Refuse what a remote client must not make the daemon open. Raises ApiError(422). The address check is the
    run-time egress policy itself (streamd/egress.py), applied at admission so the client gets a 422 instead of a
    stream that fails: only the operator's `egress.allow` opens a non-global address, whatever the token. FFmpeg
    options, when given, are checked after the scheme."""
    if "://" in url and authority_problem(url):
        check_authority(url)  # 422 invalid_url
    try:
        ref = parse_reference(url)
    except SourceError as e:
        raise ApiError(422, "scheme_not_allowed", str(e), {"path": "url"}) from None
    scheme = urlsplit(url).scheme.lower() if "://" in url else ("redis" if url.startswith("redis:") else "file")
    if ref.kind == "file" or scheme not in cfg.allowed_schemes:
        raise ApiError(422, "scheme_not_allowed",
                       f"scheme {scheme!r} is not allowed from the API (allowed: {', '.join(cfg.allowed_schemes)})",
                       {"path": "url"})
    if ffmpeg_options is not None:
        check_ffmpeg_options(ffmpeg_options)
    if ref.kind == "redis":
        check_redis_key(ref.key or "", cfg)
    if ref.kind not in ("redis", "hls") and scheme not in ("http", "https") and "#" in url.split("?", 1)[0]:
        # FFmpeg reads no fragment: a '#' before the query only hides it (server_query reads from the first '?',
        # as FFmpeg does, so a '#' within the query, `streamid=#!::r=live`, hides nothing); HTTP sends no fragment
        raise ApiError(422, "invalid_url", "a URL opened by FFmpeg may not have a fragment ('#')",
                       {"path": "url", "reason": "a fragment"})
    if server_query(url):
        raise ApiError(422, "server_mode_not_allowed", "the URL asks FFmpeg to listen (a server mode): not from "
                       "the API", {"path": "url"})
    if ref.url:
        check_authority(ref.url)
    if cfg.deny_private_addresses and ref.url:
        host = urlsplit(ref.url).hostname or ""
        policy = StreamEgress(EgressRules.from_config(egress or EgressConfig()), "api")
        try:
            await policy.resolve(host)
        except EgressError as e:
            code = "unresolvable_host" if e.code == "unresolvable" else "egress_refused"
            raise ApiError(422, code, str(e), {"path": "url"}) from None

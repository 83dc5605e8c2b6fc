"""Auth (bearer tokens with scopes, compared in constant time), rate limits, CORS, and stream URL checks."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from streamd.api.errors import ApiError
from streamd.config import ApiConfig
from streamd.errors import SourceError
from streamd.sources import parse_reference

SCOPE_RANK = {"read": 0, "operate": 1, "admin": 2}
# FFmpeg options a client may set through the API (others could open files or other protocols)
API_FFMPEG_OPTIONS = {"rtsp_transport", "rtsp_flags", "user_agent", "buffer_size", "max_delay",
                      "reorder_queue_size", "fflags", "probesize", "analyzeduration"}


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


def _is_private(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast \
        or ip.is_unspecified


async def check_stream_url(url: str, ffmpeg_options: dict[str, str], cfg: ApiConfig, private_ok: bool = False) \
        -> None:
    """Refuse what a remote client must not make the daemon open. Raises ApiError(422). `private_ok` (an `admin`
    token) lifts the private-address deny-list only: schemes and FFmpeg options are checked for everyone."""
    try:
        ref = parse_reference(url)
    except SourceError as e:
        raise ApiError(422, "scheme_not_allowed", str(e), {"path": "url"}) from None
    scheme = urlsplit(url).scheme.lower() if "://" in url else ("redis" if url.startswith("redis:") else "file")
    if ref.kind == "file" or scheme not in cfg.allowed_schemes:
        raise ApiError(422, "scheme_not_allowed",
                       f"scheme {scheme!r} is not allowed from the API (allowed: {', '.join(cfg.allowed_schemes)})",
                       {"path": "url"})
    bad = sorted(set(ffmpeg_options) - API_FFMPEG_OPTIONS)
    if bad:
        raise ApiError(422, "option_not_allowed", f"ffmpeg options not allowed from the API: {', '.join(bad)}",
                       {"path": "ffmpeg_options", "allowed": sorted(API_FFMPEG_OPTIONS)})
    if cfg.deny_private_addresses and ref.url and not private_ok:
        host = urlsplit(ref.url).hostname or ""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as e:
            raise ApiError(422, "unresolvable_host", f"cannot resolve {host!r}: {e.strerror}", {"path": "url"}) \
                from None
        addrs = {i[4][0] for i in infos}
        private = sorted(a for a in addrs if _is_private(a))
        if private:
            raise ApiError(422, "private_address",
                           f"{host!r} resolves to a private, loopback or link-local address (an admin token may "
                           "add it)", {"path": "url", "needed": "admin"})

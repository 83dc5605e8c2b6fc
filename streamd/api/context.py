"""What the handlers share: typed keys of the application and the request, and the daemon they serve."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from streamd.api.etag import KeyedLocks
from streamd.api.security import AuthFailures, Authenticator, Principal, RateLimiter
from streamd.config import ApiConfig

if TYPE_CHECKING:
    from streamd.daemon import Daemon

DAEMON = web.AppKey("daemon", object)
CFG = web.AppKey("cfg", ApiConfig)
AUTH = web.AppKey("auth", Authenticator)
LIMITER = web.AppKey("limiter", RateLimiter)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailures)
STREAM_LOCKS = web.AppKey("stream_locks", KeyedLocks)  # one API change of a stream at a time (If-Match holds)
PRINCIPAL = web.RequestKey("principal", Principal)


def daemon(request: web.Request) -> "Daemon":
    return request.app[DAEMON]  # type: ignore[return-value]

"""Logging in one place: structlog, JSON for machines or console for humans, credentials never printed."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|access_token|api_key|apikey|key|secret|sig|signature|auth)=)[^&#\s]*")


def redact_url(url: str) -> str:
    """Strip credentials from a URL (user:pass@, and secret-looking query parameters)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            url = urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        url = _USERINFO.sub(r"\g<scheme>***@", url)
    return _SECRET_QUERY.sub(r"\1***", url)


def redact_text(text: str) -> str:
    """Redact every URL-looking credential inside free text (error messages quote URLs)."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def _redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for k, v in event.items():
        if isinstance(v, str) and ("://" in v or "=" in v):
            event[k] = redact_text(v)
        elif isinstance(v, BaseException):
            event[k] = redact_text(str(v))
    return event


class _CurrentStderr:
    """sys.stderr as it is when a line is written, not when logging was set up (it may have been replaced since:
    a test's captured stream that is closed now, a redirect): a log line must never raise in the code logging it."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (ValueError, OSError):  # closed or broken: the line is lost, the caller goes on
            return 0

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass


def setup_logging(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog once for the process. `fmt` is ``json`` or ``console``."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_processor,
            structlog.processors.format_exc_info if fmt == "json" else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "streamd") -> Any:
    return structlog.get_logger(name)


class RepeatedLog:
    """One log line for a condition that repeats (an outage retried every second): the first occurrence is
    logged, then at most one line per `every_s` with `suppressed` (occurrences not logged since the last line),
    and `over()` logs one line when the condition ends (only if it was logged), with the `occurrences` in all.
    `clock` is injectable for tests."""

    def __init__(self, logger: Any, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.log = logger
        self.every_s = every_s
        self.clock = clock
        self.occurrences = 0  # since the condition began
        self.suppressed = 0  # since the last line
        self._last: float | None = None  # when the last line was logged; None: the condition is not on

    @property
    def active(self) -> bool:
        return self._last is not None

    def __call__(self, level: str, event: str, **kw: Any) -> bool:
        """Counts one occurrence; logs it at `level` unless a line was logged less than `every_s` ago.
        Returns whether it was logged."""
        now = self.clock()
        self.occurrences += 1
        if self._last is not None and now - self._last < self.every_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            kw["suppressed"] = self.suppressed
        getattr(self.log, level)(event, **kw)
        self._last, self.suppressed = now, 0
        return True

    def warning(self, event: str, **kw: Any) -> bool:
        return self("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> bool:
        return self("error", event, **kw)

    def over(self, event: str, level: str = "info", **kw: Any) -> bool:
        """The condition ended: one line (if any was logged for it) and a fresh start. Returns whether it logged."""
        if self._last is None:
            return False
        getattr(self.log, level)(event, occurrences=self.occurrences, **kw)
        self._last, self.occurrences, self.suppressed = None, 0, 0
        return True

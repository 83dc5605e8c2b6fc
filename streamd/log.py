"""Logging in one place: structlog, JSON for machines or console for humans, credentials never printed."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

import structlog

_MARK = "***"
_SCHEME_SEP = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# parameter names whose values are credentials: any name containing one of these (case and '-'/'_' ignored) ...
_SECRET_PARTS = ("pass", "pwd", "secret", "token", "key", "sig", "auth", "cred", "jwt", "sess", "hdnt", "hdnea",
                 "hmac", "hash", "policy", "login", "user", "usr", "account", "cookie", "ticket", "bearer", "otp",
                 "xamz", "xgoog", "xms", "xoss", "private", "cert", "nonce", "code")
# ... or exactly one of these
_SECRET_NAMES = frozenset({"pw", "pin", "sid", "pk", "sk", "t", "k", "s", "p", "u", "h"})
_HARMLESS_NAMES = frozenset({"codec", "vcodec", "acodec", "keyint", "keyframe", "keyframes"})
# a parameter value shown as is: short and plain (ids, numbers, flags); anything longer may be a bearer token
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.,:+\-]{0,20}")
# a bare item (no '='; a Redis reference's key after '#': "frames:camera-north-entrance"): words between separators,
# none of them long enough to be a token
_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9]{1,20}[_.:+\-]){1,16}[A-Za-z0-9]{0,20}")


def _secret_name(name: str) -> bool:
    n = re.sub(r"[^0-9a-z]", "", unquote_plus(name).casefold())
    if n in _HARMLESS_NAMES:
        return False
    return n in _SECRET_NAMES or any(p in n for p in _SECRET_PARTS)


def _redact_params(text: str, seps: str, found: list[str] | None = None) -> str:
    """`name=value` items separated by any of `seps`: the value of a secret-looking name, or a value that does not
    look plain, becomes the marker; a bare item (no '=') that does not look plain too."""
    out = []
    for item in re.split(f"([{re.escape(seps)}])", text):
        if len(item) == 1 and item in seps:
            out.append(item)
        elif "=" in item:
            name, value = item.split("=", 1)
            plain = _PLAIN_VALUE.fullmatch(unquote_plus(value)) is not None
            secret = bool(value) and (_secret_name(name) or not plain)
            out.append(f"{name}={_MARK}" if secret else item)
            if secret and found is not None:
                found.append(value)
        elif _PLAIN_VALUE.fullmatch(unquote_plus(item)) or _PLAIN_KEY.fullmatch(unquote_plus(item)):
            out.append(item)
        else:
            out.append(_MARK)
            if found is not None:
                found.append(item)
    return "".join(out)


def redact_url(url: str) -> str:
    """`url` with its credentials replaced by ``***``: the user information (``user:pass@``) and the values of
    secret-looking parameters (query, fragment, ``;`` path parameters). Scheme, host, port and path stay.

    The user information is everything from ``//`` to the LAST ``@`` of the URL: a password with an unencoded
    ``#``, ``?``, ``/`` or ``@`` (``rtsp://admin:hunter#2@host/cam``) ends a standard parser's authority early and
    would be shown; the last ``@`` is at or after the real end of the user information whatever the password holds,
    so nothing of it is ever shown (an ``@`` in a path or query only hides more than needed). Never raises."""
    if not isinstance(url, str) or not url:
        return url
    return _redact(url, None)


def url_secrets(url: str) -> list[str]:
    """The credentials `redact_url` hides in `url` (the user information, its user name and password and their
    pieces between delimiters, secret parameter values; raw and percent-decoded), longest first, none under 4
    characters (nor numbers under 6 digits): `scrub` takes them out of any text (an error message quoting a piece
    of a malformed URL)."""
    if not isinstance(url, str) or not url:
        return []
    found: list[str] = []
    _redact(url, found)
    out: set[str] = set()
    for f in found:
        for piece in [f, *f.split(":", 1), *re.split(r"[:#?/@;&=]", f)]:
            for p in (piece, unquote_plus(piece)):
                if len(p) >= 4 and not (p.isdigit() and len(p) < 6) and p.lower() not in _COMMON_PIECES:
                    out.add(p)
    return sorted(out, key=len, reverse=True)


# pieces of a URL that are ordinary words, user names or codec names: never scrubbed out of a message (a user
# name `user` would turn "user stopped" into "*** stopped"; `?encoder=h264` would hide every "h264")
_COMMON_PIECES = frozenset("""
    user users admin administrator root guest operator viewer service default anonymous public private test demo
    live stream streams video videos audio camera cam1 cam2 channel main high baseline none null true false
    pass password login http https rtsp rtmp h264 h265 hevc avc1 mjpeg mpeg4 mpeg2 vp8 vp9 av01 opus mp4a
    jpeg theora mpegts matroska webm index playlist segment media frame frames error errors""".split())
_PLAIN_AUTHORITY = re.compile(r"(\[[^\]/?#@]*\]|[^\[\]:/?#@]*)(:\d*)?")


def _userinfo_end(rest: str) -> int:
    """The '@' that ends the user information of `rest` (a URL past its "//"), or -1. A standard parser ends the
    authority at the first '/', '?' or '#'; a password may hold those unencoded, so an authority that does not
    read as host[:port], one that holds an '@', or one cut by '?' or '#' takes the URL's last '@' (nothing of the
    password shown; at worst more hidden). An authority that reads as host[:port] followed by '/' holds no user
    information unless its first path segment has an '@' (`admin:12/pw@host`): an '@' further in the path,
    `https://cdn.example.com/videos/@channel/live.m3u8`, is the path's."""
    cut = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if 0 <= i < cut:
            cut = i
    if cut < len(rest) and rest[cut] == "/" and _PLAIN_AUTHORITY.fullmatch(rest[:cut]):
        seg_end = rest.find("/", cut + 1)
        return rest.rfind("@", 0, len(rest) if seg_end < 0 else seg_end)
    return rest.rfind("@")


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of each of `secrets` (url_secrets) as a whole word (not inside a longer word
    or number) replaced by the marker."""
    if not isinstance(text, str):
        return text
    for s in secrets:
        if s in text:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", _MARK, text)
    return text


def _redact(url: str, found: list[str] | None) -> str:
    m = _SCHEME_SEP.match(url)
    if m:
        head, rest = url[:m.end()], url[m.end():]
        at = _userinfo_end(rest)
        if at >= 0 and not rest.startswith(("/", "?", "#")):  # an empty authority holds no user information
            if found is not None:
                found.append(rest[:at])
            head, rest = head + _MARK + "@", rest[at + 1:]
    else:  # no '//': only a leading "user:pass@host" (never a file path: "/clips/cam@2x.mp4")
        head, rest = "", url
        at = url.rfind("@")
        if at > 0 and ":" in url[:at] and not url.startswith(("/", ".", "~")) and not re.match(r"[A-Za-z]:[\\/]", url):
            if found is not None:
                found.append(url[:at])
            head, rest = _MARK + "@", url[at + 1:]
    # the rest: authority (host, port), then path, ?query, #fragment
    cut = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if 0 <= i < cut:
            cut = i
    authority, tail = rest[:cut], rest[cut:]
    frag = ""
    if "#" in tail:
        tail, frag = tail.split("#", 1)
        frag = "#" + _redact_params(frag, "&;", found)
    query = ""
    if "?" in tail:
        tail, query = tail.split("?", 1)
        query = "?" + _redact_params(query, "&;", found)
    segments = [seg.split(";", 1) for seg in tail.split("/")]
    path = "/".join(s[0] if len(s) == 1 else s[0] + ";" + _redact_params(s[1], ";", found) for s in segments)
    return head + authority + path + query + frag


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S*")
# user information holding spaces ("rtsp://admin:my pass@host"): up to the last '@' of the line (128 characters);
# not after a port ("http://host:8080/x failed, ask admin@corp")
_SPACED_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/@:]*:(?!\d+(?:[/\s?#]|$))[^\n@]{0,128}@")
_SECRET_ASSIGN = re.compile(
    r"(?i)(?P<name>\b[\w-]*(?:password|passwd|passphrase|pass|pwd|secret|token|signature|credential|jwt|api_?key"
    r"|authorization|auth)\s*[=:]\s*)(?P<q>['\"]?)(?:(?:Bearer|Basic|Digest|Token)\s+)?(?P<value>[^\s&;,'\"]+)")


def redact_text(text: str) -> str:
    """Redact every credential in free text (an error message, a traceback): URLs (as `redact_url`) and
    ``password=...`` / ``token: ...`` assignments."""
    if not isinstance(text, str) or not text:
        return text
    text = _SPACED_USERINFO.sub(lambda m: m.group("scheme") + _MARK + "@", text)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _SECRET_ASSIGN.sub(lambda m: m.group("name") + m.group("q") + _MARK, text)


_SECRET_KEY = re.compile(r"(?i)pass(?:word|wd|phrase)?$|pwd|secret|token|credential|api_?key|authoriz|cookie|jwt"
                         r"|signature")


def _redact_value(v: Any, depth: int = 0) -> Any:
    if isinstance(v, str):
        return redact_text(v)
    if isinstance(v, BaseException):
        return redact_text(f"{type(v).__name__}: {v}")
    if depth >= 4:
        return v
    if isinstance(v, dict):
        return {k: (_MARK if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(x, str) and x
                    else _redact_value(x, depth + 1)) for k, x in v.items()}
    if type(v) in (list, tuple, set, frozenset):
        return type(v)(_redact_value(x, depth + 1) for x in v)
    return v


def _redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The last step before rendering: every string (the event, values, the formatted traceback) redacted; the
    traceback was formatted without local variables (format_exc_info), so none of them is ever printed."""
    for k, v in list(event.items()):
        if k in ("exc_info", "stack_info"):
            continue
        event[k] = _redact_value(v)
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
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            # tracebacks as plain text, never with local variables (rich's show_locals printed a stream's URL,
            # password and all), and redacted like everything else
            structlog.processors.format_exc_info,
            _redact_processor,
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

"""Test kit for egress: canary HTTP servers on loopback addresses, and a guard that fails on any connection
outside loopback.

- `Canary(host)`: a real HTTP server bound to `host` (127.0.0.2, 127.0.0.3 ...: Linux routes all of 127.0.0.0/8 to
  loopback) that counts every TCP connection and request it gets. `routes` maps a path to a response
  (`(status, headers, body)`) or to a callable returning one; unknown paths are 404. `files` serves a folder.
  Byte ranges (`Range: bytes=N-`) get 206 unless `ranges` is False.
- `connect_guard()`: a context manager that records every Python-level socket connect (the `socket.connect` audit
  event, which asyncio and aiohttp go through) and raises in the connecting code for any address outside
  127.0.0.0/8 and ::1, so a test proves a refusal happened before a connection: `guard.outside` lists attempts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from streamd.redis_server import free_port
from streamd.testing.servers import ServedHttp

Response = tuple[int, dict[str, str], bytes]


class Canary(ServedHttp):
    def __init__(self, host: str = "127.0.0.2", routes: dict[str, Response | Callable[[], Response]] | None = None,
                 files: str | Path | None = None, port: int | None = None):
        self.host = host
        self.port = port or free_port()
        self.routes: dict[str, Any] = dict(routes or {})
        self.files = Path(files) if files else None
        self.ranges = True  # answer "Range: bytes=N-" with 206
        self.connections = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._srv: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + (path if path.startswith("/") else "/" + path)

    def hits(self, path: str | None = None) -> int:
        with self._lock:
            return len(self.requests) if path is None else sum(1 for p in self.requests if p == path)

    def start(self) -> "Canary":
        canary = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                with canary._lock:
                    canary.connections += 1
                super().setup()

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                with canary._lock:
                    canary.requests.append(path)
                resp = canary.routes.get(path)
                if callable(resp):
                    resp = resp()
                if resp is None and canary.files is not None:
                    f = (canary.files / path.lstrip("/")).resolve()
                    if f.is_file() and canary.files.resolve() in f.parents:
                        resp = (200, {}, f.read_bytes())
                status, headers, body = resp if resp is not None else (404, {}, b"not found")
                rng = self.headers.get("Range", "")
                if status == 200 and rng.startswith("bytes=") and canary.ranges:  # "bytes=N-" (what clients seek with)
                    start = int(rng[6:].split("-", 1)[0] or 0)
                    total = len(body)
                    body = body[start:]
                    status, headers = 206, {**headers, "Content-Range": f"bytes {start}-{total - 1}/{total}"}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._srv = ThreadingHTTPServer((self.host, self.port), Handler)
        self._srv.daemon_threads = True
        threading.Thread(target=self._srv.serve_forever, name=f"canary-{self.host}", daemon=True).start()
        return self


def redirect(location: str, status: int = 302) -> Response:
    return (status, {"Location": location}, b"")


class OutsideLoopback(ConnectionRefusedError):
    """Raised by the guard in code that tried to connect outside loopback."""


class _Guard:
    active: "_Guard | None" = None

    def __init__(self) -> None:
        self.connects: list[Any] = []
        self.outside: list[Any] = []


_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    guard = _Guard.active
    if guard is None or event != "socket.connect":
        return
    sock, address = args
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0] if isinstance(address, tuple) else str(address)
    guard.connects.append(address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        guard.outside.append(address)
        raise OutsideLoopback(f"test connected outside loopback: {address!r}")


@contextlib.contextmanager
def connect_guard() -> Iterator[_Guard]:
    """Fails any Python-level connect outside 127.0.0.0/8 and ::1 while active; yields the record."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # audit hooks cannot be removed: one, switched by `_Guard.active`
        _installed = True
    guard = _Guard()
    prev, _Guard.active = _Guard.active, guard
    try:
        yield guard
    finally:
        _Guard.active = prev


class RebindingDns:
    """A stand-in for a DNS server that rebinds: on the running event loop (whose `getaddrinfo` the egress policy
    uses), `name` answers `first` on the first lookup and `then` on every later one; other names resolve as usual.
    Nothing else is replaced: connections are real. FFmpeg's own resolver (libc) does not know `name` at all, so a
    stream that reaches it through FFmpeg proves that FFmpeg was given the checked address."""

    def __init__(self, name: str, first: str, then: str):
        self.name, self.first, self.then = name, first, then
        self.lookups = 0
        self._loop: Any = None
        self._orig: Any = None

    async def _getaddrinfo(self, host: Any, port: Any, *args: Any, **kw: Any) -> list[Any]:
        if host != self.name:
            return await self._orig(host, port, *args, **kw)
        self.lookups += 1
        ip = self.first if self.lookups == 1 else self.then
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0)))]

    def __enter__(self) -> "RebindingDns":
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._orig = self._loop.getaddrinfo
        self._loop.getaddrinfo = self._getaddrinfo
        return self

    def __exit__(self, *exc: Any) -> None:
        del self._loop.getaddrinfo  # back to the class's own method

"""A relay between FFmpeg and an RTSP server, so that FFmpeg's RTSP client stays within the egress policy.

FFmpeg follows an RTSP 3xx redirect by itself (rtsp.c has no option to refuse it) and, in UDP modes, sends packets
wherever a SETUP reply's `Transport: source=` says. So FFmpeg never connects to the camera itself: it opens
`rtsp://[user:pass@]127.0.0.1:<relay port>/<path>` and the relay (on the daemon's loop) connects to the address the
policy checked (`StreamEgress.resolve`, the host pinned: no second DNS answer), forwarding bytes both ways. Requests
(client -> server) pass unchanged. Replies (server -> client) are parsed as FFmpeg reads them (`$` + channel +
2-byte length interleaved frames; messages whose header ends at an empty line, every CR dropped, then a
Content-Length body) and:

- a 3xx reply never reaches FFmpeg: it gets `RTSP/1.0 502` instead, the connection is closed, and the stream
  fails with `egress_refused` (streamd follows no RTSP redirect: point the stream at the final URL);
- `Location` header lines are dropped from every message; `source=` and `destination=` are dropped from
  `Transport` headers.

Only the interleaved TCP transport goes through it (`rtsp_transport=tcp`, the default); the others are refused
unless the operator lists them in `egress.rtsp_transports` (FFmpeg then connects where the server says). For
rtsps:// the relay speaks TLS to the server (without certificate verification, as FFmpeg's default `tls_verify=0`)
and FFmpeg speaks plain RTSP to the relay on loopback. One relay per connection of a stream; closed with it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from streamd.egress import EgressError, StreamEgress
from streamd.log import get_logger, redact_url

log = get_logger("streamd.rtsp_relay")

MAX_HEAD = 64 << 10  # one reply's status line and headers
MAX_BODY = 4 << 20  # one reply's body (an SDP is a few KB)
MAX_CONNECTIONS = 4  # FFmpeg makes one control connection per open
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322}
_HEAD_END = re.compile(rb"\n\r*\n")
_BLANK = re.compile(rb"\r*\n")
_ATOI = re.compile(r"\s*[+-]?(\d+)")
_TRANSPORT_DROP = re.compile(r"\s*(?:source|destination)\s*(?:=|$)", re.IGNORECASE)


def rtsp_transports(options: dict[str, str]) -> set[str]:
    """The transports an `rtsp_transport` option asks for (FFmpeg flags: `tcp`, `udp+tcp` ...); tcp by default."""
    value = options.get("rtsp_transport", "tcp")
    return {p.strip().lower() for p in value.split("+")} or {"tcp"}


class _Refused(Exception):
    pass


class RtspRelay:
    """Listens on 127.0.0.1:<ephemeral> for FFmpeg; `url` is what FFmpeg opens once `start()` has returned.
    `error` holds the refusal (or the upstream failure) that ended a connection, for the stream's reason."""

    def __init__(self, egress: StreamEgress, url: str, connect_timeout_s: float):
        self._egress = egress
        self._origin_url = url
        self._connect_timeout_s = connect_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._target: tuple[str, int] | None = None
        self._tls_host: str | None = None
        self.url = ""
        self.error: EgressError | None = None
        self.bytes_down = 0

    async def start(self) -> str:
        parts = urlsplit(self._origin_url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS.get(scheme, 554)
        addrs = await self._egress.resolve(host, port)  # refused here (EgressError) before any connection
        self._target = (str(addrs[0]), port)
        self._tls_host = host if scheme == "rtsps" else None
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 16)
        local = self._server.sockets[0].getsockname()[1]
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        self.url = urlunsplit(("rtsp", f"{userinfo}127.0.0.1:{local}", parts.path or "/", parts.query, ""))
        return self.url

    def _fail(self, error: EgressError) -> None:
        if self.error is None:
            self.error = error
        log.warning("rtsp relay", stream=self._egress.stream_id, url=redact_url(self._origin_url),
                    reason=str(error), reason_code=error.code)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        self._conns.clear()
        self._writers.clear()

    # -- one connection ----------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._target is not None
        self._writers.add(writer)
        if len(self._conns) >= MAX_CONNECTIONS:
            writer.close()
            self._writers.discard(writer)
            return
        self._conns.add(task)
        up_w: asyncio.StreamWriter | None = None
        try:
            ctx = None
            if self._tls_host is not None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ip, port = self._target
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    up_r, up_w = await asyncio.open_connection(ip, port, ssl=ctx, server_hostname=self._tls_host,
                                                               limit=1 << 16)
            except (OSError, TimeoutError) as e:
                why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
                self._fail(EgressError(f"cannot connect to {redact_url(self._origin_url)}: {why}", "unreachable"))
                return
            self._writers.add(up_w)
            up = asyncio.ensure_future(self._pump(reader, up_w))
            down = asyncio.ensure_future(self._replies(up_r, writer))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (up, down):
                    t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            for w in (writer, up_w):
                if w is not None:
                    w.close()
                    self._writers.discard(w)
            self._conns.discard(task)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()

    async def _replies(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Server -> FFmpeg, message by message."""
        buf = bytearray()
        while data := await src.read(1 << 16):
            buf += data
            out = bytearray()
            try:
                while buf:
                    blank = _BLANK.match(buf)
                    if blank is not None:  # an empty line between messages (FFmpeg reads it as an empty reply)
                        out += buf[:blank.end()]
                        del buf[:blank.end()]
                        continue
                    if buf[0] == 0x24:  # '$': an interleaved RTP/RTCP frame
                        if len(buf) < 4:
                            break
                        n = 4 + int.from_bytes(buf[2:4], "big")
                        if len(buf) < n:
                            break
                        out += buf[:n]
                        del buf[:n]
                        continue
                    m = _HEAD_END.search(buf, 0, MAX_HEAD + 4)
                    if m is None:
                        if len(buf) > MAX_HEAD:
                            raise _Refused("an RTSP reply header over 64 KiB")
                        break
                    head = bytes(buf[:m.start()]).replace(b"\r", b"").decode("latin-1")
                    length = self._content_length(head)
                    if length > MAX_BODY:
                        raise _Refused(f"an RTSP reply body of {length} bytes")
                    if len(buf) < m.end() + length:
                        break
                    body = bytes(buf[m.end():m.end() + length])
                    del buf[:m.end() + length]
                    out += self._filter(head, body)
            except _Refused as e:
                if out:
                    dst.write(out)
                if e.args and isinstance(e.args[0], bytes):
                    dst.write(e.args[0])
                await dst.drain()
                return
            if out:
                self.bytes_down += len(out)
                dst.write(out)
                await dst.drain()

    @staticmethod
    def _content_length(head: str) -> int:
        for line in head.split("\n")[1:]:
            if line[:15].lower() == "content-length:":
                m = _ATOI.match(line[15:])
                return int(m.group(1)) if m else 0
        return 0

    def _filter(self, head: str, body: bytes) -> bytes:
        lines = head.split("\n")
        first = lines[0]
        words = first.split(None, 2)
        if words and words[0].startswith("RTSP/"):
            m = _ATOI.match(words[1]) if len(words) > 1 else None
            status = int(m.group(1)) if m else 0
            if 300 <= status < 400:
                location = next((ln.split(":", 1)[1].strip() for ln in lines[1:]
                                 if ln.lower().startswith("location:")), "")
                cseq = next((ln for ln in lines[1:] if ln.lower().startswith("cseq:")), "CSeq: 0")
                self._fail(EgressError(
                    f"egress policy refused an RTSP redirect ({status}) from {redact_url(self._origin_url)} to "
                    f"{redact_url(location) or 'nowhere'}: streamd follows no RTSP redirect (point the stream at "
                    "the final URL)", "egress_refused"))
                raise _Refused(f"RTSP/1.0 502 Redirect refused by the egress policy\r\n{cseq}\r\n"
                               "Content-Length: 0\r\n\r\n".encode("latin-1"))
        elif words and words[0].upper() == "REDIRECT":
            self._fail(EgressError(f"egress policy refused an RTSP REDIRECT request from "
                                   f"{redact_url(self._origin_url)}: streamd follows no RTSP redirect",
                                   "egress_refused"))
            raise _Refused()
        kept = [first]
        for ln in lines[1:]:
            low = ln.lower()
            if low.startswith("location"):
                continue
            if low.startswith("transport:"):
                ln = self._transport(ln)
            kept.append(ln)
        return ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1") + body

    def _transport(self, line: str) -> str:
        name, _, value = line.partition(":")
        specs = []
        dropped = False
        for spec in value.split(","):
            params = spec.split(";")
            keep = [p for p in params if not _TRANSPORT_DROP.match(p)]
            dropped |= len(keep) != len(params)
            specs.append(";".join(keep))
        if dropped:
            log.warning("rtsp relay dropped source=/destination= from a Transport header",
                        stream=self._egress.stream_id, url=redact_url(self._origin_url))
        return f"{name}:{','.join(specs)}"

"""RTSP through streamd's relay (streamd/sources/rtsp_relay.py): FFmpeg never follows an RTSP redirect nor a
Transport `source=` to an address the egress policy refuses; only rtsp_transport=tcp from the API (and, unless the
operator lists more in egress.rtsp_transports, from the config file). Loopback only: 127.0.0.2 allowed, 127.0.0.3
the canary the policy refuses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading

import aiohttp
import pytest

from streamd.config import StreamConfig, parse_config
from streamd.egress import EgressRules, StreamEgress
from streamd.sources.rtsp_relay import RtspRelay
from conftest import OPER, api_cfg, h, make_config, running, until

ALLOWED = "127.0.0.2"
CANARY = "127.0.0.3"


class TcpCanary:
    """Records every connection made to it (an address the policy refuses)."""

    def __init__(self) -> None:
        self.sock = socket.create_server((CANARY, 0))
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            c.close()


class RawServer:
    """Accepts one connection at a time, reads a request's header, answers each with the next of `replies`."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies
        self.sock = socket.create_server((ALLOWED, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(5)
            try:
                for reply in self.replies:
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        d = c.recv(4096)
                        if not d:
                            return
                        buf += d
                    cseq = buf.split(b"CSeq: ", 1)[1].split(b"\r\n", 1)[0]
                    c.sendall(reply.replace(b"{cseq}", cseq))
                c.recv(4096)
            except OSError:
                pass
            finally:
                c.close()


def _rules() -> EgressRules:
    return EgressRules(allow_networks=(ipaddress.ip_network(f"{ALLOWED}/32"),))


def stream(sid: str, url: str, **kw) -> StreamConfig:
    return StreamConfig.model_validate({"id": sid, "url": url, "pipeline": "frame_info", **kw})


async def test_rtsp_redirect_to_a_refused_address_fails_the_stream(redis_server):
    """An allowed RTSP origin answers DESCRIBE with 302 to the canary: FFmpeg gets a 502 instead, the canary no
    connection (old code: FFmpeg followed the redirect, on every reconnect), the stream's reason says why. An API
    stream asking for the HTTP tunnel (rtsp_transport=http, whose HTTP client follows redirects too) is refused
    before any connection."""
    canary = TcpCanary()
    origin = RawServer([b"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE\r\n\r\n",
                        f"RTSP/1.0 302 Found\r\nCSeq: {{cseq}}\r\nLocation: rtsp://{CANARY}:{canary.port}/x\r\n"
                        "Content-Length: 0\r\n\r\n".encode()])
    tunnel = socket.create_server((ALLOWED, 0))  # never accepted: FFmpeg's tunnel would wait on it
    fast = {"open_timeout_s": 3, "reconnect": {"initial_s": 0.1, "max_s": 0.2, "max_attempts": 2}}
    cfg = make_config(redis_server.url, [], egress={"allow": [f"{ALLOWED}/32"]})
    try:
        async with running(cfg) as d:
            redir = d.streams.add_stream(stream("redir", f"rtsp://u:secret@{ALLOWED}:{origin.port}/cam", **fast),
                                         "api")
            http = d.streams.add_stream(stream("tunnel", f"rtsp://{ALLOWED}:{tunnel.getsockname()[1]}/cam",
                                               ffmpeg_options={"rtsp_transport": "http"}, **fast), "api")
            await until(lambda: redir.state.value == "failed" and http.state.value == "failed", 20,
                        what="both streams failed")
    finally:
        tunnel.close()
    assert canary.hits == 0, "FFmpeg connected to an address the policy refuses"
    assert redir.reason_code == "egress_refused", (redir.reason, redir.reason_code)
    assert "RTSP redirect" in redir.reason and f"{CANARY}:{canary.port}" in redir.reason
    assert "secret" not in redir.reason
    assert http.reason_code == "egress_refused" and "rtsp_transport" in http.reason, http.reason


async def test_relay_filters_replies():
    """Split across reads: interleaved frames pass byte for byte, Location lines are dropped, Transport loses
    source=/destination=; a 3xx (whatever its case or spacing, as FFmpeg reads it) becomes a 502 and ends the
    connection."""
    frame = b"$\x00" + (3000).to_bytes(2, "big") + bytes(range(256)) * 11 + bytes(184)
    setup = (b"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nSession: 1\r\nLocation: rtsp://127.0.0.3/x\r\n"
             b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1;source=127.0.0.3;Destination=127.0.0.3\r\n"
             b"Content-Length: 4\r\n\r\nabcd")
    redirect = b"RTSP/1.0  0301 Moved\nCSeq: {cseq}\nlocation: rtsp://127.0.0.3/y\n\r\n"
    origin = RawServer([setup + frame + frame[:10], frame[10:] + redirect])
    egress = StreamEgress(_rules(), "t")
    relay = RtspRelay(egress, f"rtsp://{ALLOWED}:{origin.port}/cam", 3)
    url = await relay.start()
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(b"SETUP rtsp://x/cam RTSP/1.0\r\nCSeq: 3\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        assert b"Location" not in head and b"source=" not in head.lower() and b"destination" not in head.lower()
        assert b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n" in head
        assert await r.readexactly(4) == b"abcd"
        assert await r.readexactly(len(frame)) == frame
        w.write(b"PLAY rtsp://x/cam RTSP/1.0\r\nCSeq: 4\r\n\r\n")
        assert await r.readexactly(len(frame)) == frame
        rest = await asyncio.wait_for(r.read(), 5)
        assert rest.startswith(b"RTSP/1.0 502 ") and b"CSeq: 4" in rest and b"127.0.0.3" not in rest
        assert relay.error is not None and relay.error.code == "egress_refused"
    finally:
        w.close()
        await relay.aclose()
        await egress.aclose()


async def test_api_and_config_allow_only_interleaved_tcp(redis_server):
    """rtsp_transport udp, udp_multicast, http, https: 422 from the API (old code: 201); a config error naming the
    key unless egress.rtsp_transports lists them."""
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        for value in ("udp", "udp_multicast", "http", "https", "tcp+udp"):
            body = {"id": "o", "url": "rtsp://127.0.0.1:9/x", "pipeline": "frame_info",
                    "ffmpeg_options": {"rtsp_transport": value}}
            async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
                got = await resp.json()
                assert resp.status == 422, (value, resp.status, got)
                assert got["error"]["code"] == "invalid_option_value"
                assert got["error"]["details"]["path"] == "ffmpeg_options.rtsp_transport", got
    base = {"redis": {"url": redis_server.url}}
    udp = [{"id": "cam", "url": "rtsp://cam.lan/x", "ffmpeg_options": {"rtsp_transport": "udp"}}]
    with pytest.raises(Exception, match=r"rtsp_transport.*egress\.rtsp_transports"):
        parse_config({**base, "streams": udp}, environ={})
    cfg = parse_config({**base, "streams": udp, "egress": {"rtsp_transports": ["tcp", "udp"]}}, environ={})
    assert cfg.streams[0].ffmpeg_options["rtsp_transport"] == "udp"

"""Files, plain HTTP media, TCP and RTSP sources as an operator and an attacker try them (real servers on loopback,
real media): recordings play once and are never replayed, permanent local errors fail at once, a source that goes
silent is `stalled` on time whatever its thread is doing, a flapping source still reaches `failed`, FFmpeg connects
only to addresses the egress policy checked, and SIGTERM never waits out a stuck open."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from streamd.config import StreamConfig
from streamd.egress import EgressError, EgressRules, StreamEgress
from streamd.redis_server import free_port
from streamd.sources.base import Abandoned
from streamd.testing.egress import Canary, RebindingDns, connect_guard, redirect
from streamd.testing.servers import HttpDir, RtspServer
from conftest import at_least, events, make_config, results, running, settled, states, until

ALLOWED = "127.0.0.2"
CANARY = "127.0.0.3"
CLIP_FRAMES = 180  # conftest's clip: 6 s at 30 fps


def stream(sid: str, url: str, **kw) -> StreamConfig:
    return StreamConfig.model_validate({"id": sid, "url": url, **kw})


class TsServer:
    """Raw TCP (or HTTP without a length: a live feed) serving the first `send_bytes` of an MPEG-TS file on each
    connection, then going silent with the connection held open (`close=True`: closing it instead)."""

    def __init__(self, data: bytes, send_bytes: int, *, http: bool = False, close: bool = False,
                 host: str = "127.0.0.1", port: int | None = None):
        self.data, self.send_bytes, self.http, self.close = data, send_bytes, http, close
        self.host, self.port = host, port or free_port()
        self.connections = 0
        self.silent_since: float | None = None  # when the last byte of the first connection was sent
        self._sock = socket.create_server((host, self.port))
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'http' if self.http else 'tcp'}://{self.host}:{self.port}/live.ts"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            if self.http:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nConnection: close\r\n\r\n")
            conn.sendall(self.data[:self.send_bytes])
            if self.silent_since is None:
                self.silent_since = time.time()
            if self.close:
                conn.close()
            else:
                self._held.append(conn)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        for c in self._held:
            c.close()
        self._sock.close()


@pytest.fixture(scope="module")
def ts_clip(clip, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ts") / "clip.ts"
    subprocess.run([shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip), "-an",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-f", "mpegts", str(out)], check=True)
    return out.read_bytes()


def _pts(recs) -> list[float]:
    return [x["pts_s"] for x in recs]


def _once_in_order(pts: list[float]) -> bool:
    return len(pts) == len(set(pts)) and pts == sorted(pts)


# -- recordings: each frame once, then stopped -----------------------------------------------------------------
@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
async def test_http_mp4_plays_every_frame_once_then_stops(r, redis_server, clip, ranges):
    with Canary(ALLOWED, {"/clip.mp4": (200, {"Content-Type": "video/mp4"}, clip.read_bytes())}) as origin:
        origin.ranges = ranges
        cfg = make_config(redis_server.url, [{"id": "mp4", "url": origin.url("/clip.mp4"), "fps": None}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["mp4"].state.value == "stopped", 60, what="the recording ended")
            n = await settled(r, "mp4")  # the last frames are still in the pipeline when the source ends
            await asyncio.sleep(2.0)
            assert len(await results(r, "mp4")) == n  # never replayed
            assert d.streams.runners["mp4"].reason_code == "ended"
    pts = _pts(await results(r, "mp4"))
    assert len(pts) == CLIP_FRAMES and _once_in_order(pts)
    assert states(await events(r, "mp4", "state")) == ["connecting", "live", "stopped"]
    assert origin.hits("/clip.mp4") >= 1


async def test_corrupt_middle_file_is_skipped_never_replayed(r, redis_server, clip, tmp_path):
    data = bytearray(clip.read_bytes())
    a, b = len(data) * 2 // 5, len(data) * 3 // 5
    data[a:b] = bytes((i * 7 + 13) % 256 for i in range(b - a))  # garbage over the middle fifth
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    cfg = make_config(redis_server.url, [{"id": "cm", "url": str(bad), "fps": None,
                                          "reconnect": {"initial_s": 0.1, "max_attempts": 50}}])
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["cm"].state.value in ("stopped", "failed"), 60, what="the file ended")
        n = await settled(r, "cm")
        await asyncio.sleep(2.0)
        assert len(await results(r, "cm")) == n
    pts = _pts(await results(r, "cm"))
    assert 0 < len(pts) < CLIP_FRAMES and _once_in_order(pts), (len(pts), pts[:5])
    assert max(pts) > 4.0  # decoding went on past the damaged region
    assert "backoff" not in states(await events(r, "cm", "state"))  # never reopened (and replayed)


@pytest.mark.parametrize("kind", ["directory", "fifo", "empty", "text", "missing"])
async def test_permanent_local_errors_fail_at_once(r, redis_server, tmp_path, kind):
    p = tmp_path / "in.mp4"
    if kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a video\n" * 100)
    threads = threading.active_count()
    cfg = make_config(redis_server.url, [{"id": "bad", "url": str(p),
                                          "reconnect": {"initial_s": 0.1, "max_attempts": 5}}])
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["bad"].state.value == "failed", 10, what="failed")
        code = d.streams.runners["bad"].reason_code
    assert code == ("not_found" if kind == "missing" else "not_media"), (code, d.streams.runners["bad"].reason)
    assert states(await events(r, "bad", "state")) == ["connecting", "failed"]  # no retry
    assert threading.active_count() <= threads + 1 and Abandoned.alive("bad") == 0  # no thread left in an open


# -- stalls on time ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("http", [False, True], ids=["tcp-ffmpeg", "http-egress"])
async def test_source_silent_mid_stream_is_stalled_on_time(r, redis_server, ts_clip, http):
    srv = TsServer(ts_clip, len(ts_clip) // 3, http=http)
    try:
        cfg = make_config(redis_server.url, [{"id": "quiet", "url": srv.url, "fps": 5.0, "stall_timeout_s": 2,
                                              "open_timeout_s": 30, "reconnect": {"initial_s": 30}}])
        async with running(cfg):
            evs = await until(lambda: _state_event(r, "quiet", "stalled"), 15, what="stalled")
            recs = await results(r, "quiet")
            t_close = time.monotonic()
        closed_in = time.monotonic() - t_close
    finally:
        srv.stop()
    assert recs, "frames before the silence"
    last_frame = max(x["capture_ts"] for x in recs)
    late = evs["ts"] - last_frame
    assert 2.0 <= late <= 2.0 + 1.5, late  # stall_timeout_s + 1 s (+ the watchdog's tick), not open_timeout_s
    assert closed_in < 10, closed_in  # shutdown did not wait out the 30 s read


async def _state_event(r, sid: str, to: str):
    return next((e for e in await events(r, sid, "state") if e["to"] == to), None)


@pytest.mark.skipif(not RtspServer.available(),
                    reason="Debian's GStreamer RTSP server (python3-gi) is not installed on this machine")
async def test_rtsp_camera_frozen_with_sigstop_is_stalled_on_time(r, redis_server):
    srv = RtspServer(size=(320, 180)).start()
    try:
        cfg = make_config(redis_server.url, [{"id": "cam", "url": srv.url, "fps": 5.0, "stall_timeout_s": 2,
                                              "open_timeout_s": 30, "reconnect": {"initial_s": 30}}])
        async with running(cfg) as d:
            await until(lambda: at_least(r, "cam", 3), 40, what="3 RTSP results")
            os.killpg(srv.proc.pid, signal.SIGSTOP)
            t0 = time.time()
            try:
                ev = await until(lambda: _state_event(r, "cam", "stalled"), 15, what="stalled")
            finally:
                os.killpg(srv.proc.pid, signal.SIGCONT)
            assert d.streams.runners["cam"].state.value != "live"
    finally:
        srv.stop()
    assert ev["ts"] - t0 <= 2.0 + 1.5, ev["ts"] - t0
    assert ev["reason_code"] == "stalled"


async def test_flapping_source_still_reaches_failed(r, redis_server, ts_clip):
    srv = TsServer(ts_clip, len(ts_clip) // 4, close=True)  # ~1.5 s of video, then the connection closes
    try:
        cfg = make_config(redis_server.url, [{"id": "flap", "url": srv.url, "fps": 5.0,
                                              "reconnect": {"initial_s": 0.1, "max_s": 0.2, "max_attempts": 3,
                                                            "reset_after_s": 30}}])
        async with running(cfg) as d:
            await until(lambda: d.streams.runners["flap"].state.value == "failed", 30, what="failed")
            reason = d.streams.runners["flap"].reason
    finally:
        srv.stop()
    st = states(await events(r, "flap", "state"))
    assert st.count("live") >= 2 and st[-1] == "failed", st  # live each time, yet it gives up
    assert "gave up after 3 attempts" in reason and srv.connections == 4


# -- FFmpeg connects only where the policy says -----------------------------------------------------------------
async def test_ffmpeg_is_given_the_checked_address_not_the_name():
    eg = StreamEgress(EgressRules(deny_non_global=True, allow_networks=(), allow_hosts=("localhost",)), "s")
    pinned = await eg.pin_url("rtsp://user:pw@localhost:8554/cam?x=1")
    assert pinned in ("rtsp://user:pw@127.0.0.1:8554/cam?x=1", "rtsp://user:pw@[::1]:8554/cam?x=1"), pinned
    await eg.aclose()


@pytest.mark.parametrize("target", ["canary", "metadata", "cgnat"])
async def test_api_stream_never_reaches_a_refused_address(r, redis_server, ts_clip, clip, target):
    """RTSP/TCP straight to a refused address, and plain HTTP media redirected to one: refused before any
    connection (the canary sees none, no connect outside loopback is attempted)."""
    canary = TsServer(ts_clip, len(ts_clip), host=CANARY)
    web_canary = Canary(CANARY, {"/clip.mp4": (200, {}, clip.read_bytes())}).start()
    far = {"canary": None, "metadata": "169.254.169.254", "cgnat": "100.100.100.200"}[target]
    direct = f"rtsp://{far}:554/cam" if far else f"rtsp://{CANARY}:{canary.port}/cam"
    hop = f"http://{far}/clip.mp4" if far else web_canary.url("/clip.mp4")
    try:
        with Canary(ALLOWED, {"/clip.mp4": redirect(hop)}) as origin, connect_guard() as guard:
            cfg = make_config(redis_server.url, [], egress={"allow": [f"{ALLOWED}/32"]})
            async with running(cfg) as d:
                for sid, url in (("direct", direct), ("tcp", direct.replace("rtsp://", "tcp://")),
                                 ("redirect", origin.url("/clip.mp4"))):
                    d.streams.add_stream(stream(sid, url), "api")
                for sid in ("direct", "tcp", "redirect"):
                    await until(lambda: _reason(d, sid), 15, what=f"{sid} refused")
                    assert d.streams.runners[sid].reason_code == "egress_refused", (sid, d.streams.runners[sid].reason)
            assert origin.hits("/clip.mp4") >= 1
        assert canary.connections == 0 and web_canary.connections == 0
        assert guard.outside == []
    finally:
        canary.stop()
        web_canary.stop()


async def test_a_rebinding_name_never_leads_a_connection_to_its_second_address(r, redis_server, ts_clip, clip):
    """`rebind.test` answers the allowed address first and the canary's afterwards (same port on both): FFmpeg
    (TCP) connects to the address the policy checked, never resolving the name itself; plain HTTP media resolves
    through the policy on every new connection, so a later answer is checked too. The canary sees nothing."""
    live = TsServer(ts_clip, len(ts_clip), host=ALLOWED)
    canary = TsServer(ts_clip, len(ts_clip), host=CANARY, port=live.port)
    web = Canary(ALLOWED, {"/clip.mp4": (200, {}, clip.read_bytes())}).start()
    web_canary = Canary(CANARY, {"/clip.mp4": (200, {}, clip.read_bytes())}, port=web.port).start()
    try:
        cfg = make_config(redis_server.url, [], egress={"allow": [f"{ALLOWED}/32"]})
        async with running(cfg) as d:
            with RebindingDns("rebind.test", ALLOWED, CANARY) as dns:
                d.streams.add_stream(stream("rb-tcp", f"tcp://rebind.test:{live.port}/live.ts", fps=None), "api")
                await until(lambda: at_least(r, "rb-tcp", 5), 20, what="results through the checked address")
                first = dns.lookups
                # checked: its other frames would only share the detector with the HTTP stream (slow on busy cores)
                await d.streams.remove_stream("rb-tcp")
            with RebindingDns("rebind.test", ALLOWED, CANARY):
                d.streams.add_stream(stream("rb-http", f"http://rebind.test:{web.port}/clip.mp4", fps=None), "api")
                # the whole clip through the default detector: the wait is for the model, long on 2 busy cores
                await until(lambda: d.streams.runners["rb-http"].state.value in ("stopped", "failed", "backoff"), 90,
                            what="the HTTP stream to end or be refused")
            http_state, http_code = d.streams.runners["rb-http"].state.value, d.streams.runners["rb-http"].reason_code
            if http_state == "stopped":  # its last frames are still in the detector when the source ends
                with contextlib.suppress(AssertionError):  # fewer is for the assertion below to report
                    await until(lambda: at_least(r, "rb-http", CLIP_FRAMES), 60, what="the clip's results")
            http_results = await settled(r, "rb-http")
    finally:
        for s in (live, canary):
            s.stop()
        for c in (web, web_canary):
            c.stop()
    assert first == 1  # one resolution for FFmpeg's connection; FFmpeg never asked again
    assert live.connections >= 1 and canary.connections == 0
    assert web.connections >= 1 and web_canary.connections == 0
    # it either played over the first (checked) connection or was refused on a later resolution: never the canary
    assert (http_state == "stopped" and http_results == CLIP_FRAMES) or http_code == "egress_refused", \
        (http_state, http_code, http_results)


@pytest.mark.parametrize("keep_alive", [True, False])
async def test_fetches_reuse_only_a_connection_to_a_checked_address(tmp_path, keep_alive):
    """An origin that keeps connections alive (HLS origins and CDNs do: `HttpDir(keep_alive=True)`): a stream's
    fetches share one connection, made to the address the policy checked; the name is not resolved again while it
    lives, so a rebinding answer is never used, and another name for the same port is resolved and checked before a
    connection of its own (here refused). An HTTP/1.0 origin closes each connection: the next fetch resolves again
    and the policy refuses the rebinding answer. The canary (the rebinding address) never sees a connection."""
    for i in range(3):
        (tmp_path / f"s{i}.ts").write_bytes(bytes([0x47]) * 1000 * (i + 1))
    http = HttpDir(tmp_path, keep_alive=keep_alive).start()
    canary = Canary(CANARY, {"/s1.ts": (200, {}, b"canary")}, port=http.port).start()
    eg = StreamEgress(EgressRules(deny_non_global=True, allow_networks=(ipaddress.ip_network("127.0.0.1/32"),)),
                      "s")
    refused: list[str] = []

    async def fetch(url: str) -> int:
        try:
            return len((await eg.fetch(url, max_bytes=10_000, timeout_s=5))[0])
        except EgressError as e:
            refused.append(e.code)
            return -1

    try:
        with connect_guard() as guard:
            with RebindingDns("rebind.test", "127.0.0.1", CANARY) as dns:
                got = [await fetch(f"http://rebind.test:{http.port}/s{i}.ts") for i in range(3)]
                lookups = dns.lookups
            with RebindingDns("other.test", CANARY, CANARY):  # another name, same port: not the pooled connection
                other = await fetch(f"http://other.test:{http.port}/s0.ts")
    finally:
        await eg.aclose()
        http.stop()
        canary.stop()
    assert guard.outside == [] and canary.connections == 0
    assert all(addr[0] == "127.0.0.1" for addr in guard.connects), guard.connects
    assert other == -1
    if keep_alive:
        assert got == [1000, 2000, 3000] and lookups == 1 and len(guard.connects) == 1, (got, lookups, guard.connects)
        assert refused == ["egress_refused"]
    else:
        assert got == [1000, -1, -1] and lookups == 3 and len(guard.connects) == 1, (got, lookups, guard.connects)
        assert refused == ["egress_refused"] * 3


def _reason(d, sid):
    return d.streams.runners[sid].reason_code in ("egress_refused",) or d.streams.runners[sid].state.value == "failed"


def test_sigterm_during_a_stuck_open_exits_within_grace(tmp_path, redis_server):
    """An RTSP server that accepts and never answers: the open would wait open_timeout_s (60 s)."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: [accepted.append(silent.accept()[0]) for _ in range(20)], daemon=True).start()
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps({"redis": {"url": redis_server.url}, "shutdown": {"grace_s": 2},
                             "streams": [{"id": "stuck", "url": f"rtsp://127.0.0.1:{port}/cam",
                                          "open_timeout_s": 60}]}))
    proc = subprocess.Popen([sys.executable, "-m", "streamd", "run", "-c", str(f)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert accepted, "the daemon never connected"
        time.sleep(1.0)  # stuck in the open now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        silent.close()
    assert rc == 0, proc.stderr.read()[-3000:]
    print("took", took)
    assert took <= 2 + 2.5, took  # grace_s, plus the process's own exit


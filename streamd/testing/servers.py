"""Test servers: real processes and sockets on loopback, no mocks.

- `ManagedRedis`, `free_port` (re-exported from `streamd.redis_server`): a real redis-server on a free port;
  `stop(kill=True)` + `start()` restarts it on the same port for outage tests.
- `HttpDir`: serves a folder over HTTP from a thread; stop/start on the same port; per-path faults; HTTP/1.1
  keep-alive on request (`keep_alive=True`), as HLS origins and CDNs answer.
- `LiveHls`: ffmpeg writes a live HLS stream in real time (a looping clip) into a folder served by `HttpDir`.
- `RtspServer`: Debian's GStreamer RTSP server (run with the system Python, which has `gi`).
- `ServedHttp`: stop() and `with` for the thread-served HTTP servers here and in `streamd.testing.egress`.
- `wait_for`: poll a condition with a deadline (blocking; for starting servers).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from streamd.redis_server import ManagedRedis, free_port

__all__ = ["ManagedRedis", "free_port", "wait_for", "ServedHttp", "HttpDir", "LiveHls", "RtspServer"]


def wait_for(cond: Any, timeout_s: float = 10.0, interval_s: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class _Handler(SimpleHTTPRequestHandler):
    faults: dict[str, int] = {}

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        code = self.server.faults.get(self.path.split("?")[0].rsplit("/", 1)[-1])  # type: ignore[attr-defined]
        if code is None:
            code = self.server.faults.get("*")  # type: ignore[attr-defined]
        if code:
            self.send_error(code)
            return
        super().do_GET()


class _KeepAliveHandler(_Handler):
    """HTTP/1.1: a client may send its next request on the same connection (files are sent with Content-Length)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the headers' small write must not wait for an ACK (nginx: tcp_nodelay on)


class ServedHttp:
    """stop() and `with` for a test HTTP server held in `self._srv` and started by `start()`."""

    _srv: ThreadingHTTPServer | None

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None

    def __enter__(self) -> Any:
        return self.start()  # type: ignore[attr-defined]  # each server's own

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HttpDir(ServedHttp):
    """A real HTTP server for a folder. `faults` maps a file name (or '*') to an HTTP status to answer with.
    `keep_alive`: answer as HTTP/1.1 and keep connections open between requests (the default, HTTP/1.0, closes each
    one; outage tests rely on that: a connection kept open would still be served after stop())."""

    def __init__(self, root: str | Path, port: int | None = None, keep_alive: bool = False):
        self.root = Path(root)
        self.port = port or free_port()
        self.keep_alive = keep_alive
        self.faults: dict[str, int] = {}
        self._srv: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def start(self) -> "HttpDir":
        handler = partial(_KeepAliveHandler if self.keep_alive else _Handler, directory=str(self.root))
        ThreadingHTTPServer.allow_reuse_address = True
        self._srv = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._srv.faults = self.faults  # type: ignore[attr-defined]
        self._srv.daemon_threads = True
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()
        return self


class LiveHls:
    """ffmpeg plays `clip` in a loop in real time and writes a live HLS playlist (index.m3u8) into `out_dir`."""

    def __init__(self, clip: str | Path, out_dir: str | Path, segment_s: float = 1.0, list_size: int = 5):
        self.clip = Path(clip)
        self.out_dir = Path(out_dir)
        self.segment_s = segment_s
        self.list_size = list_size
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def playlist(self) -> Path:
        return self.out_dir / "index.m3u8"

    def start(self, wait_segments: int = 2, timeout_s: float = 30.0) -> "LiveHls":
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise RuntimeError("ffmpeg is not installed (apt-get install ffmpeg)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        args = [exe, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip),
                "-an", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "15",
                "-f", "hls", "-hls_time", str(self.segment_s), "-hls_list_size", str(self.list_size),
                "-hls_flags", "delete_segments+omit_endlist", str(self.playlist)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)

        def ready() -> bool:
            return self.playlist.exists() and self.playlist.read_text().count("#EXTINF") >= wait_segments

        wait_for(ready, timeout_s, 0.1, "live HLS segments")
        return self

    def segments(self) -> list[str]:
        return [ln for ln in self.playlist.read_text().splitlines() if ln and not ln.startswith("#")]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


RTSP_SERVER_SCRIPT = r"""
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer, GLib
Gst.init(None)
port, width, height, fps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 ! "
    "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)
factory.set_shared(True)
server.get_mount_points().add_factory("/live", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
"""


class RtspServer:
    """Debian's GStreamer RTSP server streaming a moving test pattern at rtsp://127.0.0.1:PORT/live."""

    def __init__(self, port: int | None = None, size: tuple[int, int] = (640, 360), fps: int = 30):
        self.port = port or free_port()
        self.size = size
        self.fps = fps
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/live"

    @staticmethod
    def available() -> bool:
        return subprocess.run(
            ["/usr/bin/python3", "-c", "import gi; gi.require_version('GstRtspServer', '1.0');"
             "from gi.repository import GstRtspServer"], capture_output=True).returncode == 0

    def start(self, timeout_s: float = 15.0) -> "RtspServer":
        script = Path(tempfile.mkdtemp(prefix="streamd-rtsp-")) / "rtsp_server.py"
        script.write_text(RTSP_SERVER_SCRIPT)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(script), str(self.port), str(self.size[0]), str(self.size[1]), str(self.fps)],
            stdout=subprocess.PIPE, env=env, start_new_session=True)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout_s, 0.1, "the RTSP server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

"""A managed redis-server child process: the embedded default when no Redis URL is configured, and the test
kit's Redis. Binds 127.0.0.1 on a free port, keeps its files in a local folder, stops on exit.

It also stops when its owner dies without stopping it (SIGKILL, `os._exit`, a crash): a watchdog process holds
the read end of a pipe whose write end only the owner holds. The kernel closes that end when the owner's process
goes, however it goes and whichever thread started the server (unlike PR_SET_PDEATHSIG, which follows the forking
*thread*, and the daemon starts the server from a worker thread); the watchdog then sends the server SIGTERM
(SIGKILL after 10 s where pidfds make that safe). `stop()` stands the watchdog down first and stops the server
itself, as before. Should the watchdog fail to start, the server runs without one (a warning is logged).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from streamd.errors import StreamdError
from streamd.log import get_logger

log = get_logger("streamd.redis_server")

# Run as `python -I -S -c _WATCHDOG <pid>`, stdin the read end of the owner's pipe. EOF without the stand-down
# byte means the owner is gone: SIGTERM the server (through a pidfd where there is one, so a reused pid is never
# hit; then SIGKILL if it is still there after 10 s). Ctrl-C in the owner's terminal is ignored: the owner
# decides. Kept to the standard library's smallest part, it starts in ~20 ms.
_WATCHDOG = """# streamd: stop this redis-server pid when its owner dies
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pid = int(sys.argv[1])
try:
    pidfd = os.pidfd_open(pid)
except (AttributeError, OSError):
    pidfd = None
data = b""
while True:
    chunk = os.read(0, 64)
    if not chunk:
        break
    data += chunk
if b"q" in data:
    sys.exit(0)
def send(sig):
    try:
        if pidfd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
if send(signal.SIGTERM) and pidfd is not None and not select.select([pidfd], [], [], 10.0)[0]:
    send(signal.SIGKILL)
"""


class RedisServerError(StreamdError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedRedis:
    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None, durable: bool = False):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "ManagedRedis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerError(
                "redis-server is not installed: install it (apt-get install redis-server) or set redis.url"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir.resolve()),
                "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
                "--logfile", str((self.data_dir / "redis.log").resolve())]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        args += self.extra_args()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self._start_watchdog(self.proc.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stop_watchdog()
                raise RedisServerError(f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port}")

    def extra_args(self) -> list[str]:
        """More redis-server arguments (a subclass's: a cluster node's)."""
        return []

    def _start_watchdog(self, pid: int) -> None:
        try:
            self.watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pid)],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True)
        except (OSError, ValueError) as e:  # no usable interpreter, a platform without it: run unwatched
            self.watchdog = None
            log.warning("redis-server watchdog not started: the server outlives a killed owner",
                        error=str(e) or type(e).__name__)

    def _stop_watchdog(self) -> None:
        w, self.watchdog = self.watchdog, None
        if w is None:
            return
        try:
            assert w.stdin is not None
            w.stdin.write(b"q")
            w.stdin.close()
        except OSError:  # it is gone already
            pass
        try:
            w.wait(5)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        self._stop_watchdog()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "ManagedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

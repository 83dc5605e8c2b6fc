"""What the benchmarks share: CPU time of this process (and of a child), how busy the rest of the machine was
while a measurement ran, and which streamd revision was measured. Imported by the scripts in this folder."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process (all threads), or by process `pid` (Linux /proc;
    0 where it cannot be read)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat; 0 where unreadable)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / _TICK  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        return 0.0


class OtherLoad:
    """CPU used by *other* processes while the benchmark ran (the machine's busy time minus ours and our
    redis-server's): tells whether the figures were taken on a quiet box."""

    def __init__(self, redis_pid: int | None = None, children: bool = False):
        self.redis_pid = redis_pid
        self.children = children  # count our finished (waited-for) child processes as ours
        self.t0, self.m0, self.c0, self.r0 = time.monotonic(), machine_busy_s(), self._own_s(), self._redis_s()

    def _own_s(self) -> float:
        t = os.times()
        return cpu_s() + (t.children_user + t.children_system if self.children else 0.0)

    def _redis_s(self) -> float:
        # no redis-server: nothing (cpu_s(None) is this process, which must not be counted twice)
        return cpu_s(self.redis_pid) if self.redis_pid is not None else 0.0

    def cores(self) -> float:
        wall = time.monotonic() - self.t0
        other = (machine_busy_s() - self.m0) - (self._own_s() - self.c0) - (self._redis_s() - self.r0)
        return max(0.0, other) / wall if wall > 0 else 0.0

    def cpu(self) -> float:
        """CPU seconds this process (and the redis-server) used since the start."""
        return (self._own_s() - self.c0) + (self._redis_s() - self.r0)


def cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def revision() -> str:
    """The streamd code measured: git commit, and whether streamd/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "streamd"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {head}" + (" + uncommitted changes in streamd/" if dirty else "")


class ThreadCpu:
    """CPU time of this process's threads while a measurement runs, summed by group (`group(name)` maps a thread's
    name, its Python name where it has one, else the OS's, to a group). Linux only (/proc/self/task/*/schedstat;
    nothing elsewhere). Threads come and go during a run, so a background thread reads them every `interval_s`:
    a thread's last interval before it ends is missed, and the reading costs a little CPU itself (it is left out
    of the groups). Opt-in: `--threads` in the benchmarks that take it."""

    def __init__(self, group: Any, interval_s: float = 0.05):
        self._group = group
        self._interval_s = interval_s
        self._names: dict[int, str] = {}
        self._first: dict[str, float] = {}
        self._last: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-cpu", daemon=True)

    def _read(self) -> dict[str, tuple[str, float]]:
        for t in threading.enumerate():
            if t.native_id:
                self._names[t.native_id] = t.name
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                name = self._names.get(int(tid))
                if name is None:
                    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
                    name = stat[stat.index("(") + 1:stat.rindex(")")]
                out[tid] = (name, int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9)
            except (OSError, ValueError, IndexError):
                pass  # the thread ended meanwhile
        return out

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._last.update(self._read())

    def __enter__(self) -> "ThreadCpu":
        if Path("/proc/self/task").is_dir():
            self._first = {tid: cpu for tid, (_, cpu) in self._read().items()}
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._last.update(self._read())

    def groups(self) -> dict[str, float]:
        """CPU seconds by group over the measurement."""
        out: dict[str, float] = {}
        for tid, (name, cpu) in self._last.items():
            if name == "thread-cpu":
                continue
            g = self._group(name)
            out[g] = out.get(g, 0.0) + cpu - self._first.get(tid, 0.0)
        return out

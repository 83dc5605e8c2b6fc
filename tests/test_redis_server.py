"""The embedded redis-server never outlives the daemon that started it: real `streamd run` processes, real
signals, the real redis-server child found through /proc."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STREAMD = [sys.executable, "-m", "streamd"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="this machine has no Linux /proc")


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start time) of a live process, or None when it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = raw[raw.index("(") + 1:raw.rindex(")")], raw[raw.rindex(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return comm, rest[0], int(rest[1]), int(rest[19])


def _children(pid: int) -> dict[int, tuple[str, int]]:
    """pid -> (comm, start time) of every live child of `pid`."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and st[2] == pid:
            out[int(d.name)] = (st[0], st[3])
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[3] == start  # the same process, not a reused pid


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_embedded_redis_server_stops_when_the_daemon_dies(tmp_path, sig):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"redis:\n  data_dir: {tmp_path / 'redis'}\nstreams:\n  - id: k\n    url: redis:frames:k\n"
                   "    pipeline: frame_info\n")
    env = {k: v for k, v in os.environ.items() if k != "STREAMD_REDIS_URL"}
    err = tmp_path / "stderr.txt"
    children: dict[int, tuple[str, int]] = {}
    with err.open("w") as errf:
        proc = subprocess.Popen(STREAMD + ["run", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=errf, env=env)
    try:
        deadline = time.monotonic() + 90
        while "started embedded redis-server" not in err.read_text():
            assert proc.poll() is None, f"streamd exited with {proc.returncode}: {err.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no embedded redis-server: {err.read_text()[-2000:]}"
            time.sleep(0.1)
        children = _children(proc.pid)
        redis = [p for p, (comm, _) in children.items() if comm.startswith("redis-server")]
        assert len(redis) == 1, children
        proc.send_signal(sig)
        rc = proc.wait(30)
        if sig == signal.SIGTERM:
            assert rc == 0, err.read_text()[-2000:]
        deadline = time.monotonic() + 5
        while (left := {p: c for p, c in children.items() if _alive(p, c[1])}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"still running after streamd got {sig.name}: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, (_, start) in children.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)

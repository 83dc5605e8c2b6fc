"""What the benchmarks measure CPU with (benchmarks/common.py): a process's own CPU is counted once, and CPU per
thread group lands in the group of the thread that used it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import OtherLoad, cpu_s  # noqa: E402


def _spin(cpu_s_wanted: float) -> None:
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_s_wanted:
        sum(range(1000))


def test_other_load_without_redis_counts_this_process_once():
    load = OtherLoad()  # no redis-server pid: only this process
    c0 = cpu_s()
    _spin(0.3)
    own = cpu_s() - c0
    assert own > 0.1
    # the old code added this process's CPU a second time in place of the (absent) redis-server's
    assert load.cpu() == pytest.approx(own, rel=0.25, abs=0.03)


_THREAD_CPU = """
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from common import ThreadCpu

def spin(cpu_s_wanted):
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_s_wanted:
        sum(range(1000))

with ThreadCpu(lambda name: "busy" if name == "busy-worker" else "other", interval_s=0.02) as tc:
    t = threading.Thread(target=spin, args=(0.3,), name="busy-worker")
    t.start()
    t.join()
    time.sleep(0.05)  # read at least once more after the thread ended (its last interval may be missed)
print(json.dumps(tc.groups()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_thread_cpu_groups_cpu_by_thread():
    # in a fresh process: threads other tests left in this one (a model's pools, a daemon's helpers) use CPU of
    # their own, which would land in "other" (CI once saw it outweigh the busy thread)
    import json
    import subprocess

    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    p = subprocess.run([sys.executable, "-c", _THREAD_CPU, bench], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    groups = json.loads(p.stdout.strip().splitlines()[-1])
    assert groups.get("busy", 0.0) > 0.15, groups
    assert groups.get("busy", 0.0) > groups.get("other", 0.0), groups
    assert "thread-cpu" not in groups

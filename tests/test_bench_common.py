"""What the benchmarks measure CPU with (benchmarks/common.py): a process's own CPU is counted once, and CPU per
thread group lands in the group of the thread that used it."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import OtherLoad, ThreadCpu, cpu_s  # noqa: E402


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


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_thread_cpu_groups_cpu_by_thread():
    with ThreadCpu(lambda name: "busy" if name == "busy-worker" else "other", interval_s=0.02) as tc:
        t = threading.Thread(target=_spin, args=(0.3,), name="busy-worker")
        t.start()
        t.join()
        time.sleep(0.05)  # read at least once more after the thread ended (its last interval may be missed)
    groups = tc.groups()
    assert groups.get("busy", 0.0) > 0.15
    assert groups.get("busy", 0.0) > groups.get("other", 0.0)
    assert "thread-cpu" not in groups

"""One executor thread per device: model loads, unloads and forward passes on a device never run concurrently with
each other, and never on the event loop. Stages and the model manager share them."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

JOB_NICE = 10  # jobs' threads (their decoders, a detector's job lane): this much nicer than the live streams'

_executors: dict[str, ThreadPoolExecutor] = {}


def device_executor(device: str) -> ThreadPoolExecutor:
    """The device's one thread (made on first use)."""
    ex = _executors.get(device)
    if ex is None:
        ex = _executors[device] = ThreadPoolExecutor(1, thread_name_prefix=f"model-{device}")
    return ex


def job_priority() -> None:
    """The calling thread runs at the jobs' lower CPU priority (JOB_NICE more than now): while live streams want
    the cores, the kernel gives them first (Linux: a thread's nice value is its own; elsewhere nothing happens).
    A thread can lower its priority but not raise it again: call it only in threads that do jobs' work alone."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + JOB_NICE))
    except (AttributeError, OSError):  # no per-thread priority here
        pass

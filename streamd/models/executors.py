"""One executor thread per device: model loads, unloads and forward passes on a device never run concurrently with
each other, and never on the event loop. Stages and the model manager share them.

Torch's intra-op threads on that thread: every call submitted runs at the count the thread started with (torch's
count for the process then: its default, or OMP_NUM_THREADS). Ultralytics' `select_device`, which its predictor
set-up and ONNX export call on this thread, does `torch.set_num_threads(cores - 1)`: on 2 cores one thread. That
used to stay on the thread, so in a daemon with a CPU detector SAM 2 and the VLM ran their passes at one thread on
2 cores (benchmarks/RESULTS.md, issue 15). Now it lasts until the call that made it returns; the detector's lanes
keep Ultralytics' count in their own threads (`pin_torch_threads`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def pin_torch_threads(n: int | None) -> None:
    """This thread's torch intra-op threads to `n` (None: leave them). `torch.set_num_threads` sets the calling
    thread's OpenMP and MKL counts, and the count torch gives threads that use it for the first time later on;
    it is called only when this thread's count differs, so the threads that pin do not undo each other."""
    torch = sys.modules.get("torch")
    if n is not None and torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class DeviceExecutor(ThreadPoolExecutor):
    """The device's one thread; each call at the torch thread count the thread started with (`torch_threads`)."""

    def __init__(self, device: str):
        super().__init__(1, thread_name_prefix=f"model-{device}", initializer=self._started)
        self.torch_threads: int | None = None

    def _started(self) -> None:
        try:
            import torch
        except ImportError:  # pragma: no cover - every model runtime here is torch
            return
        self.torch_threads = torch.get_num_threads()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return super().submit(self._pinned, fn, *args, **kwargs)

    def _pinned(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:  # only code on this thread changes its count
            pin_torch_threads(self.torch_threads)


_executors: dict[str, DeviceExecutor] = {}


def device_executor(device: str) -> DeviceExecutor:
    """The device's one thread (made on first use)."""
    ex = _executors.get(device)
    if ex is None:
        ex = _executors[device] = DeviceExecutor(device)
    return ex

"""One executor thread per device: model loads, unloads and forward passes on a device never run concurrently with
each other, and never on the event loop. Stages and the model manager share them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

_executors: dict[str, ThreadPoolExecutor] = {}


def device_executor(device: str) -> ThreadPoolExecutor:
    """The device's one thread (made on first use)."""
    ex = _executors.get(device)
    if ex is None:
        ex = _executors[device] = ThreadPoolExecutor(1, thread_name_prefix=f"model-{device}")
    return ex

"""Memory of loaded models: what a model holds, what a device has, and giving memory back.

What a model holds (`Footprint`), measured on the device's executor thread around its load:
- on CUDA, the bytes torch's caching allocator has allocated on that device after the load minus before it. Every
  load and forward pass on a device runs in that device's one executor thread, so nothing else allocates there
  meanwhile; the figure covers weights and whatever the loader allocated on the GPU and kept.
- on the CPU, the bytes of the model's parameters and buffers (every tensor of each torch module it holds, storage
  counted once). Not the process's RSS delta: decoder threads, the event loop and other models' forward passes
  allocate and free at the same time, so a process-wide delta around one load mixes their memory in (several MB
  either way; Ultralytics also runs a forward pass while building a model, whose activations glibc keeps unless
  trimmed). Parameter bytes are exact for what the model pins and what unloading gives back. The RSS delta
  (after a `malloc_trim`) is measured too and reported beside it (`host_rss_delta_bytes`), for comparison.

Giving memory back (`release`): the caller drops its references first; then a collection of the young
generations (a full `gc.collect()` only if the model is still alive: it pauses the whole process), `malloc_trim(0)` on
glibc (freed heap pages go back to the kernel; streamd's malloc thresholds keep up to 256 MB otherwise) and
`torch.cuda.empty_cache()` on CUDA (the allocator's cached blocks go back to the driver).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Footprint:
    bytes: int  # what the budget counts: CUDA allocator bytes on a GPU, parameter/buffer bytes on the CPU
    method: str  # "cuda_allocator" or "tensor_bytes"
    host_rss_delta_bytes: int  # the process's RSS after the load minus before it (both after a trim)


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _torch() -> Any:
    return sys.modules.get("torch")  # only where a model loader imported it already


def cuda_allocated(device: str) -> int:
    torch = _torch()
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_allocated(device))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers of the torch modules in `obj` (a module, or a tuple/list holding some,
    e.g. a transformers (processor, model) pair), each storage counted once."""
    torch = _torch()
    if torch is None:
        return 0
    seen: set[int] = set()
    total = 0
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, (tuple, list)):
            todo.extend(x)
        elif isinstance(x, torch.nn.Module):
            for t in [*x.parameters(), *x.buffers()]:
                s = t.untyped_storage()
                key = s.data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += s.nbytes()
    return total


def trim_heap() -> None:
    """Return freed heap memory to the kernel (glibc `malloc_trim(0)`; nothing elsewhere)."""
    try:
        if os.confstr("CS_GNU_LIBC_VERSION"):
            ctypes.CDLL(None).malloc_trim(0)
    except (ValueError, OSError, AttributeError):
        pass


def release(device: str, alive: Callable[[], bool] = lambda: True) -> None:
    """After the last reference to a model went: collect, trim the heap, empty CUDA's cache. On the executor.

    A model in no reference cycle is freed when its last reference goes: then collecting the young generations
    (a few ms) is enough. A full collection holds the GIL for 0.2 s and more once torch is loaded, which stalls
    every stream's decoder and the event loop (a visible gap in the results): it runs only while `alive()` says
    the model was not freed."""
    gc.collect(1)
    if alive():
        gc.collect()
    trim_heap()
    torch = _torch()
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def freeze_imports(modules: Iterable[str]) -> bool:
    """Import the libraries a kind of model needs, the first time this process needs them, then move every object
    alive out of the cyclic collector's sight (`gc.freeze()`). A full collection traverses every tracked object
    while holding the GIL: with torch and Ultralytics imported (some 400,000 objects, none of them ever garbage)
    an automatic one, which a model's load sets off by its allocations, took 0.22-0.25 s here and stalled every
    stream (the largest gap of a live switch); after the freeze, 0.03 s. Called before a kind's first model loads
    and only while no model is loaded (a frozen object that later becomes cyclic garbage is never collected: no
    model is, only the imported libraries and the daemon's own long-lived parts). On the device's executor.
    Returns whether it froze."""
    new = [m for m in modules if m not in sys.modules]
    if not new:
        return False
    try:
        for m in new:
            importlib.import_module(m)
    except ImportError:  # the loader says what is missing, with the way to install it
        return False
    gc.collect()
    gc.freeze()
    return True


def clear_task_frames(task: asyncio.Task[Any]) -> None:
    """Clear the frames a finished task's exception holds. A cancelled task's CancelledError and the frames it
    went through (an asyncio.TaskGroup's exit among them) refer to each other: a cycle that keeps the task's
    frames, and what they hold (a model's batcher, its model), until a full collection (see `release`)."""
    if not task.done():
        return
    if task.cancelled():
        try:
            task.exception()
        except asyncio.CancelledError as e:  # the exception the task was cancelled with, its traceback kept
            traceback.clear_frames(e.__traceback__)
        return
    exc = task.exception()
    if exc is not None:
        traceback.clear_frames(exc.__traceback__)


def measure_load(load: Any, device: str) -> tuple[Any, Footprint]:
    """Run `load()` (on the device's executor) and measure what the loaded model holds."""
    trim_heap()
    rss0, cuda0 = rss_bytes(), cuda_allocated(device)
    loaded = load()
    trim_heap()
    rss1, cuda1 = rss_bytes(), cuda_allocated(device)
    if device.startswith("cuda") and cuda1 > cuda0:
        return loaded, Footprint(cuda1 - cuda0, "cuda_allocator", rss1 - rss0)
    return loaded, Footprint(tensor_bytes(loaded), "tensor_bytes", rss1 - rss0)


def device_total_bytes(device: str) -> int | None:
    """A device's memory: a GPU's total (torch), the host's RAM or its cgroup limit for `cpu`; None if unknown."""
    if device == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:
            with open("/sys/fs/cgroup/memory.max") as f:
                raw = f.read().strip()
            if raw.isdigit():
                total = min(total, int(raw))
        except OSError:
            pass
        return total
    if device.startswith("cuda"):
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def budget_bytes(budget: int | float | None, device: str) -> int | None:
    """A configured budget in bytes: bytes as they are, a fraction of the device's memory; None = no budget."""
    if budget is None:
        return None
    if isinstance(budget, int):
        return budget
    total = device_total_bytes(device)
    return None if total is None else int(total * budget)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

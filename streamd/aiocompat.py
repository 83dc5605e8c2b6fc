"""asyncio fixes the daemon installs on the Python versions that need them.

`asyncio.wait_for` before Python 3.12 can swallow a cancellation: when the awaited operation finishes in the same
loop iteration as the task waiting for it is cancelled, it returns the result and the task goes on as if it had never
been cancelled (CPython gh-86296, fixed in 3.12 by rewriting `wait_for` on `asyncio.timeout`). redis-py wraps every
command's write in `asyncio.wait_for(..., socket_timeout)`, so a task cancelled while it talks to Redis (every loop
the daemon cancels when it stops: the fleet's, the jobs', the prompts' followers) lost its cancellation about one time
in five under load and ran on: a stop that hung until its grace ran out (seen in CI and in the fleet tests). Python
3.12's `wait_for` is installed in its place on older versions (process-wide: every caller of `asyncio.wait_for`,
ours and our libraries', gets 3.12's behaviour)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

_original = asyncio.wait_for


async def wait_for(fut: Any, timeout: float | None) -> Any:
    """Python 3.12's `asyncio.wait_for` (Lib/asyncio/tasks.py), on `asyncio.timeout` (3.11+)."""
    if timeout is not None and timeout <= 0:
        fut = asyncio.ensure_future(fut)
        if fut.done():
            return fut.result()
        await asyncio.tasks._cancel_and_wait(fut, loop=asyncio.get_running_loop())  # type: ignore[attr-defined]
        try:
            return fut.result()
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await fut


def fix_wait_for() -> bool:
    """Installs `wait_for` as `asyncio.wait_for` where Python's own swallows cancellations (before 3.12); True when
    it is (now or already) installed. `STREAMD_ASYNCIO_FIX=0` leaves Python's own."""
    import os

    if sys.version_info >= (3, 12) or os.environ.get("STREAMD_ASYNCIO_FIX", "1") == "0":
        return False
    asyncio.wait_for = wait_for
    asyncio.tasks.wait_for = wait_for
    return True


__all__ = ["fix_wait_for", "wait_for"]

"""Running a real daemon in tests and benchmarks.

- `running(cfg)`: an async context manager, a real `Daemon` running in the current event loop, stopped and drained
  on exit. The daemon (and what it imports) is loaded on first use, not when this module is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamd.config import Config
    from streamd.daemon import Daemon

__all__ = ["running"]


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Daemon]:
    """A real daemon running in this event loop: `startup()`, `run()` as a task, yielded once `started` is set
    (within 10 s); on exit `stop` is set, the run drains (the config's `shutdown.grace_s`) and must end within
    30 s (else every task's stack is printed and TimeoutError raised), then `shutdown()` (always).

        async with running(cfg) as d:
            ...  # d.pipelines, d.streams.runners, d.redis_url
    """
    from streamd.daemon import Daemon  # the whole daemon only for those who run one

    d = Daemon(cfg)
    stop = asyncio.Event()
    await d.startup()
    task = asyncio.create_task(d.run(stop))
    try:
        await asyncio.wait_for(d.started.wait(), 10)
        yield d
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        except TimeoutError:
            for t in asyncio.all_tasks():
                t.print_stack(limit=6)
            raise
        finally:
            await d.shutdown()

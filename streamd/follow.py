"""Following a Redis record set through its change channel: the prompt cache (streamd.prompts) and the pipeline
versions (streamd.pipeline_versions) both keep every current record in memory, and learn of changes from a pub/sub
channel whose messages name the record that changed.

`ChangeFollower.run()`: subscribe, read everything (`refresh`), then read each record a message names
(`on_message`), and everything again every `refresh_s` (a message published while this daemon was not subscribed
is lost: the periodic read is what catches up). It survives Redis outages and bad records: the error is logged
(an outage once every `log_every_s`, however often it is retried), the subscription is made again a second later.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from redis.exceptions import RedisError

from streamd.log import RepeatedLog

__all__ = ["ChangeFollower"]


class ChangeFollower(ABC):
    channel: str = ""  # the change channel
    what: str = ""  # what follows it, in log lines ("prompt cache")

    def __init__(self, r: Any, log: Any, refresh_s: float = 5.0, log_every_s: float = 30.0):
        self._r = r
        self._log = log
        self.refresh_s = refresh_s
        self._outage = RepeatedLog(log, log_every_s)  # an outage is retried every second, logged far less often
        self.loaded = asyncio.Event()  # everything was read once
        self.tried = asyncio.Event()  # the first read is over: loaded, or Redis did not answer
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End `run()` within a second (redis-py's get_message can swallow a cancellation)."""
        self._stop.set()

    async def refresh(self) -> None:
        """Read every current record (then `loaded` and `tried` are set)."""
        await self.read_all()
        self.loaded.set()
        self.tried.set()

    @abstractmethod
    async def read_all(self) -> None:
        """Read every current record into memory."""

    @abstractmethod
    async def on_message(self, data: str) -> None:
        """A change message: read the record it names."""

    async def run(self) -> None:
        """Follow changes until stopped."""
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            pubsub = self._r.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self.refresh()
                self._outage.over(f"{self.what} has Redis back")
                last = loop.time()
                while not self._stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        if loop.time() - last >= self.refresh_s:
                            await self.refresh()
                            last = loop.time()
                        continue
                    await self.on_message(msg["data"].decode())
            except Exception as e:  # noqa: BLE001 - an outage, or anything else a record holds: never the daemon's end
                if isinstance(e, (RedisError, OSError)):
                    self._outage.warning(f"{self.what} lost Redis, retrying", error=str(e) or type(e).__name__)
                else:
                    self._log.warning(f"{self.what} could not be read, retrying", error=str(e) or type(e).__name__)
                self.tried.set()
                try:
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                except TimeoutError:
                    pass
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass

"""The HTTP control API (aiohttp): streams at run time, versioned prompts, pipelines and models, health,
Prometheus metrics, an OpenAPI document. Binds 127.0.0.1 unless told otherwise; tokens are required beyond it."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from streamd.api.app import build_app
from streamd.api.middleware import ApiRunner
from streamd.config import Config
from streamd.log import get_logger
from streamd.metrics import Metrics
from streamd.prompts import PromptStore
from streamd.streams.manager import StreamManager

log = get_logger("streamd.api")


class ApiServer:
    """The API embedded in the daemon's event loop (AppRunner + TCPSite)."""

    def __init__(self, streams: StreamManager, prompts: PromptStore, models: Any, metrics: Metrics, cfg: Config,
                 jobs: Any = None):
        self.app = build_app(streams, prompts, models, metrics, cfg.api, dict(os.environ), jobs)
        self.cfg = cfg.api
        self._runner: ApiRunner | None = None
        self.port = self.cfg.port

    @property
    def url(self) -> str:
        host = f"[{self.cfg.bind}]" if ":" in self.cfg.bind else self.cfg.bind
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._runner = ApiRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.bind, self.cfg.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("control API listening", url=self.url, tokens=len(self.cfg.tokens))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

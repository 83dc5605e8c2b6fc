"""The HTTP control API (aiohttp): streams at run time, versioned prompts, pipelines and models, health,
Prometheus metrics, an OpenAPI document. Binds 127.0.0.1 unless told otherwise; tokens are required beyond it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aiohttp import web

from streamd.api.app import ApiRunner, build_app
from streamd.config import ApiConfig
from streamd.log import get_logger

if TYPE_CHECKING:
    from streamd.daemon import Daemon

log = get_logger("streamd.api")


class ApiServer:
    """The API embedded in the daemon's event loop (AppRunner + TCPSite)."""

    def __init__(self, daemon: "Daemon", cfg: ApiConfig):
        self.app = build_app(daemon, cfg, dict(os.environ))
        self.cfg = cfg
        self._runner: ApiRunner | None = None
        self.port = cfg.port

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

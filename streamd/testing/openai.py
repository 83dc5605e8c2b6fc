"""Test kit for VLM backends: real OpenAI-compatible HTTP servers, no mocks.

- `ScriptedOpenAI`: answers from a function of the request (for logic that depends on what a model says).
- `FaultProxy`: a reverse proxy in front of a real server (e.g. `transformers serve`) that injects faults
  (status codes with Retry-After, stalls) before passing requests through; `stop()` kills the endpoint.
- `TransformersServe`: `transformers serve <model>` on the CPU in a child process (a real server to proxy).
- `prompt_text`, `request_images`: what a chat-completions request asked, and the sizes of the images it sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

from streamd.redis_server import free_port


class _Server:
    """An aiohttp server on 127.0.0.1 in the caller's event loop; subclasses add their routes."""

    port: int
    _runner: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: Any) -> None:
        raise NotImplementedError

    async def start(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class ScriptedOpenAI(_Server):
    """A real OpenAI-compatible HTTP server (aiohttp, in the caller's event loop) whose answers come from a
    function of the request: for tests of logic that depends on what a model says. `faults` is a list of
    (status, retry_after_s) answered before normal service; `delay_s` stalls every answer."""

    def __init__(self, answer: Any = None, port: int | None = None):
        self.answer = answer or (lambda req: "a scripted answer")
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.faults: list[tuple[int, float | None]] = []
        self.delay_s = 0.0
        self.structured = True  # False: answer 400 to requests with `response_format`, as some servers do
        self.refused = 0
        self._runner: Any = None

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        if self.faults:
            status, retry_after = self.faults.pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return web.json_response({"error": {"message": "injected", "type": "server_error"}}, status=status,
                                     headers=headers)
        if not self.structured and "response_format" in body:
            self.refused += 1
            return web.json_response({"error": {"message": "response_format is not supported",
                                                "type": "invalid_request_error"}}, status=400)
        self.requests.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.answer(body)
        if not isinstance(text, str):
            text = json.dumps(text)
        return web.json_response({
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10},
        })

    def routes(self, app: Any) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)


def prompt_text(request: dict[str, Any]) -> str:
    """The text part of the last user message of a chat request."""
    content = request["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")


def request_images(request: dict[str, Any]) -> list[tuple[int, int]]:
    """(width, height) of every image of the last user message, decoded from its data URI."""
    from PIL import Image

    content = request["messages"][-1]["content"]
    sizes = []
    for p in content if isinstance(content, list) else []:
        if p.get("type") == "image_url":
            raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
            sizes.append(Image.open(io.BytesIO(raw)).size)
    return sizes


class FaultProxy(_Server):
    """A real HTTP reverse proxy (aiohttp, in the caller's event loop) in front of `upstream`. Each entry of
    `faults` is used by one request, in order, before normal service: {"status": 503, "retry_after": 0.3}
    answers that status, {"stall_s": 5} holds the request that long and then passes it on. `seen` has the
    monotonic time and outcome of every request."""

    def __init__(self, upstream: str, port: int | None = None):
        self.upstream = upstream.rstrip("/")
        self.port = port or free_port()
        self.faults: list[dict[str, Any]] = []
        self.seen: list[tuple[float, str]] = []
        self._runner: Any = None
        self._session: Any = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        fault = self.faults.pop(0) if self.faults else {}
        if "status" in fault:
            self.seen.append((time.monotonic(), str(fault["status"])))
            headers = {"Retry-After": str(fault["retry_after"])} if fault.get("retry_after") is not None else {}
            return web.json_response({"error": {"message": "injected by FaultProxy", "type": "server_error"}},
                                     status=fault["status"], headers=headers)
        self.seen.append((time.monotonic(), "stall" if "stall_s" in fault else "pass"))
        if "stall_s" in fault:
            await asyncio.sleep(fault["stall_s"])
        path = request.path[len("/v1"):] if request.path.startswith("/v1") else request.path
        async with self._session.request(request.method, self.upstream + path, data=body,
                                         headers={"Content-Type": request.content_type}) as up:
            payload = await up.read()
            return web.Response(body=payload, status=up.status, content_type=up.content_type)

    def routes(self, app: Any) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def start(self) -> "FaultProxy":
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        return await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None


class TransformersServe:
    """A real OpenAI-compatible server: `transformers serve <model>` on the CPU, in a child process."""

    def __init__(self, model: str, home: str, port: int | None = None, threads: int = 1):
        self.model = model
        self.home = home
        self.port = port or free_port()
        self.threads = threads
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> "TransformersServe":
        import os
        import shutil
        import subprocess
        import sys
        import urllib.request
        from pathlib import Path

        from streamd.testing.servers import wait_for

        exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
        Path(self.home, "hub").mkdir(parents=True, exist_ok=True)  # /v1/models answers 500 without it
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": self.home, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen([exe, "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, timeout_s, 0.5, "transformers serve")
        return self

    def stop(self) -> None:
        import subprocess

        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

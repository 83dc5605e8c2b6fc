from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamd import keys
from streamd.config import parse_config
from streamd.log import setup_logging
from streamd.testing import ManagedRedis, make_pan_clip, running  # noqa: F401 - `running`: tests import it from here

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# detectors' ONNX exports (streamd.stages.onnx_runtime): kept in the checkout, not in the user's cache
os.environ.setdefault("STREAMD_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".streamd" / "cache"))
setup_logging("info", "console")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> ManagedRedis:
    srv = ManagedRedis(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
async def r(redis_server: ManagedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s at 30 fps, 640x360, a pan over a real photo."""
    return make_pan_clip(tmp_path_factory.mktemp("clips") / "pan.mp4", seconds=6, fps=30, size=(640, 360))


def make_config(redis_url: str, streams: list[dict[str, Any]], **extra: Any) -> Any:
    streams = [{"pipeline": "frame_info", **s} for s in streams]  # model-free unless a test names a pipeline
    data: dict[str, Any] = {"redis": {"url": redis_url, "retry_initial_s": 0.05, "retry_max_s": 0.5},
                            "shutdown": {"grace_s": 5}, "streams": streams}
    data.update(extra)
    return parse_config(data, environ={})


async def results(client: aioredis.Redis, stream_id: str) -> list[dict[str, Any]]:
    entries = await client.xrange(keys.results_key(stream_id))
    return [json.loads(f[b"record"]) for _, f in entries]


async def events(client: aioredis.Redis, stream_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    entries = await client.xrange(keys.events_key(stream_id))
    evs = [json.loads(f[b"event"]) for _, f in entries]
    return [e for e in evs if kind is None or e["type"] == kind]


async def until(cond: Any, timeout_s: float = 20.0, interval_s: float = 0.1, what: str = "condition") -> Any:
    """Poll an async (or plain) condition until it is truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = None
    while loop.time() < deadline:
        last = cond()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def states(evs: list[dict[str, Any]]) -> list[str]:
    return [e["to"] for e in evs if e["type"] == "state"]


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2.5-VL built offline (tokenizer trained locally)."""
    from streamd.tiny_vlm import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen25vl")


@pytest.fixture(scope="session")
def transformers_serve(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real OpenAI-compatible server (`transformers serve`) serving the tiny VLM on CPU."""
    from streamd.testing import TransformersServe

    srv = TransformersServe(str(tiny_vlm), str(tmp_path_factory.mktemp("hfhome"))).start()
    try:
        yield {"url": srv.url, "model": str(tiny_vlm), "proc": srv.proc}
    finally:
        srv.stop()

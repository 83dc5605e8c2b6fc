from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamd import keys
from streamd.config import parse_config
from streamd.log import setup_logging
from streamd.testing.daemon import running  # noqa: F401 - `running`: tests import it from here
from streamd.testing.media import make_pan_clip
from streamd.testing.servers import ManagedRedis

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


# -- the control API's test tokens and configuration (tests/test_api*.py) -------------------------------------------
ADMIN, OPER, READ = "admin-token-0123456789", "operate-token-0123456789", "read-token-0123456789abc"
TOKENS = [{"name": "alice", "token": ADMIN, "scopes": ["admin"]},
          {"name": "ops", "token": OPER, "scopes": ["operate"]},
          {"name": "viewer", "token": READ, "scopes": ["read"]}]
LOOPBACK_ALLOWED = {"allow": ["127.0.0.1/32", "::1/128", "localhost"]}  # the tests' own servers

# the person detector as a pipeline's first stage (tests/test_detect_track.py, tests/test_vlm_modes.py)
PERSON = [{"type": "detect", "model": "person", "labels": {"Normal": "person", "Fall": "person_fallen"},
           "conf": 0.35}]


def make_config(redis_url: str, streams: list[dict[str, Any]], **extra: Any) -> Any:
    streams = [{"pipeline": "frame_info", **s} for s in streams]  # model-free unless a test names a pipeline
    data: dict[str, Any] = {"redis": {"url": redis_url, "retry_initial_s": 0.05, "retry_max_s": 0.5},
                            "shutdown": {"grace_s": 5}, "streams": streams}
    data.update(extra)
    return parse_config(data, environ={})


def api_cfg(redis_url: str, streams: Any = (), pipelines: dict[str, Any] | None = None,
            egress: dict[str, Any] = LOOPBACK_ALLOWED, redis: dict[str, Any] | None = None, **api: Any) -> Any:
    """A config with the control API on a free port, the three test tokens and no rate limit to speak of."""
    return make_config(redis_url, list(streams), api={"enabled": True, "port": 0, "tokens": TOKENS,
                                                      "rate_limit_per_s": 10_000, "rate_limit_burst": 10_000,
                                                      **api}, egress=egress,
                       **({"pipelines": pipelines} if pipelines else {}), **({"redis": redis} if redis else {}))


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}



async def fleet_clean(r: aioredis.Redis, *sids: str, members: tuple[str, ...] = ("same",)) -> None:
    """Forgets what fleet tests leave in the shared Redis: API streams, members (these ids), the streams' keys."""
    from streamd import keys

    await r.delete(keys.API_STREAMS_KEY, keys.FLEET_MEMBERS_KEY, *(keys.fleet_member_key(m) for m in members))
    for sid in sids:
        await r.delete(keys.results_key(sid), keys.events_key(sid), keys.lease_key(sid), keys.lease_last_key(sid),
                       keys.stream_ended_key(sid))


async def api_call(s: Any, base: str, method: str, path: str, token: str = OPER, **kw: Any) -> tuple[int, Any]:
    """(status, JSON body or None for 204) of an API request under /api/v1."""
    async with s.request(method, base + "/api/v1" + path, headers=h(token), **kw) as resp:
        return resp.status, (await resp.json() if resp.status != 204 else None)

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


async def at_least(client: aioredis.Redis, stream_id: str, n: int) -> list[dict[str, Any]] | None:
    """The stream's results once there are at least `n` (None before): `await until(lambda: at_least(r, sid, n))`."""
    recs = await results(client, stream_id)
    return recs if len(recs) >= n else None


async def settled(client: aioredis.Redis, stream_id: str, quiet_s: float = 1.0) -> int:
    """The number of the stream's results once it has not changed for `quiet_s`."""
    n, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        m = len(await results(client, stream_id))
        if m != n:
            n, since = m, time.monotonic()
        await asyncio.sleep(0.1)
    return n


async def vlm_at_least(client: aioredis.Redis, stream_id: str, n: int) -> list[dict[str, Any]] | None:
    """The stream's VLM records once there are at least `n` (None before)."""
    recs = await vlm_records(client, stream_id)
    return recs if len(recs) >= n else None


async def vlm_records(client: aioredis.Redis, stream_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"record"]) for _, f in await client.xrange(keys.vlm_key(stream_id))]


def vlm_pipeline(*urls: str, fallback: str | None = None, model: str = "scripted", **opts: Any) -> dict[str, Any]:
    """frame_info, then a VLM stage asking the given endpoints (and a fallback)."""
    eps = [{"url": u} for u in urls] + ([{"url": fallback, "fallback": True}] if fallback else [])
    return {"stages": [{"type": "frame_info"},
                       {"type": "vlm", "model": model, "endpoints": eps, **opts}]}


def states(evs: list[dict[str, Any]]) -> list[str]:
    return [e["to"] for e in evs if e["type"] == "state"]


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2.5-VL built offline (tokenizer trained locally)."""
    from streamd.testing.tiny_vlm import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen25vl")


@pytest.fixture(scope="session")
def transformers_serve(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real OpenAI-compatible server (`transformers serve`) serving the tiny VLM on CPU."""
    from streamd.testing.openai import TransformersServe

    srv = TransformersServe(str(tiny_vlm), str(tmp_path_factory.mktemp("hfhome"))).start()
    try:
        yield {"url": srv.url, "model": str(tiny_vlm), "proc": srv.proc}
    finally:
        srv.stop()

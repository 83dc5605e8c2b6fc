"""Redis clients: one per role, each with a pool of its own."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def redis_client(url: str, max_connections: int | None = None, wait_s: float = 2.0) -> aioredis.Redis:
    """A client with a pool of its own (one per role: the API and prompt store, Redis inputs, the prompt cache; the
    sink has its own connection), so that one role cannot starve the others. `max_connections`: a blocking pool
    that waits up to `wait_s` for a free connection (then redis_unavailable / busy); None: unbounded (Redis
    inputs hold one connection each while XREADGROUP blocks). A command that meets a dead connection (Redis was
    restarted) is retried once on a new one."""
    opts: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 15,
                            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
                            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
    if max_connections is None:
        pool = aioredis.ConnectionPool.from_url(url, max_connections=2**31, **opts)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait_s, **opts)
    return aioredis.Redis.from_pool(pool)  # the client owns its pool: closing it closes the pool

"""Redis clients: one per role, each with a pool of its own; a Redis Cluster client when `redis.cluster` is set."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

UNBOUNDED = 2**31  # "no limit" for a pool (Redis inputs hold one connection each while XREADGROUP blocks)
CLUSTER_RETRIES = 3  # a cluster command is retried this often (a failover, a moved slot, a dead connection)


def redis_client(url: str, max_connections: int | None = None, wait_s: float = 2.0,
                 cluster: bool = False) -> aioredis.Redis | RedisCluster:
    """A client with a pool of its own (one per role: the API and prompt store, Redis inputs, the prompt cache; the
    sink has its own connection), so that one role cannot starve the others. `max_connections`: a blocking pool
    that waits up to `wait_s` for a free connection (then redis_unavailable / busy); None: unbounded (Redis
    inputs hold one connection each while XREADGROUP blocks). A command that meets a dead connection (Redis was
    restarted) is retried once on a new one.

    `cluster`: a `redis.asyncio.RedisCluster` that finds the other masters from the one in `url` and sends each
    command to the master of its key's slot (pub/sub, Lua scripts, blocking XREADGROUP and single-slot MULTI/EXEC
    pipelines all work through it). Differences: `max_connections` is per master, and a master whose connections
    are all in use fails at once (`redis.exceptions.MaxConnectionsError`, a ConnectionError) instead of waiting
    `wait_s`; a command is retried up to CLUSTER_RETRIES times (failover, moved slots)."""
    opts: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 15,
                            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections or UNBOUNDED,
                                     retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), CLUSTER_RETRIES), **opts)
    opts["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), 1)
    if max_connections is None:
        pool = aioredis.ConnectionPool.from_url(url, max_connections=UNBOUNDED, **opts)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait_s, **opts)
    return aioredis.Redis.from_pool(pool)  # the client owns its pool: closing it closes the pool


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (multi-key commands must then stay within one slot)."""
    return isinstance(client, RedisCluster)

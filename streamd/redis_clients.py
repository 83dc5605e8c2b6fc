"""Redis clients: one per role, each with a pool of its own; a Redis Cluster client when `redis.cluster` is set.
Redis inputs on other servers connect through the stream egress policy (`PolicedConnection`)."""

from __future__ import annotations

import asyncio
import ipaddress
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from streamd.egress import StreamEgress

UNBOUNDED = 2**31  # "no limit" for a pool (Redis inputs hold one connection each while XREADGROUP blocks)
CLUSTER_RETRIES = 3  # a cluster command is retried this often (a failover, a moved slot, a dead connection)
_OTHER_SERVERS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # clients made with an egress policy (is_other_server)


class _Policed:
    """A connection that asks the egress policy for the server's address on every connect (the first and each
    reconnect) and connects to that checked address only: redis-py never resolves the name itself, so a name that
    answers differently later (DNS rebinding) cannot lead it elsewhere. TLS still names the host (SNI, and the
    certificate is verified against the name, not the address). A refusal raises the policy's EgressError (redis-py
    wraps it in a ConnectionError: `egress_error` finds it)."""

    def __init__(self, *, egress: "StreamEgress", **kwargs: Any):
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self._egress = egress
        self._pinned: str | None = None

    def _connection_arguments(self) -> Any:
        kw = dict(super()._connection_arguments())  # type: ignore[misc]
        if self._pinned is None:  # only _connect (below) connects; anything else is a redis-py change
            raise RuntimeError("a Redis input connection was attempted without its checked address")
        if kw.get("ssl") is not None:
            kw["server_hostname"] = self.host  # type: ignore[attr-defined]
        kw["host"] = self._pinned
        return kw

    async def _connect(self) -> None:
        host, port = self.host, self.port  # type: ignore[attr-defined]
        async with asyncio.timeout(self.socket_connect_timeout):  # type: ignore[attr-defined]
            addrs = await self._egress.resolve(host, port)
        last: OSError | None = None
        for ip in addrs:  # every one of them was checked
            self._pinned = str(ip)
            try:
                await super()._connect()  # type: ignore[misc]
            except OSError as e:
                last = e
                continue
            finally:
                self._pinned = None
            peer = self._writer.transport.get_extra_info("peername")  # type: ignore[attr-defined]
            if peer is None or ipaddress.ip_address(str(peer[0]).split("%", 1)[0]) != ip:
                self._writer.close()  # type: ignore[attr-defined]
                raise RuntimeError(f"connected to {peer!r}, not to the checked address {ip}")
            return
        assert last is not None
        raise last


class PolicedConnection(_Policed, Connection):
    pass


class PolicedSSLConnection(_Policed, SSLConnection):
    pass


def egress_error(exc: BaseException) -> Exception | None:
    """The egress policy's refusal behind a redis-py error (a policed connection's), if that is what it is."""
    from streamd.egress import EgressError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, EgressError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def redis_client(url: str, max_connections: int | None = None, wait_s: float = 2.0,
                 cluster: bool = False, egress: "StreamEgress | None" = None) -> aioredis.Redis | RedisCluster:
    """A client with a pool of its own (one per role: the API and prompt store, Redis inputs, the prompt cache; the
    sink has its own connection), so that one role cannot starve the others. `max_connections`: a blocking pool
    that waits up to `wait_s` for a free connection (then redis_unavailable / busy); None: unbounded (Redis
    inputs hold one connection each while XREADGROUP blocks). A command that meets a dead connection (Redis was
    restarted) is retried once on a new one.

    `cluster`: a `redis.asyncio.RedisCluster` that finds the other masters from the one in `url` and sends each
    command to the master of its key's slot (pub/sub, Lua scripts, blocking XREADGROUP and single-slot MULTI/EXEC
    pipelines all work through it). Differences: `max_connections` is per master, and a master whose connections
    are all in use fails at once (`redis.exceptions.MaxConnectionsError`, a ConnectionError) instead of waiting
    `wait_s`; a command is retried up to CLUSTER_RETRIES times (failover, moved slots).

    `egress`: every TCP connection (redis://, rediss://; a unix socket is not the network) resolves the server's
    host through that policy at connect time and connects to the checked address (`PolicedConnection`): Redis inputs
    on other servers. The daemon's own Redis (`redis.url`) is the operator's and is not given one."""
    opts: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 15,
                            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
    if cluster:
        if egress is not None:  # a cluster client connects to the nodes the server names: not for Redis inputs
            raise ValueError("a Redis input on another server is a single Redis")
        return RedisCluster.from_url(url, max_connections=max_connections or UNBOUNDED,
                                     retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), CLUSTER_RETRIES), **opts)
    opts["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), 1)
    if egress is not None:
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("redis", "rediss"):
            opts["connection_class"] = PolicedSSLConnection if scheme == "rediss" else PolicedConnection
            opts["egress"] = egress
    if max_connections is None:
        pool = aioredis.ConnectionPool.from_url(url, max_connections=UNBOUNDED, **opts)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait_s, **opts)
    client = aioredis.Redis.from_pool(pool)  # the client owns its pool: closing it closes the pool
    if egress is not None:
        _OTHER_SERVERS.add(client)
    return client


def is_other_server(client: Any) -> bool:
    """Whether `client` talks to another Redis server than the daemon's own (a Redis input's, made with an egress
    policy): its input entries are acknowledged on it, not in the MULTI/EXEC of their results (streamd.sinks.redis)."""
    return client in _OTHER_SERVERS


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (multi-key commands must then stay within one slot)."""
    return isinstance(client, RedisCluster)

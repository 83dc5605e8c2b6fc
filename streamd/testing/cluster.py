"""A real Redis Cluster for tests: N cluster-enabled redis-server processes on free loopback ports, joined by
`redis-cli --cluster create` (masters only, slots split evenly), ready when every node says `cluster_state:ok` and
knows every other. Each node is a `ManagedRedis` (the same watchdog: the servers stop when their owner dies).

    with ManagedRedisCluster(tmp_path) as cluster:
        client = redis.asyncio.RedisCluster.from_url(cluster.url)
        cluster.port_for(key)  # the master that serves a key's slot
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from streamd.redis_server import ManagedRedis, RedisServerError, free_port

BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        p = free_port()
        if p + BUS_OFFSET <= 65535 and _bindable(p + BUS_OFFSET):
            return p
    raise RedisServerError("no free port pair (port, port + 10000) found")


class ClusterNodeServer(ManagedRedis):
    """One redis-server with `cluster-enabled yes`, its nodes.conf in its own folder."""

    def __init__(self, data_dir: str | os.PathLike[str], node_timeout_ms: int = 2000, durable: bool = False):
        super().__init__(data_dir, port=free_node_port(), durable=durable)
        self.node_timeout_ms = node_timeout_ms

    def extra_args(self) -> list[str]:
        d = self.data_dir.resolve()
        return ["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms)]


class ManagedRedisCluster:
    """`durable`: every node writes an fsynced append-only file, so a node killed and started again
    (`nodes[i].stop(kill=True)`, `restart_node(i)`) comes back with its data and its slots."""

    def __init__(self, data_dir: str | os.PathLike[str], masters: int = 3, durable: bool = False):
        self.data_dir = Path(data_dir)
        self.nodes = [ClusterNodeServer(self.data_dir / f"node{i}", durable=durable) for i in range(masters)]

    @property
    def url(self) -> str:
        """A startup node's URL (a cluster client finds the others)."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self, timeout_s: float = 30.0) -> "ManagedRedisCluster":
        try:
            for n in self.nodes:
                n.start()
            self._create(timeout_s)
            self._wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def restart_node(self, i: int, timeout_s: float = 30.0) -> None:
        """Start node `i` again (same port, folder and nodes.conf: same id and slots); wait until the cluster is ok."""
        self.nodes[i].start()
        self._wait_ok(timeout_s)

    def _create(self, timeout_s: float) -> None:
        exe = shutil.which("redis-cli")
        if exe is None:
            raise RedisServerError("redis-cli is not installed (apt-get install redis-tools)")
        addrs = [f"127.0.0.1:{p}" for p in self.ports]
        done = subprocess.run([exe, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RedisServerError("redis-cli --cluster create failed: "
                                   + (done.stdout + done.stderr).decode(errors="replace")[-2000:])

    def _wait_ok(self, timeout_s: float) -> None:
        """Until every node reports cluster_state:ok, all 16384 slots assigned and every node known."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            ready = True
            for p in self.ports:
                try:
                    with redis.Redis(host="127.0.0.1", port=p, socket_timeout=2) as c:
                        last = {k: str(v) for k, v in c.cluster("INFO").items()}
                except redis.ConnectionError as e:
                    last = {"port": str(p), "error": str(e)}
                if (last.get("cluster_state") != "ok" or last.get("cluster_slots_ok") != "16384"
                        or last.get("cluster_known_nodes") != str(len(self.nodes))):
                    ready = False
                    break
            if ready:
                return
            time.sleep(0.05)
        raise RedisServerError(f"the cluster did not become ready within {timeout_s}s (last: {last})")

    def port_for(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        slot = key_slot(key.encode())
        with redis.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=2) as c:
            rows = c.execute_command("CLUSTER SLOTS")
        for row in rows:
            if int(row[0]) <= slot <= int(row[1]):
                return int(row[2][1])
        raise RedisServerError(f"slot {slot} is not served")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> "ManagedRedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Replicated Redis on 127.0.0.1 for tests and benchmarks: a Redis Cluster of masters with a
replica each (`redis-cli --cluster create`), and a master with a replica watched by three
sentinels. Every process is a `RedisServer` (see `servers.py`), stopped by its PID; data and
configuration files live under the given directory.

Failover is quick, for tests: a cluster node is judged failed after `node_timeout_ms`
(default 1000 ms), a sentinel judges the master down after `down_after_ms` (default 1000 ms).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from conveyor.testing.servers import RedisServer

CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on port + 10000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int], low: int = 30_000, high: int = 44_000) -> int:
    """A random port in [low, high) that is free, with its cluster bus port (+10000) free
    too, and neither among `taken`."""
    for _ in range(1000):
        port = random.randrange(low, high)
        bus = port + CLUSTER_BUS_OFFSET
        if taken & {port, bus} or not (_bindable(port) and _bindable(bus)):
            continue
        return port
    raise RuntimeError(f"no free port pair in {low}-{high}")


def _cli(*args: str, timeout_s: float = 30.0) -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli not found; install it (apt-get install redis-tools)")
    done = subprocess.run([binary, *args], capture_output=True, text=True, check=False,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def _info(port: int, *args: str) -> dict[str, str]:
    """`INFO`-like `key:value` lines of a redis-cli command, as a dict ({} if unanswered)."""
    try:
        out = _cli("-h", "127.0.0.1", "-p", str(port), *args, timeout_s=5)
    except (RuntimeError, subprocess.TimeoutExpired):
        return {}
    parts = (line.strip().partition(":") for line in out.splitlines())
    return {key: value for key, colon, value in parts if colon}


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


class ClusterServers:
    """`masters` masters with `replicas` replicas each, on random loopback ports whose bus
    ports are free too, joined into one Redis Cluster covering every slot."""

    def __init__(self, base_dir: Path, *, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1000) -> None:
        self.base_dir = base_dir
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for i in range(masters * (1 + replicas)):
            port = cluster_port(taken)
            taken |= {port, port + CLUSTER_BUS_OFFSET}
            self.nodes.append(RedisServer(base_dir / f"node-{i}", port, args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # a replica takes over however long it was cut off from its master
                "--cluster-replica-validity-factor", "0",
            ]))

    @property
    def url(self) -> str:
        """A URL naming one node; the cluster client discovers the rest."""
        return next(n for n in self.nodes if n.running).url

    def start(self, timeout_s: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        _cli("--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes", timeout_s=timeout_s)
        self.wait_healthy(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def roles(self) -> dict[int, str]:
        """Each running node's port and its role as it sees itself (`master`/`slave`)."""
        return {n.port: self._role(n.port) for n in self.nodes if n.running}

    @staticmethod
    def _role(port: int) -> str:
        try:
            return _cli("-h", "127.0.0.1", "-p", str(port), "ROLE", timeout_s=5).split()[0]
        except (RuntimeError, subprocess.TimeoutExpired, IndexError):
            return ""

    def master_of(self, key: str) -> int:
        """Port of the master that serves `key`'s slot now."""
        slot = int(_cli("-p", str(self._any_port()), "CLUSTER", "KEYSLOT", key).strip())
        for port, role in self.roles().items():
            if role != "master":
                continue
            for line in _cli("-p", str(port), "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for span in fields[8:]:
                    if span.startswith("["):
                        continue
                    lo, _, hi = span.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return port
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    def command_calls(self, command: str) -> int:
        """Calls of `command` (as INFO commandstats names it: `xreadgroup`,
        `command|getkeys`) served by the running nodes since they started."""
        total = 0
        for node in self.nodes:
            if node.running:
                stats = _info(node.port, "INFO", "commandstats").get(f"cmdstat_{command}", "")
                fields = dict(f.partition("=")[::2] for f in stats.split(","))
                total += int(fields.get("calls", 0))
        return total

    def _any_port(self) -> int:
        return next(n.port for n in self.nodes if n.running)

    def healthy(self) -> bool:
        """Every running node says the cluster is ok and knows every node, `masters` of the
        running nodes are masters, and every replica's link to its master is up."""
        running = [n for n in self.nodes if n.running]
        for node in running:
            info = _info(node.port, "CLUSTER", "INFO")
            if info.get("cluster_state") != "ok" or \
                    info.get("cluster_known_nodes") != str(len(self.nodes)):
                return False
        roles = {n.port: self._role(n.port) for n in running}
        if list(roles.values()).count("master") != self.masters:
            return False
        return all(_info(port, "INFO", "replication").get("master_link_status") == "up"
                   for port, role in roles.items() if role == "slave")

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        _wait(self.healthy, timeout_s, "cluster healthy")

    def kill(self, port: int) -> None:
        """SIGKILL one node (its replica takes over after the node timeout)."""
        self.node(port).stop(kill=True)

    def revive(self, port: int, timeout_s: float = 60.0) -> None:
        """Start a stopped node again (it rejoins, as a replica if it was replaced), and wait
        until the whole cluster is healthy."""
        node = self.node(port)
        if not node.running:
            node.start()
        self.wait_healthy(timeout_s)

    def wait_master(self, port: int, timeout_s: float = 30.0) -> None:
        """Wait until the node on `port` is a master (after a failover to it)."""
        _wait(lambda: self._role(port) == "master", timeout_s, f"node {port} a master")

    def replica_of(self, master_port: int) -> int:
        """Port of a running replica of the master on `master_port`."""
        for node in self.nodes:
            if node.running and node.port != master_port:
                info = _info(node.port, "INFO", "replication")
                if info.get("role") == "slave" and info.get("master_port") == str(master_port):
                    return node.port
        raise LookupError(f"no replica of {master_port}")


class SentinelServers:
    """A master, `replicas` replicas of it and `sentinels` sentinels (quorum: a majority)
    watching it as `master_name`."""

    def __init__(self, base_dir: Path, *, replicas: int = 1, sentinels: int = 3,
                 master_name: str = "conveyor", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000) -> None:
        self.base_dir = base_dir
        self.master_name = master_name
        self.master = RedisServer(base_dir / "master")
        self.replicas = [
            RedisServer(base_dir / f"replica-{i}",
                        args=["--replicaof", "127.0.0.1", str(self.master.port)])
            for i in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels: list[RedisServer] = []
        for i in range(sentinels):
            directory = base_dir / f"sentinel-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "sentinel.conf"
            config.write_text(
                f"sentinel monitor {master_name} 127.0.0.1 {self.master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            self.sentinels.append(RedisServer(directory, config_file=config,
                                              args=["--sentinel"]))

    @property
    def addresses(self) -> list[str]:
        """`host:port` of every sentinel, as CONVEYOR_REDIS_SENTINELS takes them."""
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def start(self, timeout_s: float = 60.0) -> None:
        for node in self.data_nodes:
            node.start()
        for sentinel in self.sentinels:
            sentinel.start()
        _wait(self.healthy, timeout_s, "sentinels ready")

    def stop(self) -> None:
        for server in (*self.sentinels, *self.data_nodes):
            server.stop()

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                out = _cli("-p", str(sentinel.port), "SENTINEL", "get-master-addr-by-name",
                           self.master_name, timeout_s=5).split()
                if len(out) == 2:
                    return int(out[1])
        return None

    def current_master(self) -> RedisServer:
        port = self.master_port()
        return next(n for n in self.data_nodes if n.port == port)

    def healthy(self) -> bool:
        """Every sentinel knows the master, its replicas and the other sentinels, and every
        replica's link to the master is up."""
        port = self.master_port()
        if port is None:
            return False
        for sentinel in self.sentinels:
            lines = _cli_lines(sentinel.port, "SENTINEL", "master", self.master_name)
            fields = dict(zip(lines[::2], lines[1::2], strict=False))
            if fields.get("port") != str(port) or "s_down" in fields.get("flags", "") or \
                    fields.get("num-slaves") != str(len(self.replicas)) or \
                    fields.get("num-other-sentinels") != str(len(self.sentinels) - 1):
                return False
        replicas = [n for n in self.data_nodes if n.port != port and n.running]
        return all(_info(n.port, "INFO", "replication").get("master_link_status") == "up"
                   for n in replicas)

    def wait_failed_over(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until the sentinels name a master other than `old_port`; its port."""
        _wait(lambda: self.master_port() not in (None, old_port), timeout_s, "failover")
        port = self.master_port()
        assert port is not None
        return port


def _cli_lines(port: int, *args: str) -> list[str]:
    try:
        return _cli("-p", str(port), *args, timeout_s=5).splitlines()
    except (RuntimeError, subprocess.TimeoutExpired):
        return []


@contextlib.contextmanager
def running_cluster(base_dir: Path, **options: int) -> Iterator[ClusterServers]:
    """A started `ClusterServers`, stopped at exit."""
    cluster = ClusterServers(base_dir, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

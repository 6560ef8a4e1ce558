"""Real Redis topologies on loopback ports, started by the tests that need them: a Redis Cluster of N masters
(in the clear or over TLS), and a primary with a replica watched by three Sentinels. Each server runs from
Debian's ``redis-server`` (Sentinel as ``redis-server --sentinel``) in a directory of its own, and is killed when
the topology is closed. Certificates for TLS are made with openssl (``make_certificates``)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

SENTINEL_SERVICE = "streamfold-primary"


def require_redis_server(*, tls: bool = False) -> None:
    """Skip without redis-server (and, with ``tls``, openssl to make certificates), except where a run must not
    skip (CI): there, fail."""
    tools = ("redis-server", "redis-cli", *(("openssl",) if tls else ()))
    if all(shutil.which(tool) for tool in tools):
        return
    message = f"{', '.join(tools)} are needed to start the Redis servers of this test"
    if os.environ.get("STREAMFOLD_REQUIRE_REDIS") or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port(*, bus: bool = False) -> int:
    """A port nothing listens on. ``bus``: one a cluster node can take, its bus port (10,000 higher) free too."""
    while True:
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", random.randrange(20_000, 55_000) if bus else 0))
                port = int(probe.getsockname()[1])
            if bus:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Server:
    """One redis-server (or Sentinel) process."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    certs: Path | None = None  # speaks only TLS, wanting a client certificate, with these (make_certificates)

    def client(self, **options: object) -> redis.Redis:
        if self.certs is not None:
            options = {**tls_options(self.certs), **options}
        return redis.Redis(port=self.port, socket_timeout=2, **options)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write - as a crashed host."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Topology:
    """Servers started together and stopped together."""

    root: Path
    servers: list[Server] = field(default_factory=list)

    def start(self, name: str, *options: str, config: Path | None = None, certs: Path | None = None) -> Server:
        port = free_port(bus="--cluster-enabled" in options)
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(port)]
        if certs is not None:  # TLS only: clients, the cluster bus, replication, Sentinels' own links
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs / "server.crt"),
                      "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
                      "--tls-auth-clients", "yes", "--tls-replication", "yes",
                      *(["--tls-cluster", "yes"] if "--cluster-enabled" in options else [])]
        process = subprocess.Popen(
            ["redis-server", *([str(config)] if config else []), *listen, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--logfile", "server.log", *options],
            cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = Server(port, directory, process, certs)
        self.servers.append(server)
        wait_for(lambda: bool(server.client().ping()), 10, f"redis-server {name} on port {port}")
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()


def start_cluster(root: Path, masters: int = 3, *, replicas: int = 0,
                  certs: Path | None = None) -> tuple[Topology, list[Server]]:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, every slot served, every replica
    synced; its nodes' servers (``ROLE`` tells which are masters). With ``certs``, every node and the cluster
    bus speak only TLS. A cluster that fails to form is stopped before the error leaves, so no server outlives
    it."""
    topology = Topology(root)
    try:
        nodes = [topology.start(f"node-{number}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                "--cluster-node-timeout", "2000",
                                # A replica may take over however long its master link was down: the tests
                                # are about the pipeline through a failover, not Redis's own safeguard.
                                "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0",
                                certs=certs)
                 for number in range(masters * (1 + replicas))]
        _form_cluster(nodes, replicas)
        # A replica promoted before its first sync would take over its master's slots empty.
        for node in nodes:
            wait_for(lambda node=node: node.client().execute_command("ROLE")[0] == b"master"
                     or node.client().info("replication").get("master_link_status") == "up", 30,
                     f"cluster replica {node.port} to sync")
    except BaseException:
        topology.close()
        raise
    return topology, nodes


def _form_cluster(nodes: list[Server], replicas: int = 0) -> None:
    masters = len(nodes) // (1 + replicas)
    if masters < 3:  # redis-cli --cluster create wants three masters at least: split the slots by hand
        for number, node in enumerate(nodes):
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 16384 * number // masters,
                                          16384 * (number + 1) // masters - 1)
            if number:
                nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
    else:
        certs = nodes[0].certs
        tls = [] if certs is None else ["--tls", "--cacert", str(certs / "ca.crt"), "--cert", str(certs / "client.crt"),
                                        "--key", str(certs / "client.key")]
        subprocess.run(["redis-cli", *tls, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
                        "--cluster-replicas", str(replicas), "--cluster-yes"], check=True, capture_output=True,
                       timeout=60)
    for node in nodes:
        wait_for(lambda node=node: node.client().cluster("info").get("cluster_state") == "ok", 30,
                 f"cluster node {node.port} to see every slot served")


def make_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA, in
    ``directory``: ca.crt, server.crt/.key, client.crt/.key."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=streamfold-test-ca")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", *extra)


def tls_options(certs: Path) -> dict[str, object]:
    """redis-py options for a client of a server started with ``certs``."""
    return {"ssl": True, "ssl_ca_certs": str(certs / "ca.crt"), "ssl_certfile": str(certs / "client.crt"),
            "ssl_keyfile": str(certs / "client.key")}


@dataclass
class SentinelGroup:
    """A primary, its replica and three Sentinels watching them as ``SENTINEL_SERVICE``."""

    topology: Topology
    primary: Server
    replica: Server
    sentinels: list[Server]

    @property
    def addresses(self) -> str:
        """``STREAMFOLD_REDIS_SENTINELS``: the Sentinels as host:port, comma-separated."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def primary_port(self) -> int:
        return int(self.sentinels[0].client().sentinel_get_master_addr_by_name(SENTINEL_SERVICE)[1])


def start_sentinel_group(root: Path, *, down_after_ms: int = 1500, certs: Path | None = None) -> SentinelGroup:
    """With ``certs``, the primary, the replica and the Sentinels speak only TLS, to clients and to each other."""
    topology = Topology(root)
    primary = topology.start("primary", certs=certs)
    replica = topology.start("replica", "--replicaof", "127.0.0.1", str(primary.port), certs=certs)
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 15,
             "the replica to sync")
    sentinels = []
    for number in range(3):
        directory = root / f"sentinel-{number}"
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "sentinel.conf"
        conf.write_text(f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary.port} 2\n"
                        f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {down_after_ms}\n"
                        f"sentinel failover-timeout {SENTINEL_SERVICE} 10000\n"
                        f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n")
        sentinels.append(topology.start(f"sentinel-{number}", "--sentinel", config=conf, certs=certs))
    group = SentinelGroup(topology, primary, replica, sentinels)
    wait_for(lambda: all(_other_sentinels(sentinel) == 2 for sentinel in sentinels), 20,
             "the Sentinels to find each other")
    return group


def _other_sentinels(sentinel: Server) -> int:
    return int(sentinel.client().sentinel_master(SENTINEL_SERVICE)["num-other-sentinels"])

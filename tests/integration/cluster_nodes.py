"""A real multi-node Ray cluster on this machine: a head and worker nodes, each a `ray start --block` process.

Every node gets its own CPUs, declared resources, temp folder and ports, and runs in its own process group (the
`ray start` process, its raylet and every worker it spawns), so a test can kill one node as a machine failure does
(SIGKILL to the group) and clean up only what it started. `ray stop` is never used: it stops every Ray on the
machine, other users' included.

Token authentication is on, as docs/cluster.md sets it up: RAY_AUTH_MODE=token on every node and client, and one
token per cluster (RAY_AUTH_TOKEN, so ~/.ray/auth_token is neither read nor written).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's ray, imm-ray and python
# Ports a node would otherwise take at fixed defaults (8265, 10001, 52365, ...), clashing with other clusters.
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
DRIVERS = Path(__file__).with_name("cluster_drivers.py")


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """A cluster with no nodes yet, stopped (every process it started) and its folder removed whatever happens."""
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="imr", dir="/tmp")))  # short: Ray's socket paths are bounded
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    """Ports free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: Path

    def actor_logs(self, class_name: str) -> set[Path]:
        """The stdout logs of the actors of ``class_name`` this node has started: Ray writes ``:actor_name:<class>``
        into a worker's log as the actor's constructor begins (read from the files: much faster than the state API,
        for a test that must act while a short stage runs)."""
        marker = f":actor_name:{class_name}"
        return {log for log in self.temp_dir.glob("session_*/logs/worker-*.out")
                if marker in log.read_text(errors="replace")}

    def kill(self) -> None:
        """The node fails: SIGKILL to its whole process group (ray start, raylet, its workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops the node's processes), SIGKILL to the group after 5 s (a node
        drains for up to 30 s otherwise, for nothing here)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # whatever outlived `ray start` in its group (a worker still exiting) goes too
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@dataclass
class LocalCluster:
    """Nodes started here; `env` is what a client (ray job submit, a driver) needs to reach the cluster."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: list[Node] = field(default_factory=list)
    gcs_address: str = ""
    dashboard_url: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.dashboard_url,
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

    def start_head(self, num_cpus: int, resources: str = "{}", tries: int = 3) -> Node:
        """The head with its dashboard (the job server); new ports and a new try if a port was taken meanwhile
        (free_ports only knows they were free a moment before)."""
        for attempt in range(tries):
            gcs, dashboard, client, *rest = free_ports(len(HEAD_PORTS) + len(NODE_PORTS) + 2)
            self.gcs_address = f"127.0.0.1:{gcs}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard}"
            args = ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", "--include-dashboard=true"]
            node = self._start("head" if attempt == 0 else f"head{attempt}", num_cpus, resources, args, rest)
            try:
                _wait_until(lambda: _http_ok(self.dashboard_url), 90, node, "the head's dashboard (job server)")
                return node
            except RuntimeError:
                self.nodes.remove(node)
                node.stop()
                if attempt == tries - 1:
                    raise RuntimeError(f"the head did not start:\n{self.logs()}") from None
        raise AssertionError("unreachable")

    def add_worker(self, num_cpus: int, resources: str = "{}") -> Node:
        ports = free_ports(len(NODE_PORTS) + 2)
        name = f"worker{len(self.nodes)}"
        before = self.alive_nodes()
        node = self._start(name, num_cpus, resources, [f"--address={self.gcs_address}",
                                                       "--node-ip-address=127.0.0.1"], ports)
        _wait_until(lambda: self.alive_nodes() > before, 90, node, f"{name} to join")
        return node

    def alive_nodes(self) -> int:
        out = subprocess.run([str(BIN / "ray"), "list", "nodes", f"--address={self.gcs_address}",
                              "--filter", "state=ALIVE", "--format=json"], env=self.env, capture_output=True,
                             text=True, timeout=60)
        return out.stdout.count('"node_id"') if out.returncode == 0 else -1

    def actors_on(self, node: Node, class_part: str) -> list[dict]:
        """ALIVE actors on ``node`` whose class name contains ``class_part`` (Ray's state API, through `ray list`)."""
        node_id = self._list("nodes", f"node_name={node.name}")[0]["node_id"]
        return [a for a in self._list("actors", "state=ALIVE", "--detail")
                if class_part in (a.get("class_name") or "") and a.get("node_id") == node_id]

    def tasks_on(self, node: Node, name_part: str) -> list[dict]:
        """RUNNING tasks on ``node`` whose name contains ``name_part`` (Ray's state API, through `ray list`)."""
        node_id = self._list("nodes", f"node_name={node.name}")[0]["node_id"]
        return [t for t in self._list("tasks", "state=RUNNING", "--detail")
                if name_part in (t.get("name") or "") and t.get("node_id") == node_id]

    def _list(self, kind: str, where: str, *flags: str) -> list[dict]:
        out = subprocess.run([str(BIN / "ray"), "list", kind, f"--address={self.gcs_address}", "--filter", where,
                              "--format=json", *flags], env=self.env, capture_output=True, text=True, timeout=60,
                             check=True)
        return json.loads(out.stdout) if out.stdout.lstrip().startswith("[") else []  # or "No resource in ..."

    def _start(self, name: str, num_cpus: int, resources: str, args: list[str], ports: list[int]) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        named = [f"--{flag}={port}" for flag, port in zip(NODE_PORTS, ports)]
        worker_ports = f"--min-worker-port={ports[-2]}", f"--max-worker-port={ports[-2] + 40}"
        command = [str(BIN / "ray"), "start", *args, f"--node-name={name}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                   f"--resources={resources}", f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
                   "--disable-usage-stats", "--block", *named, *worker_ports]
        log = open(self.root / f"{name}.log", "wb")
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=self.root)
        node = Node(name, process, temp_dir)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Workers first, then the head; every process group this cluster started is gone after."""
        for node in reversed(self.nodes):
            node.stop()

    def driver(self, kind: str, *args: str) -> subprocess.Popen:
        """Start ``cluster_drivers.py KIND ARGS`` as a driver of this cluster (RAY_ADDRESS: the GCS)."""
        log = open(self.root / f"driver-{kind}-{time.time():.3f}.log", "wb")
        return subprocess.Popen([sys.executable, str(DRIVERS), kind, *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, "RAY_ADDRESS": self.gcs_address})

    def finish(self, process: subprocess.Popen, timeout: float) -> None:
        """Wait for a driver; raise with its output and the nodes' if it failed or ran out of time."""
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if code != 0:
            drivers = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("driver-*.log")))
            raise AssertionError(f"driver {process.args[2:]} exited {code}\n{drivers}\n{self.logs()}")

    def logs(self) -> str:
        """The tail of each node's `ray start` output (for a failure message)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.root.glob("*.log")))


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/api/version", timeout=5):
            return True
    except urllib.error.HTTPError:  # 401 without a token: the server is up
        return True
    except OSError:
        return False


def _wait_until(condition, timeout: float, node: Node, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"`ray start` of {node.name} exited ({node.process.returncode}) waiting for {what}")
        if condition():
            return
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")

"""A local 3-node RabbitMQ cluster for tests (issue 21, T-REL-3): ``python -m devtools.rabbit_cluster``.

Three nodes of the installed ``rabbitmq-server``, run as the ``rabbitmq`` user, each with its own
node name (``ce-c5701@localhost`` ..., after its AMQP port), AMQP port, distribution port, data,
log and config files under one base directory. Nothing is shared with the machine's own node: its env file
(/etc/rabbitmq/rabbitmq-env.conf) is replaced by our own, the nodes cluster through
``classic_config`` peer discovery at first boot, so no ``rabbitmqctl reset``/``join_cluster`` is
ever run (a mistyped ``-n`` there could wipe the machine's node). Only the Erlang cookie of the
``rabbitmq`` user is shared, which lets ``rabbitmqctl -n ce-c5701@localhost`` reach our nodes.

    python -m devtools.rabbit_cluster start [--base DIR] [--port 5701]   # prints RABBITMQ_URL; Ctrl-C stops
    python -m devtools.rabbit_cluster status [--port 5701]

Needs root (the nodes run as ``rabbitmq`` through ``setpriv``). tests/test_cluster.py uses
:class:`Cluster` directly (T-REL-3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RABBITMQ_SERVER = os.environ.get("RABBITMQ_SERVER", "/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = os.environ.get("RABBITMQCTL", "rabbitmqctl")
RUN_AS = "rabbitmq"
NAME_PREFIX = "ce-c"  # never "rabbit": the machine's node is rabbit@localhost


def free_port_block(size: int = 3) -> int:
    """A first AMQP port p such that p..p+size-1 and the distribution ports p+100.. are all free."""
    for first in range(5701, 6500, 7):
        ports = [first + i for i in range(size)] + [first + 100 + i for i in range(size)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free port block for a local RabbitMQ cluster")


@dataclass
class Node:
    index: int
    port: int
    dist_port: int
    base: Path

    @property
    def name(self) -> str:
        # named after the AMQP port: two clusters on distinct ports (two test runs at once) never
        # share a node name
        return f"{NAME_PREFIX}{self.port}@localhost"

    @property
    def dir(self) -> Path:
        return self.base / f"n{self.index}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "node.pid"

    def url(self, vhost: str = "%2F") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"


class Cluster:
    def __init__(self, base: Path, first_port: int = 5701, size: int = 3) -> None:
        # the rabbitmq user must reach the directory: every parent needs o+x (pytest's tmp_path
        # does not have it); base itself is made 0755
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.base = base
        self.nodes = [Node(i, first_port + i - 1, first_port + 100 + i - 1, base) for i in range(1, size + 1)]
        self.procs: dict[int, subprocess.Popen] = {}

    def url(self, vhost: str = "%2F") -> str:
        """RABBITMQ_URL naming every node (R-SCALE-2)."""
        return ";".join(n.url(vhost) for n in self.nodes)

    # -- files -------------------------------------------------------------------------

    def _write_files(self, node: Node) -> None:
        for sub in ("mnesia", "log"):
            (node.dir / sub).mkdir(parents=True, exist_ok=True)
        peers = "\n".join(f"cluster_formation.classic_config.nodes.{n.index} = {n.name}" for n in self.nodes)
        (node.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{node.port}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"{peers}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (node.dir / "enabled_plugins").write_text("[].\n")
        (node.dir / "rabbitmq-env.conf").write_text(
            "# ours: the machine's /etc/rabbitmq/rabbitmq-env.conf is not read\n"
        )
        shutil.chown(node.dir, RUN_AS, RUN_AS)
        for path in node.dir.rglob("*"):
            shutil.chown(path, RUN_AS, RUN_AS)

    def _env(self, node: Node) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            "HOME": "/var/lib/rabbitmq",  # the rabbitmq user's Erlang cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(node.dir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.dir / "log"),
            "RABBITMQ_PID_FILE": str(node.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(node.dir / "erl_crash.dump"),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    # -- processes -----------------------------------------------------------------------

    def start_node(self, node: Node) -> None:
        self._write_files(node)
        cmd = ["setpriv", f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups", RABBITMQ_SERVER]
        out = open(node.dir / "stdout.log", "ab")
        self.procs[node.index] = subprocess.Popen(
            cmd, env=self._env(node), cwd=node.dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def await_node(self, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(node.index)
            if proc is not None and proc.poll() is not None:
                tail = (node.dir / "stdout.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{node.name} exited ({proc.returncode}):\n{tail}")
            done = subprocess.run(
                [RABBITMQCTL, "-n", node.name, "await_startup", "--timeout", "5"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"{node.name} did not start within {timeout}s (logs in {node.dir / 'log'})")

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self.await_node(node)

    def kill_node(self, node: Node) -> None:
        """kill -9 the node's Erlang VM (its process group)."""
        proc = self.procs[node.index]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        for node in self.nodes:
            proc = self.procs.pop(node.index, None)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

    def ctl(self, node: Node, *args: str) -> str:
        return subprocess.run(
            [RABBITMQCTL, "-n", node.name, *args], check=True, capture_output=True, text=True, timeout=60
        ).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.rabbit_cluster", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["start", "status"])
    p.add_argument("--base", type=Path, default=None, help="data directory (default: a new one under /tmp)")
    p.add_argument("--port", type=int, default=5701, help="AMQP port of the first node (the others follow)")
    args = p.parse_args(argv)
    base = args.base or Path(tempfile.mkdtemp(prefix="ce-rabbit-cluster-"))
    cluster = Cluster(base, args.port)
    if args.command == "status":
        print(cluster.ctl(cluster.nodes[0], "cluster_status"))
        return 0
    cluster.start()
    print(cluster.ctl(cluster.nodes[0], "cluster_status"))
    print(f"RABBITMQ_URL={cluster.url()}")
    print("Ctrl-C stops the three nodes.")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

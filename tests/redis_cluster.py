"""A real Redis Cluster on loopback for the remote tier's tests: three redis-server processes with
cluster mode on, joined by ``redis-cli --cluster create``, in a temporary directory.

No replicas (each node owns a third of the slots), no persistence (nothing is written but the nodes'
cluster config). ``scripts/setup.sh`` installs redis-server and redis-cli where they are missing; a
machine without them fails these tests with a message saying so, never skips them.

The fault tests use :meth:`LocalCluster.kill` (SIGKILL, a node crash), :meth:`pause` / :meth:`resume`
(SIGSTOP / SIGCONT: a node that stops answering, as behind a network partition) and ``maxmemory``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

#: how long the cluster may take to start (it takes under 2 s here)
START_TIMEOUT = 30.0


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """n ports P that are free, with their cluster bus ports P + 10000 free too."""
    out: list[int] = []
    rng = random.Random()
    while len(out) < n:
        p = rng.randrange(20000, 30000)
        if p not in out and _free(p) and _free(p + 10000):
            out.append(p)
    return out


def _ask(port: int, *words: str, timeout: float = 1.0) -> bytes:
    """One inline command to a node; its raw reply ("" when the node does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(" ".join(words).encode() + b"\r\n")
            data = b""
            while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2):
                more = s.recv(65536)
                if not more:
                    break
                data += more
            return data
    except OSError:
        return b""


def _until(what: str, ok, timeout: float = START_TIMEOUT) -> None:
    """Poll ``ok()`` with a back-off (5 ms doubling to 200 ms) until it is true."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis cluster: {what} within {timeout} s")
        time.sleep(delay)
        delay = min(0.2, delay * 2)


class LocalCluster:
    def __init__(self, root: Path, nodes: int = 3, maxmemory: str = "0") -> None:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                pytest.fail(f"{tool} is not installed: run `make setup` (scripts/setup.sh installs it)")
        self.root = root
        self.ports = _ports(nodes)
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for p in self.ports:
                d = root / f"node-{p}"
                d.mkdir(parents=True)
                conf = d / "redis.conf"
                conf.write_text(
                    f"port {p}\nbind 127.0.0.1\nprotected-mode no\ncluster-enabled yes\n"
                    f"cluster-config-file nodes.conf\ncluster-node-timeout 2000\ndir {d}\n"
                    f'save ""\nappendonly no\nmaxmemory {maxmemory}\nmaxmemory-policy noeviction\n'
                    f"logfile {d / 'redis.log'}\n"
                )
                self.procs.append(subprocess.Popen(["redis-server", str(conf)], stdin=subprocess.DEVNULL))
            for p in self.ports:
                _until(f"node {p} answers PING", lambda p=p: _ask(p, "PING").startswith(b"+PONG"))
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=START_TIMEOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
            for p in self.ports:
                _until(
                    f"node {p} reports cluster_state:ok",
                    lambda p=p: b"cluster_state:ok" in _ask(p, "CLUSTER", "INFO"),
                )
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The --remote value: every node as a seed."""
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node_of(self, key: str) -> int:
        """The index of the node that owns ``key``'s slot (asked of a node still running)."""
        port = next(p for p, proc in zip(self.ports, self.procs, strict=True) if proc.poll() is None)
        slot = int(_ask(port, "CLUSTER", "KEYSLOT", key).strip().lstrip(b":"))
        for row in _bulk(_ask(port, "CLUSTER", "NODES")).splitlines():
            f = row.split()  # id host:port@bus flags master ping pong epoch state slot-range...
            owner = int(f[1].split("@")[0].rsplit(":", 1)[1])
            for rng in f[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return self.ports.index(owner)
        raise LookupError(f"no node owns slot {slot}")

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def pause(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGCONT)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        for proc in self.procs:
            proc.wait()


def _bulk(reply: bytes) -> str:
    """The text of a bulk-string reply ($N\\r\\n...)."""
    head, _, rest = reply.partition(b"\r\n")
    return rest[: int(head[1:])].decode() if head.startswith(b"$") and head[1:].isdigit() else ""

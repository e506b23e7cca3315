"""Start a tierd process and wait until it is serving: for tests, benchmarks and the demo.

Readiness is the daemon's own sd_notify READY=1, received on a private datagram socket passed as
NOTIFY_SOCKET, exactly as systemd would see it: no polling, no sleeping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


class LaunchError(RuntimeError):
    """The daemon exited or stayed silent before READY; the message carries its stderr."""


class Daemon:
    """A running tierd: ``socket``, ``proc``; ``stop()`` sends SIGTERM and waits."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        socket_path: Path,
        notify: socket.socket,
        notify_dir: str,
        log_path: Path,
    ) -> None:
        self.proc = proc
        self.notify_dir = notify_dir
        self.socket = socket_path
        self.notify = notify
        self.log_path = log_path
        self.messages: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_message(self, prefix: str, timeout: float = 10.0) -> str:
        """The next sd_notify datagram containing a line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LaunchError(f"no {prefix!r} from tierd within {timeout}s; its log:\n{self.log()}")
            self.notify.settimeout(min(left, 0.25))
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise LaunchError(
                        f"tierd exited with {self.proc.returncode}; its log:\n{self.log()}"
                    ) from None
                continue
            self.messages.append(msg)
            if any(line.startswith(prefix) for line in msg.splitlines()):
                return msg

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup()
        return self.proc.returncode

    def _cleanup(self) -> None:
        self.notify.close()
        shutil.rmtree(self.notify_dir, ignore_errors=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._cleanup()


def start(
    socket_path: str | Path,
    *args: str,
    ram_bytes: str = "256MiB",
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    timeout: float = 60.0,
    prefix: Sequence[str] = (),
) -> Daemon:
    """Run ``tierd --socket PATH --ram-bytes SIZE *args`` and return once it says READY=1.

    ``socket_path=None`` / ``ram_bytes=None`` leave those settings to the daemon's defaults.
    """
    from tierd.paths import default_socket_path

    env_socket = (env or os.environ).get("TIERD_SOCKET")
    resolved = Path(socket_path) if socket_path else Path(env_socket) if env_socket else default_socket_path()
    ndir = tempfile.mkdtemp(prefix="tierd-notify-")
    npath = os.path.join(ndir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(npath)
    full_env = dict(os.environ if env is None else env)
    full_env["NOTIFY_SOCKET"] = npath
    full_env.pop("WATCHDOG_USEC", None)
    log = Path(log_path) if log_path else Path(ndir) / "tierd.log"
    cmd = [*prefix, sys.executable, "-m", "tierd"]
    if socket_path:
        cmd += ["--socket", str(socket_path)]
    if ram_bytes:
        cmd += ["--ram-bytes", ram_bytes]
    cmd += args
    try:
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                cmd, env=full_env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
    except BaseException:
        notify.close()
        shutil.rmtree(ndir, ignore_errors=True)
        raise
    d = Daemon(proc, resolved, notify, ndir, log)
    try:
        d.wait_message("READY=1", timeout)
    except BaseException:
        d.kill()
        raise
    return d


def serving_or_start(**kw: object) -> Daemon | None:
    """None when a tierd already answers on the default socket; else one started on its defaults
    (``kw`` go to :func:`start`), which the caller stops."""
    from tierd.paths import default_socket_path
    from tierd_client import Client, DaemonUnavailable

    try:
        Client().close()
    except DaemonUnavailable:
        print("starting tierd on its defaults (no flags, no config file)...", flush=True)
        d = start(None, ram_bytes=None, **kw)  # type: ignore[arg-type]
        print(f"tierd pid {d.pid} ready on {d.socket}; log: {d.log_path}", flush=True)
        return d
    print(f"using the tierd already serving {default_socket_path()}")
    return None

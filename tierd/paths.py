"""Default locations, shared by the daemon and its clients so both find the same socket."""

from __future__ import annotations

import os
import pwd
import socket
import struct
from pathlib import Path

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def default_socket_path() -> Path:
    """``$TIERD_SOCKET``, else ``$XDG_RUNTIME_DIR/tierd/tierd.sock``, else ``/tmp/tierd-$UID/tierd.sock``."""
    env = os.environ.get("TIERD_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "tierd" / "tierd.sock"
    return Path(f"/tmp/tierd-{os.getuid()}") / "tierd.sock"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's StateDirectory=), else ``~/.local/state/tierd``."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(env.split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "tierd"


def trusted_daemon_uids() -> set[int]:
    """The uids a client lets serve it: root, its own, and ``$TIERD_DAEMON_USER`` (a name or a uid:
    the user a system service runs tierd as, e.g. ``tierd``). ValueError for an unknown user."""
    uids = {0, os.getuid()}
    user = os.environ.get("TIERD_DAEMON_USER", "").strip()
    if user:
        uids.add(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
    return uids


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid

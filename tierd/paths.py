"""Default locations, shared by the daemon and its clients so both find the same socket."""

from __future__ import annotations

import os
from pathlib import Path


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

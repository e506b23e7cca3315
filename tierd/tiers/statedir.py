"""The disk tier's state directory: one daemon at a time, and an LMDB file that is the one it wrote.

What is refused at start, each with one line naming the path and what to do (exit status 2, as for
any environment the user must fix), never a traceback or a SIGBUS:

* a state directory that cannot be one (a file, a parent that is a file, not writable);
* a second daemon on the same directory, whatever its socket: ``tierd.lock`` is held with
  ``flock(LOCK_EX)`` for the daemon's life and names its pid. Two daemons would number versions from
  the same point and overwrite each other's records, losing acknowledged durable puts;
* an LMDB file that is not one (damaged meta pages: ``MDB_INVALID``);
* an LMDB file shorter than its own last page says (truncated): LMDB would open it and the first
  read past the end would kill the daemon with SIGBUS;
* an LMDB file that is missing or empty where this directory had one. ``tierd.lmdb.id`` holds an id
  that the LMDB file also holds (its ``info`` database), written when the file is created. A file
  that vanished or was emptied would otherwise start as an empty tier without a word, and a file
  swapped in from elsewhere would serve another daemon's entries. To start over on purpose, remove
  both files (or the whole directory).

A directory without the id file (made by an older tierd) gets one from the LMDB file's id, or a new
id for both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from pathlib import Path

import lmdb

from tierd.config import ConfigError

LOCK_NAME = "tierd.lock"
ID_SUFFIX = ".id"
_ID_KEY = b"id"


class StateError(ConfigError):
    """The state directory or its disk-tier file cannot be used as it is. Not recoverable by the
    daemon: the message says what the user must fix; nothing was changed."""


def _why(e: OSError) -> str:
    return e.strerror or str(e)


class StateDir:
    """A state directory held by this daemon (``close`` lets it go)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists() and not path.is_dir():
            raise StateError(f"state directory {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(f"state directory {path}: cannot create it ({_why(e)})") from None
        lock = path / LOCK_NAME
        try:
            self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"state directory {path}: cannot write {LOCK_NAME} ({_why(e)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(
                    f"state directory {path} is in use by another tierd (pid {holder}): give this one "
                    "its own --state-dir, or stop that one"
                ) from None
            raise StateError(f"state directory {path}: cannot lock {LOCK_NAME} ({_why(e)})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        try:  # a read-only directory: find out now, not at the first durable put
            probe = path / f".tierd-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            self.close()
            raise StateError(f"state directory {path} is not writable ({_why(e)})") from None

    def before_open(self, file: Path) -> None:
        """Refuse a missing or empty LMDB file where the id file says this directory had one."""
        marker = file.with_name(file.name + ID_SUFFIX)
        if not marker.exists():
            return
        size = file.stat().st_size if file.exists() else None
        if size:
            return
        what = "is missing" if size is None else "is empty"
        raise StateError(
            f"{file} {what}, but this state directory held a disk tier there ({marker.name}): its "
            f"durable entries are gone. Restore the file, or remove {marker} to start with an empty tier"
        )

    def after_open(self, file: Path, env: lmdb.Environment, fd: int) -> None:
        """Refuse a truncated file or one from another directory; write the id on first use."""
        psize = env.stat()["psize"]
        need = (env.info()["last_pgno"] + 1) * psize
        have = os.fstat(fd).st_size
        if have < need:
            raise StateError(
                f"{file} is truncated: {have} bytes, but its last page ends at byte {need}. Restore it, "
                "or move it aside to start with an empty disk tier (its entries are then lost)"
            )
        info = env.open_db(b"info")
        marker = file.with_name(file.name + ID_SUFFIX)
        with env.begin(db=info, write=True) as txn:
            stored = txn.get(_ID_KEY)
            if stored is None:
                stored = secrets.token_hex(16).encode()
                txn.put(_ID_KEY, stored)
        ident = stored.decode()
        if marker.exists():
            expected = marker.read_text().strip()
            if expected != ident:
                raise StateError(
                    f"{file} is not the disk tier this state directory had (id {ident}, expected "
                    f"{expected} from {marker.name}): put the right file back, or remove {marker} to "
                    "adopt this one"
                )
            return
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(ident + "\n")
        os.replace(tmp, marker)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # the lock goes with it
            self._fd = -1

"""A raw connection to a real tierd, for the chaos suite: frames out exactly as given (well-formed or
not), replies read through the project's own frame reader, arena fds received and closed at once."""

from __future__ import annotations

import array
import os
import select
import socket
import time
from pathlib import Path

from tierd import protocol

#: seconds a reply may take before the suite calls the daemon hung (a finding, not a flake)
REPLY_TIMEOUT = 20.0


class Closed(Exception):
    """The daemon closed the connection (EOF or a reset)."""


class RawConn:
    """One connection: ``send(bytes)``, ``reply()`` (the next decoded reply), ``hello()``."""

    def __init__(self, path: Path, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.frames = protocol.FrameReader(protocol.MAX_REPLY_BYTES)
        self.sent_frames = 0

    def send(self, data: bytes, frames: int = 1) -> None:
        """Send all of ``data``, reading replies meanwhile (kept for :meth:`reply`): a daemon that
        stops reading until its replies are read (its pending-reply cap) is not a deadlock."""
        view, deadline = memoryview(data), time.monotonic() + self.timeout
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(view)} bytes not taken by the daemon in {self.timeout:.0f} s")
            readable, writable, _ = select.select([self.sock], [self.sock], [], left)
            if readable:
                self.frames.feed(self._recv())
            if writable:
                try:
                    n = self.sock.send(view[: 1 << 20], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    raise Closed from None
                view = view[n:]
        self.sent_frames += frames

    def hello(self, name: str = "chaos") -> protocol.Welcome:
        r = self.try_hello(name)
        assert isinstance(r, protocol.Welcome), r
        return r

    def try_hello(self, name: str = "chaos") -> protocol.Msg:
        """HELLO, and the answer: a Welcome, or the refusal (an Error) of a full daemon."""
        self.send(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, os.getpid(), name)))
        return self.reply()

    def _recv(self) -> bytes:
        fds = array.array("i")
        try:
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * fds.itemsize))
        except ConnectionResetError:
            raise Closed from None
        for level, kind, blob in anc:  # an arena fd (sent with WELCOME): not mapped here, closed
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        if not data:
            raise Closed
        return data

    def reply(self) -> protocol.Msg:
        """The next reply (raises Closed at EOF, TimeoutError when none comes)."""
        while (frame := self.frames.next_frame()) is None:
            self.frames.feed(self._recv())
        return protocol.decode_reply(*frame)

    def closes(self) -> list[protocol.Msg]:
        """Read until the daemon closes; the replies seen before the close."""
        out = []
        while True:
            try:
                out.append(self.reply())
            except Closed:
                return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

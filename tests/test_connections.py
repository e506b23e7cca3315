"""Many connections: past max_connections a client is refused with the daemon's reason (not a broken
pipe), and a daemon out of file descriptors keeps serving the connections it has, keeps its
background checks alive and accepts again once descriptors free up. Real daemons, real sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_until
from tierd import launch, protocol
from tierd_client import Client, DaemonUnavailable


def test_one_connection_past_the_cap_is_refused_with_the_reason(short_tmp: Path) -> None:
    d = launch.start(short_tmp / "d.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     "--max-connections", "3", ram_bytes="16MiB", log_path=short_tmp / "d.log")  # fmt: skip
    try:
        held = [Client(d.socket) for _ in range(3)]
        held[0].put("t/x", torch.arange(10.0))
        with pytest.raises(DaemonUnavailable, match="at most 3 connections") as err:
            Client(d.socket)
        assert "Broken pipe" not in str(err.value)
        assert torch.equal(held[1].get("t/x"), torch.arange(10.0))  # the others go on
        held.pop().close()
        with Client(d.socket) as c:  # a slot is free again
            assert torch.equal(c.get("t/x"), torch.arange(10.0))
        for c in held:
            c.close()
    finally:
        assert d.stop() == 0


def test_out_of_file_descriptors_the_daemon_lives_and_recovers(short_tmp: Path) -> None:
    """The daemon runs with 64 descriptors (soft = hard); 150 idle connections would use them all.
    Connections that would leave fewer than FD_SPARE free are refused with a reason, at once, so
    accepting never runs the daemon out: its own files (the pressure check, the machine report)
    keep working, and new clients are served once the flood closes."""
    d = launch.start(short_tmp / "d.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     ram_bytes="16MiB", log_path=short_tmp / "d.log",
                     prefix=["prlimit", "--nofile=64:64"])  # fmt: skip
    flood: list[socket.socket] = []
    try:
        c = Client(d.socket)
        c.put("t/x", torch.arange(10.0))
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(d.socket))
            except OSError:
                s.close()
                break
            flood.append(s)
        wait_until(lambda: "file descriptors free" in d.log(), timeout=30, what="a refusal for descriptors")
        reply = _reply(flood[-1])  # the last one was refused, and told why
        assert isinstance(reply, protocol.Error) and "file descriptors" in reply.message, reply
        assert d.proc.poll() is None
        assert torch.equal(c.get("t/x"), torch.arange(10.0))  # an open connection is served
        for s in flood:
            s.close()
        flood.clear()
        wait_until(lambda: _serves(d.socket), timeout=30, what="a new connection to be served")
        wait_until(lambda: "machine:" in d.log(), timeout=30, what="the machine report")
        log = d.log()
        # nothing ran out: no check skipped, no error in a callback, no background task lost
        assert "skipped" not in log and "Traceback" not in log and "task failed" not in log, log[-3000:]
        assert d.proc.poll() is None
        c.close()
    finally:
        for s in flood:
            s.close()
        assert d.stop() == 0, d.log()


def _serves(path: Path) -> bool:
    try:
        with Client(path, timeout=5) as c:
            return bool(torch.equal(c.get("t/x"), torch.arange(10.0)))
    except DaemonUnavailable:
        return False


def _hello(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, os.getpid(), "raw")))
    _, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4))
    for _lvl, _kind, fds in anc:  # the arena fd: not used here
        os.close(struct.unpack("i", fds[:4])[0])
    return s


def _reply(s: socket.socket) -> protocol.Msg | None:
    r = protocol.FrameReader(protocol.MAX_REPLY_BYTES)
    while (frame := r.next_frame()) is None:
        data = s.recv(1 << 16)
        if not data:
            return None
        r.feed(data)
    return protocol.decode_reply(*frame)


def test_unfinished_requests_of_all_connections_together_are_capped(short_tmp: Path) -> None:
    """max_partial_frame_bytes 24 MiB: one 15 MiB unfinished request fits, a second of 12 MiB does
    not (its connection gets the reason and is closed), the first finishes and is answered, and then
    the second fits. A well-behaved client is served throughout."""
    d = launch.start(short_tmp / "d.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     "--max-partial-frame-bytes", "24MiB", ram_bytes="16MiB",
                     log_path=short_tmp / "d.log")  # fmt: skip
    try:
        a, b = _hello(d.socket), _hello(d.socket)
        body_a = b"\xc1" * (15 << 20)  # not msgpack: once whole, an invalid-request answer
        a.sendall(protocol.HEADER.pack(len(body_a), protocol.STATUS) + body_a[:-1])
        with Client(d.socket) as c:  # a round trip: the daemon has read a's bytes
            c.put("t/x", torch.arange(10.0))
        body_b = b"\xc1" * (12 << 20)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed while sending
            b.sendall(protocol.HEADER.pack(len(body_b), protocol.STATUS) + body_b[:-1])
        r = _reply(b)
        assert isinstance(r, protocol.Error) and "max_partial_frame_bytes" in r.message, r
        assert _reply(b) is None  # and closed
        b.close()
        with Client(d.socket) as c:
            assert torch.equal(c.get("t/x"), torch.arange(10.0))
        a.sendall(body_a[-1:])
        r = _reply(a)
        assert isinstance(r, protocol.Error) and r.code == "invalid", r  # the frame was taken whole
        b = _hello(d.socket)  # room again: a second 12 MiB request is read whole and answered
        b.sendall(protocol.HEADER.pack(len(body_b), protocol.STATUS) + body_b)
        r = _reply(b)
        assert isinstance(r, protocol.Error) and r.code == "invalid", r
        a.close()
        b.close()
    finally:
        assert d.stop() == 0, d.log()

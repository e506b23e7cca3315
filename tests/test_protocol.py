"""Bad input on the wire, against a real daemon: typed errors or a closed connection, nothing else.

After each abuse the daemon must still serve a well-behaved client, and no entry may have changed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
import torch

from tierd import protocol
from tierd.alloc import round_up
from tierd.launch import Daemon
from tierd.protocol import HEADER
from tierd_client import Client

_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets():
    yield
    while _OPEN:
        _OPEN.pop().close()


def raw(path: Path, hello: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _OPEN.append(s)
    s.settimeout(10)
    s.connect(str(path))
    if hello:
        s.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, os.getpid(), "raw")))
        data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4))
        for _lvl, _kind, fds in anc:  # close the arena fd we do not use
            for fd in struct.unpack(f"{len(fds) // 4}i", fds[: len(fds) // 4 * 4]):
                os.close(fd)
        length, mtype = HEADER.unpack_from(data)
        assert mtype == protocol.WELCOME and len(data) == 5 + length
    return s


def read_reply(s: socket.socket) -> protocol.Msg | None:
    """The next reply, or None when the daemon closed the connection."""
    head = b""
    while len(head) < 5:
        chunk = s.recv(5 - len(head))
        if not chunk:
            return None
        head += chunk
    length, mtype = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        assert chunk, "connection closed mid-reply"
        body += chunk
    return protocol.decode_reply(mtype, body)


def closed(s: socket.socket) -> bool:
    """True when the daemon has closed (any error frame before EOF is allowed)."""
    while True:
        try:
            r = read_reply(s)
        except ConnectionResetError:
            return True
        if r is None:
            return True
        assert isinstance(r, protocol.Error)


@pytest.fixture
def seeded(daemon: Daemon) -> tuple[Daemon, torch.Tensor]:
    x = torch.arange(1000, dtype=torch.float32)
    with Client(daemon.socket) as c:
        c.put("ns/keep", x)
    return daemon, x


def still_serving(d: Daemon, x: torch.Tensor) -> None:
    with Client(d.socket) as c:
        t = c.get("ns/keep")
        assert torch.equal(t, x)
        assert [e["key"] for e in c.ls()] == ["ns/keep"]
        assert c.stats()["leases"] == 1
    assert d.proc.poll() is None


def frame(mtype: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), mtype) + payload


def test_unknown_type_gets_typed_error_and_connection_lives(seeded) -> None:
    d, x = seeded
    s = raw(d.socket)
    s.sendall(frame(0x7E, msgspec.msgpack.encode([5, "x"])))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "protocol" and "0x7e" in r.message
    s.sendall(protocol.encode(protocol.Status(9)))  # the stream is still in sync
    r = read_reply(s)
    assert isinstance(r, protocol.Ok) and r.rid == 9
    still_serving(d, x)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode([1, 2, 3]),  # wrong field types for Put
        msgspec.msgpack.encode({"rid": 1}),  # a map where an array is expected
        msgspec.msgpack.encode([7, "ns/x"]),  # required fields missing
        msgspec.msgpack.encode([7, "ns/x", "float32", "notashape", 16]),
        b"",
    ],
)
def test_malformed_payload_is_invalid(seeded, payload: bytes) -> None:
    d, x = seeded
    s = raw(d.socket)
    s.sendall(frame(protocol.PUT, payload))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "invalid"
    still_serving(d, x)


def test_rid_is_echoed_on_validation_error(seeded) -> None:
    d, _ = seeded
    s = raw(d.socket)
    s.sendall(frame(protocol.GET, msgspec.msgpack.encode([42, "not a list"])))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.rid == 42


@pytest.mark.parametrize("first", [True, False, -1, 2**63, 1.5, "7"])
def test_a_rid_that_is_not_a_request_id_is_answered_with_rid_0(seeded, first) -> None:
    """A malformed request whose first field is no valid rid (a bool, a negative or too large int,
    a float, a string) gets its typed error with rid 0: the reply still decodes (found by the
    chaos suite: a bool was echoed as msgpack true, which no client could read)."""
    d, x = seeded
    s = raw(d.socket)
    s.sendall(frame(protocol.SEAL, msgspec.msgpack.encode([first, "not a put id"])))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "invalid" and r.rid == 0, r
    still_serving(d, x)


def test_4gib_length_prefix_closes_connection(seeded) -> None:
    d, x = seeded
    s = raw(d.socket)
    s.sendall(struct.pack("<IB", 0xFFFFFFFF, protocol.PUT) + b"\x00" * 100)
    assert closed(s)
    still_serving(d, x)


def test_wrong_length_desyncs_then_is_cut_off(seeded) -> None:
    d, x = seeded
    s = raw(d.socket)
    body = msgspec.msgpack.encode([3])
    # claims 2 bytes more than it has: the daemon reads the next header's bytes as payload
    s.sendall(HEADER.pack(len(body) + 2, protocol.STATUS) + body + b"\xff\xff\xff\xff\xff\xff\xff")
    r = read_reply(s)
    assert isinstance(r, protocol.Error)
    still_serving(d, x)


def test_request_before_hello_closes(seeded) -> None:
    d, x = seeded
    s = raw(d.socket, hello=False)
    s.sendall(protocol.encode(protocol.Status(1)))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and "HELLO" in r.message
    assert closed(s)
    still_serving(d, x)


def test_version_mismatch_is_refused_clearly(seeded) -> None:
    d, x = seeded
    s = raw(d.socket, hello=False)
    s.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION + 1, os.getpid(), "future")))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "version"
    assert f"v{protocol.PROTOCOL_VERSION + 1}" in r.message and f"v{protocol.PROTOCOL_VERSION}" in r.message
    assert closed(s)
    still_serving(d, x)


def test_second_hello_is_an_error(seeded) -> None:
    d, _ = seeded
    s = raw(d.socket)
    s.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, 1, "again")))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "protocol"


def test_garbage_stream_then_close(seeded, seed: int) -> None:
    import random

    d, x = seeded
    rng = random.Random(seed)
    for _ in range(20):
        s = raw(d.socket, hello=rng.random() < 0.5)
        s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        s.close()
    still_serving(d, x)


def test_half_frame_then_death(seeded) -> None:
    d, x = seeded
    code = textwrap.dedent(f"""
        import os, socket, struct, sys
        from tierd import protocol
        s = socket.socket(socket.AF_UNIX); s.connect({str(d.socket)!r})
        s.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, os.getpid(), "half")))
        s.recvmsg(4096, socket.CMSG_SPACE(4))
        f = protocol.encode(protocol.Put(1, "ns/half", "float32", [1024], 4096))
        s.sendall(f[: len(f) // 2])
        print("sent", flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"sent\n"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    still_serving(d, x)
    with Client(d.socket) as c:
        assert c.stats()["tiers"][0]["used_bytes"] == round_up(4000)  # only ns/keep (4000 B, aligned)


def test_put_larger_than_tier_is_tier_full(seeded) -> None:
    d, x = seeded
    from tierd_client import TierFull

    with Client(d.socket) as c, pytest.raises(TierFull) as ei:
        c.put("ns/huge", torch.empty(128 << 20, dtype=torch.uint8))
    assert ei.value.details["tier"] == "ram"
    assert ei.value.details["requested_bytes"] == 128 << 20
    assert ei.value.details["free_bytes"] < 64 << 20
    still_serving(d, x)


def test_release_of_unheld_lease_changes_nothing(seeded) -> None:
    d, x = seeded
    with Client(d.socket) as holder:
        t = holder.get("ns/keep")
        s = raw(d.socket)
        s.sendall(protocol.encode(protocol.Release([1, 2, 3, 10**12])))  # not this connection's leases
        s.sendall(protocol.encode(protocol.Status(5)))
        r = read_reply(s)
        assert isinstance(r, protocol.Ok)
        assert r.value["leases"] == 1 and r.value["counters"]["bad_releases"] == 4
        assert torch.equal(t, x)
    still_serving(d, x)


def test_seal_of_foreign_put_is_refused(seeded) -> None:
    d, x = seeded
    a, b = raw(d.socket), raw(d.socket)
    a.sendall(protocol.encode(protocol.Put(1, "ns/a", "uint8", [16], 16)))
    ready = read_reply(a)
    assert isinstance(ready, protocol.PutReady)
    b.sendall(protocol.encode(protocol.Seal(2, ready.put_id)))
    r = read_reply(b)
    assert isinstance(r, protocol.Error) and r.code == "invalid"
    a.close()  # a dies before sealing: its region is freed, nothing becomes visible
    still_serving(d, x)


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ([2**32, 2**32], 0),  # the element count overflows 64 bits
        ([2**62, 8], 2**64 - 1),  # so does the byte count
        ([0, 2**63], 0),  # a zero dim beside a dim no stride can address: 0 bytes, no valid view
        ([0, 2**40, 2**40], 0),
        ([2**61, 2], 0),  # float32: the outer stride is 2**63 bytes
    ],
)
def test_shapes_that_overflow_get_a_typed_error_and_nothing_leaks(seeded, shape, nbytes) -> None:
    """The reply is a typed error whose details can be encoded (the connection stays), and no
    reservation or lease is left behind."""
    d, x = seeded
    s = raw(d.socket)
    s.sendall(protocol.encode(protocol.Put(5, "ns/overflow", "float32", shape, nbytes)))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "invalid" and r.rid == 5, r
    s.sendall(protocol.encode(protocol.Status(6)))  # the stream is still in sync
    assert isinstance(read_reply(s), protocol.Ok)
    with Client(d.socket) as c:
        assert c.stats()["leases"] == 0 and "ns/overflow" not in {e["key"] for e in c.ls("ns/")}
    still_serving(d, x)


def test_a_client_that_never_reads_its_replies_cannot_grow_the_daemon(daemon) -> None:
    """Pipelined ls requests whose replies are never read: the daemon stops answering (and reading)
    once about 1 MiB of replies waits, instead of buffering every answer; others are served."""
    import psutil

    with Client(daemon.socket) as c:
        for i in range(300):  # an ls reply of ~60 KiB
            c.put(f"big/{i:04d}-" + "k" * 150, torch.zeros(1), tags=["t" * 40, "u" * 40])
    proc = psutil.Process(daemon.pid)
    before = proc.memory_info().rss
    s = raw(daemon.socket)
    s.settimeout(5)
    batch = protocol.encode(protocol.Ls(1, "big/")) * 2000  # 2000 requests in one write, ~30 KB
    sent = 0
    with contextlib.suppress(TimeoutError):
        for _ in range(3):  # 6000 answers of ~60 KiB each: 360 MB, were they all buffered
            s.sendall(batch)
            sent += 1
    still_serving_with(daemon)  # a round trip through the loop: what was read has been handled
    grown = proc.memory_info().rss - before
    assert grown < 64 << 20, f"the daemon grew by {grown >> 20} MiB for {sent} batches"
    first = read_reply(s)  # the stalled client can still read what it was answered
    assert isinstance(first, protocol.Ok) and first.rid == 1


def test_a_partial_frame_left_hanging_is_cut_off(seeded) -> None:
    d, x = seeded
    s = raw(d.socket)
    s.sendall(HEADER.pack(1000, protocol.STATUS) + b"\x00" * 10)  # 10 of 1000 payload bytes, then nothing
    s.settimeout(30)
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and "unfinished" in r.message, r
    assert read_reply(s) is None  # and the connection is closed
    still_serving(d, x)


def still_serving_with(d: Daemon) -> None:
    with Client(d.socket) as c:
        c.put("ok/x", torch.ones(3))
        assert torch.equal(c.get("ok/x"), torch.ones(3))


def test_one_client_cannot_hold_the_tier_in_open_puts(start_daemon) -> None:
    """Puts reserved and never sealed are capped per client, in count and bytes; the refusal is a
    TierFull that says which cap, and other clients keep their room."""
    d = start_daemon("--max-open-puts", "3", "--max-open-put-bytes", "4MiB")
    s = raw(d.socket)
    ids = []
    for i in range(3):
        s.sendall(protocol.encode(protocol.Put(i + 1, f"hog/{i}", "uint8", [1 << 20], 1 << 20)))
        r = read_reply(s)
        assert isinstance(r, protocol.PutReady), r
        ids.append(r.put_id)
    s.sendall(protocol.encode(protocol.Put(9, "hog/3", "uint8", [1 << 20], 1 << 20)))
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "tier_full" and "max_open_puts" in r.message, r
    s.sendall(protocol.encode(protocol.Abort(10, ids.pop())))
    assert isinstance(read_reply(s), protocol.Ok)
    s.sendall(protocol.encode(protocol.Put(11, "hog/big", "uint8", [3 << 20], 3 << 20)))  # 2 + 3 > 4 MiB
    r = read_reply(s)
    assert isinstance(r, protocol.Error) and r.code == "tier_full" and "max_open_put_bytes" in r.message, r
    with Client(d.socket) as c:  # another client is not affected
        c.put("other/x", torch.ones(1 << 18))
        assert c.stats()["counters"]["puts"] == 1


def test_ls_is_paged_so_no_reply_is_unbounded(daemon) -> None:
    with Client(daemon.socket) as c:
        keys = [f"pg/{i:05d}" for i in range(1100)]
        for k in keys:
            c.put(k, torch.zeros(1))
        assert [e["key"] for e in c.ls("pg/")] == keys  # the client walks the pages
        assert [e["key"] for e in c.ls("pg/", page=7)] == keys
    s = raw(daemon.socket)
    s.sendall(protocol.encode(protocol.Ls(1, "pg/")))
    first = read_reply(s)
    assert isinstance(first, protocol.Ok) and len(first.value) == protocol.LS_PAGE
    s.sendall(protocol.encode(protocol.Ls(2, "pg/", "", 10**9)))  # asks for everything at once
    big = read_reply(s)
    assert isinstance(big, protocol.Ok) and len(big.value) == protocol.LS_PAGE_MAX
    s.sendall(protocol.encode(protocol.Ls(3, "pg/", keys[1094], 100)))
    tail = read_reply(s)
    assert isinstance(tail, protocol.Ok) and [e["key"] for e in tail.value] == keys[1095:]


def test_no_client_can_resize_the_arena(seeded) -> None:
    """The arena fd every client gets is sealed against shrinking and growing: a client that tries
    gets EPERM, and the daemon, which would die of SIGBUS on a shrunk arena, serves on."""
    d, x = seeded
    with Client(d.socket) as c:
        assert c.arena is not None
        fd = c.arena.fd
        for size in (0, c.arena.size // 2, c.arena.size * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        assert os.fstat(fd).st_size == c.arena.size
    still_serving(d, x)

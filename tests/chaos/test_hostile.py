"""Hostile resource clients against one daemon, all at once, for ``CHAOS_HOSTILE_SECONDS``:

- never-readers: pipeline ``ls`` requests (~60 KiB replies) and never read an answer;
- half-framers: send all of a 16 MiB request frame but its last byte, and wait; when the daemon
  cuts them off (its partial-frame timeout, or its cap on unfinished bytes of all connections
  together) they come back and do it again;
- connection hogs: every remaining connection slot held idle, and more refused past the cap;
- one well-behaved client meanwhile puts and gets (bytes compared), round trip after round
  trip.

The daemon's resident memory is sampled (psutil) and its kernel-kept peak (VmHWM) read; both must
stay under a bound derived from the configured caps::

    RSS before + never-readers x (pending-reply cap + largest reply + one read)
               + max_partial_frame_bytes x 9/8 (a bytearray grows by up to 1/8 more than it holds)
               + half-framers x one read
               + connections x per-connection overhead + allocator slack

The test fails without the caps it checks: with the pending-reply cap lifted (tried once), the
daemon spent itself answering the never-readers' ~60 KiB replies to 15-byte requests and did not
answer a new client's HELLO within 60 s; without the cap on unfinished bytes the half-framers
would hold 12 x 16 MiB where the cap allows 64 MiB (a 15 s run before that cap peaked at 269 MiB).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import psutil
import pytest
import torch

from tests.chaos.budget import FIGURES, HOSTILE_SECONDS, NOTES
from tests.chaos.conftest import start
from tests.chaos.wire import Closed, RawConn
from tierd import protocol
from tierd.connection import MAX_PENDING_REPLY_BYTES, PARTIAL_FRAME_TIMEOUT
from tierd.protocol import HEADER, MAX_REQUEST_BYTES
from tierd_client import Client, DaemonUnavailable

pytestmark = pytest.mark.chaos

MAX_CONNECTIONS = 40
NEVER_READERS = 12
HALF_FRAMERS = 12
PARTIAL_CAP = 64 << 20
#: one read of the daemon's loop (asyncio's and uvloop's read buffers are at most this)
READ_CHUNK = 256 << 10
#: what an idle connection costs the daemon (transport, protocol, client record), generously
CONNECTION_OVERHEAD = 256 << 10
#: the allocator's and interpreter's own growth under load (fragmentation, free lists)
SLACK = 48 << 20
MiB = 1 << 20


def vm_hwm(pid: int) -> int:
    """The process's peak resident set size (bytes), as the kernel keeps it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


class Hostile(threading.Thread):
    def __init__(self, sock: Path, go: threading.Event, stop: threading.Event, kind: str) -> None:
        super().__init__(name=f"hostile-{kind}", daemon=True)
        self.sock, self.go, self.stop, self.kind = sock, go, stop, kind
        self.requests = self.cut_off = self.parked = self.refused = self.full = 0
        self.error: BaseException | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            self.never_read() if self.kind == "never-reader" else self.half_frame()
        except (OSError, AssertionError, Closed, msgspec.DecodeError) as e:  # the test fails on it
            self.error = e

    def never_read(self) -> None:
        c = RawConn(self.sock, timeout=HOSTILE_SECONDS + 30)
        c.hello("never-reader")
        self.connected.set()
        self.go.wait()
        batch = protocol.encode(protocol.Ls(1, "big/")) * 1000
        c.sock.settimeout(0.5)
        with c:
            while not self.stop.is_set():
                try:
                    c.sock.sendall(batch)  # the daemon stops reading once 1 MiB of replies waits
                    self.requests += 1000
                except TimeoutError:
                    continue  # sendall may have sent part: the stream is out of step, no matter

    def half_frame(self) -> None:
        body = b"\x00" * (MAX_REQUEST_BYTES - 1)  # one byte short of the largest frame
        head = HEADER.pack(MAX_REQUEST_BYTES, protocol.PUT)
        while not self.stop.is_set():
            c = RawConn(self.sock, timeout=PARTIAL_FRAME_TIMEOUT + 30)
            with c:
                welcome = c.try_hello("half-framer")
                if isinstance(welcome, protocol.Error):  # back too soon: its last slot is not free yet
                    assert "max_connections" in welcome.message, welcome
                    self.full += 1
                    continue
                self.connected.set()
                self.go.wait()
                try:
                    c.sock.sendall(head + body)
                except (BrokenPipeError, ConnectionResetError):
                    self.refused += 1  # the cap on unfinished bytes: refused while sending
                    continue
                self.parked += 1
                c.sock.settimeout(0.5)
                while not self.stop.is_set():  # wait to be cut off, or for the end
                    try:
                        tail = c.closes()
                    except TimeoutError:
                        continue
                    codes = [r.code for r in tail if isinstance(r, protocol.Error)]
                    assert codes in (["protocol"], ["unavailable"]), tail
                    if codes == ["protocol"]:
                        self.cut_off += 1
                    else:
                        self.refused += 1
                    break


def test_hostile_clients_cannot_grow_the_daemon_past_its_caps(chaos_tmp: Path) -> None:
    # no disk tier: no start-up calibration, whose buffers would be no client's doing
    d = start(chaos_tmp, "--max-connections", str(MAX_CONNECTIONS), "--max-partial-frame-bytes",
              str(PARTIAL_CAP), ram_bytes="16MiB", disk_bytes="0")  # fmt: skip
    try:
        proc = psutil.Process(d.pid)
        good = Client(d.socket)
        for i in range(300):  # the never-readers' ls pages: 256 entries of ~200 bytes each
            good.put(f"big/{i:04d}-" + "k" * 150, torch.zeros(1), tags=["t" * 40, "u" * 40])
        probe = RawConn(d.socket)
        probe.hello()
        probe.send(protocol.encode(protocol.Ls(1, "big/")))
        largest_reply = len(protocol.encode(probe.reply()))
        probe.close()
        before, hwm_before = proc.memory_info().rss, vm_hwm(d.pid)
        hogs = MAX_CONNECTIONS - 1 - NEVER_READERS - HALF_FRAMERS
        bound = (
            before
            + NEVER_READERS * (MAX_PENDING_REPLY_BYTES + largest_reply + READ_CHUNK)
            + PARTIAL_CAP * 9 // 8
            + HALF_FRAMERS * READ_CHUNK
            + MAX_CONNECTIONS * CONNECTION_OVERHEAD
            + SLACK
        )
        held = [RawConn(d.socket) for _ in range(hogs)]
        for c in held:
            c.hello("hog")
        go, stop = threading.Event(), threading.Event()
        crowd = [Hostile(d.socket, go, stop, "never-reader") for _ in range(NEVER_READERS)]
        crowd += [Hostile(d.socket, go, stop, "half-framer") for _ in range(HALF_FRAMERS)]
        for h in crowd:
            h.start()
        for h in crowd:
            assert h.connected.wait(30), (h.kind, h.error)
        refused = 0  # (the crowd waits for `go`: no slot frees up meanwhile)
        for _ in range(5):  # every slot is taken: refused with the reason (before a half-framer is cut off)
            with pytest.raises(DaemonUnavailable, match="at most"):
                Client(d.socket, timeout=10)
            refused += 1
        go.set()
        peak, samples = before, 0
        trips, worst = 0, 0.0
        t_end = time.monotonic() + HOSTILE_SECONDS
        while time.monotonic() < t_end:
            x = torch.randn(int(torch.randint(1, 1 << 16, (1,))))
            t0 = time.monotonic()
            good.put(f"good/{trips % 8}", x)
            y = good.get(f"good/{trips % 8}")
            assert torch.equal(x, y), "the well-behaved client read wrong bytes"
            good.release(y)
            worst = max(worst, time.monotonic() - t0)
            trips += 1
            peak = max(peak, proc.memory_info().rss)
            samples += 1
        stop.set()
        for h in crowd:
            h.join(30)
        hwm = vm_hwm(d.pid)
        for h in crowd:
            assert not h.is_alive() and h.error is None, (h.kind, h.error)
        assert d.proc.poll() is None, d.log()
        assert peak < bound, f"RSS peaked at {peak / MiB:.0f} MiB, over the {bound / MiB:.0f} MiB bound"
        if hwm > hwm_before:  # the peak fell in the attack (else it was before it, and lower)
            assert hwm < bound, f"VmHWM {hwm / MiB:.0f} MiB, over the {bound / MiB:.0f} MiB bound"
        with Client(d.socket) as c:  # and afterwards, everything still in place
            assert len(c.ls("big/")) == 300 and c.stats()["counters"]["internal_errors"] == 0
        for c in held:
            c.close()
        good.close()
        FIGURES["hostile never-reader requests sent"] += sum(h.requests for h in crowd)
        FIGURES["hostile 16 MiB partial frames sent"] += sum(h.parked for h in crowd)
        FIGURES["hostile partial frames cut off by timeout"] += sum(h.cut_off for h in crowd)
        FIGURES["hostile partial frames refused over the 64 MiB cap"] += sum(h.refused for h in crowd)
        FIGURES["hostile reconnects refused (all slots taken)"] += sum(h.full for h in crowd)
        FIGURES["hostile connections past the cap refused"] += refused
        FIGURES["hostile good-client round trips (bytes checked)"] += trips
        NOTES["hostile daemon RSS (MiB)"] = (
            f"before {before / MiB:.0f}, sampled peak {peak / MiB:.0f} ({samples} samples), "
            f"VmHWM {max(hwm, hwm_before) / MiB:.0f}, bound {bound / MiB:.0f}"
        )
        NOTES["hostile good-client slowest round trip (s)"] = f"{worst:.3f}"
    finally:
        rc = d.stop()
    assert rc == 0, d.log()

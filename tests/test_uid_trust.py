"""A uid is a trust domain (DESIGN invariant 9): a client writes only memory of its own uid, maps
what other uids put read-only, and cannot change, delete or push out what another uid put.

Real daemon (as root, serving a socket group), real processes of uid ``nobody`` that try every way
in: a writable mapping of root's arena, reopening its fd for writing through /proc, mprotect, cutting
or punching the arena, and the verbs that change entries. Root's bytes stay as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tierd import launch
from tierd_client import Client

NOBODY = 65534
MiB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a process of another uid needs root")

#: Runs as uid nobody: everything is imported first (the interpreter's files may be root's only).
ATTACKER = textwrap.dedent(
    """
    import ctypes, errno, json, mmap, os, sys
    import numpy as np, torch
    from tierd_client import Client, Forbidden, TierFull
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([]); os.setgid({uid}); os.setuid({uid})
    out = {{}}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "done"
        except Forbidden as e:
            out[name] = "forbidden"
        except TierFull as e:
            out[name] = "tier_full"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))

    with Client(sys.argv[1]) as c:
        t = c.get("root/w")
        out["read"] = t.float().sum().item()
        theirs = c.arenas[0]  # root's arena: the daemon's first
        out["theirs_writable"] = theirs.writable
        fd, size = theirs.fd, theirs.size
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        attempt("mmap_rw", lambda: mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=rw))
        attempt("reopen_rw", lambda: os.open(f"/proc/self/fd/{{fd}}", os.O_RDWR))
        attempt("ftruncate", lambda: os.ftruncate(fd, 0))
        attempt("fallocate", lambda: os.posix_fallocate(fd, 0, 4096))
        attempt("write", lambda: os.pwrite(fd, b"x", 0))
        ptr = ctypes.c_void_p(theirs.ro.ctypes.data)
        def mprotect():
            if libc.mprotect(ptr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        attempt("mprotect", mprotect)
        c.release(t)
        attempt("delete", lambda: c.delete("root/w"))
        attempt("put_over", lambda: c.put("root/w", torch.zeros(16)))
        attempt("evict", lambda: c.evict("root/w"))
        attempt("pin", lambda: c.pin("root/w"))
        attempt("unpin", lambda: c.unpin("root/w"))
        # its own entries: in an arena of its own, which it writes and cannot cut
        n = int(sys.argv[2])
        for i in range(n):
            c.put(f"nobody/{{i}}", torch.full((2**18,), float(i)))  # 1 MiB each
        mine = c.arena
        out["mine_space"] = [s for s, a in c.arenas.items() if a is mine][0]
        attempt("own_ftruncate", lambda: os.ftruncate(mine.fd, 0))
        attempt("own_grow", lambda: os.ftruncate(mine.fd, mine.size * 2))
        out["own_ok"] = out["own_in_own_arena"] = True
        for i in range(n):  # one at a time: leased bytes count against the quota
            g = c.get(f"nobody/{{i}}")
            out["own_ok"] &= bool((g == i).all())
            out["own_in_own_arena"] &= mine.contains(g)
            c.release(g)
        attempt("own_delete", lambda: c.delete("nobody/0"))
    print(json.dumps(out), flush=True)
    """
)


def as_nobody(sock: Path, n: int) -> dict:
    script = ATTACKER.format(uid=NOBODY)
    r = subprocess.run([sys.executable, "-c", script, str(sock), str(n)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def serve_nobody(tmp: Path, *args: str, ram_bytes: str = "64MiB") -> launch.Daemon:
    """A root daemon whose socket group lets uid nobody in."""
    tmp.chmod(0o755)  # nobody must reach the socket
    return launch.start(
        tmp / "tierd.sock", "--state-dir", str(tmp / "state"), "--socket-group", "nogroup", *args,
        ram_bytes=ram_bytes, log_path=tmp / "tierd.log",
    )  # fmt: skip


def test_another_uid_reads_but_cannot_write_cut_or_change_what_root_put(short_tmp: Path) -> None:
    d = serve_nobody(short_tmp, "--disk-bytes", "64MiB")
    try:
        with Client(d.socket) as root:
            w = torch.arange(4096, dtype=torch.float32)
            root.put("root/w", w)
            out = as_nobody(d.socket, 4)
            assert out["read"] == float(w.sum())
            assert out["theirs_writable"] is False
            # the kernel refuses every way of writing root's arena
            assert out["mmap_rw"] == "EACCES" and out["reopen_rw"] == "EACCES"
            assert out["mprotect"] == "EACCES"
            assert out["ftruncate"] in ("EINVAL", "EBADF") and out["fallocate"] == "EBADF"
            assert out["write"] == "EBADF"
            # and the daemon refuses every verb that would change root's entry
            for verb in ("delete", "put_over", "evict", "pin", "unpin"):
                assert out[verb] == "forbidden", (verb, out)
            # nobody's own entries live in an arena of its own, sealed against resizing
            assert out["mine_space"] != 0 and out["own_ok"] and out["own_in_own_arena"]
            assert out["own_ftruncate"] == "EPERM" and out["own_grow"] == "EPERM"
            assert out["own_delete"] == "done"

            # root's bytes are as they were; root (connected before nobody's arena existed) reads
            # nobody's entries through the arena it fetches on first sight, and may delete them
            got = root.get("root/w")
            assert torch.equal(got, w)
            root.release(got)
            theirs = root.get("nobody/3")
            assert bool((theirs == 3).all()) and not root.arena.contains(theirs)
            root.release(theirs)
            root.delete("nobody/3")
            st = root.stats()
            ram = next(t for t in st["tiers"] if t["name"] == "ram")
            assert {a["uid"] for a in ram["arenas"]} == {0, NOBODY}
    finally:
        assert d.stop() == 0


def test_a_quota_keeps_one_uid_from_pushing_out_another(short_tmp: Path) -> None:
    """nobody puts 4x its quota: its own entries go to disk, root's stay in RAM."""
    d = serve_nobody(short_tmp, "--disk-bytes", "128MiB", "--ram-quota", "8MiB", ram_bytes="24MiB")
    try:
        with Client(d.socket) as root:
            root.put("root/w", torch.ones(16))  # what the attacker reads first
            for i in range(6):  # 6 MiB of root's, under its own quota
                root.put(f"root/{i}", torch.full((2**18,), float(i)))
            out = as_nobody(d.socket, 32)  # 32 MiB of nobody's against an 8 MiB quota
            assert out["own_ok"], out
            for i in range(6):
                assert "ram" in root.stat(f"root/{i}")["tiers"], i
            ram = next(t for t in root.stats()["tiers"] if t["name"] == "ram")
            used = {a["uid"]: a["used_bytes"] for a in ram["arenas"]}
            assert used[NOBODY] <= 8 * MiB and ram["quota_bytes"] == 8 * MiB
            nobody_on_disk = sum("ram" not in root.stat(f"nobody/{i}")["tiers"] for i in range(1, 32))
            assert nobody_on_disk >= 31 - 8  # at most its quota's worth stayed in RAM
    finally:
        assert d.stop() == 0


def test_an_entry_larger_than_the_quota_is_refused_clearly(short_tmp: Path) -> None:
    d = launch.start(short_tmp / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
                     "--ram-quota", "4MiB", ram_bytes="16MiB", log_path=short_tmp / "tierd.log")  # fmt: skip
    try:
        with Client(d.socket) as c:
            from tierd_client import TierFull

            with pytest.raises(TierFull, match="quota"):
                c.put("big/x", torch.zeros(2 * MiB))  # 8 MiB
            c.put("small/x", torch.zeros(MiB // 4))  # 1 MiB: fine
    finally:
        assert d.stop() == 0

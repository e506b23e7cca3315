"""tierctl as a user runs it: a subprocess against a real daemon, tables and --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tierd.launch import Daemon
from tierd_client import Client
from tierd_client.tierctl import human_bytes


def tierctl(sock: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TIERD_SOCKET=str(sock))
    return subprocess.run(
        [sys.executable, "-m", "tierd_client.tierctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_status_ls_show_rm_pin(daemon: Daemon) -> None:
    with Client(daemon.socket) as c:
        c.put("demo/w", torch.randn(512, 512), tags=["weight"])
        c.put("other/b", torch.zeros(10, dtype=torch.bfloat16))
    st = json.loads(tierctl(daemon.socket, "status", "--json").stdout)
    ram = st["tiers"][0]
    assert ram["name"] == "ram" and ram["entries"] == 2 and ram["capacity_bytes"] == 64 << 20
    assert ram["used_bytes"] >= 512 * 512 * 4 and "fragmentation" in ram
    for k in (
        "gets",
        "hits_ram",
        "reads_disk",
        "prefetch_issued",
        "prefetch_used",
        "demotions",
        "promotions",
    ):
        assert k in st["counters"]
    assert "hits_gpu" not in st["counters"]  # it returns with the GPU tier, which counts it
    assert {"clients", "leases"} <= st.keys()

    human = tierctl(daemon.socket, "status")
    assert human.returncode == 0 and "ram" in human.stdout and "FRAGMENTED" in human.stdout
    ram = next(t for t in st["tiers"] if t["name"] == "ram")
    ram_line = next(line for line in human.stdout.splitlines() if line.startswith("ram "))
    assert "LARGEST HOLE" in human.stdout and ram_line.endswith(human_bytes(ram["largest_free_bytes"]))

    ls = json.loads(tierctl(daemon.socket, "ls", "--json").stdout)
    assert [e["key"] for e in ls] == ["demo/w", "other/b"]
    ls = json.loads(tierctl(daemon.socket, "ls", "--prefix", "demo/", "--json").stdout)
    assert [e["key"] for e in ls] == ["demo/w"]
    table = tierctl(daemon.socket, "ls").stdout
    assert "demo/w" in table and "512x512" in table and "weight" in table

    show = json.loads(tierctl(daemon.socket, "show", "demo/w", "--json").stdout)
    assert show["shape"] == [512, 512] and show["dtype"] == "float32" and show["tiers"] == ["ram"]
    assert "encoding" in tierctl(daemon.socket, "show", "demo/w").stdout

    assert tierctl(daemon.socket, "pin", "demo/w").returncode == 0
    assert json.loads(tierctl(daemon.socket, "show", "demo/w", "--json").stdout)["pinned"] == ["ram"]
    assert json.loads(tierctl(daemon.socket, "unpin", "demo/w", "--json").stdout)["was_pinned"] is True

    assert tierctl(daemon.socket, "rm", "demo/w").returncode == 0
    missing = tierctl(daemon.socket, "show", "demo/w")
    assert missing.returncode == 1 and "no entry 'demo/w'" in missing.stderr


def test_no_daemon_is_one_clear_line(tmp_path: Path) -> None:
    p = tierctl(tmp_path / "none.sock", "status")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "no tierd at" in p.stderr and "start it with" in p.stderr
    assert "Traceback" not in p.stderr


def test_help() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tierd_client.tierctl", "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0
    for cmd in ("status", "ls", "show", "rm", "pin", "unpin"):
        assert cmd in p.stdout


def test_clients_lists_who_is_connected_and_what_they_hold(daemon: Daemon) -> None:
    with Client(daemon.socket) as a, Client(daemon.socket) as b:
        a.put("c/w", torch.zeros(1024))  # 4 KiB put and sealed by a
        held = b.get("c/w")  # leased by b
        out = tierctl(daemon.socket, "clients", "--json")
        assert out.returncode == 0, out.stderr
        rows = {r["id"]: r for r in json.loads(out.stdout)}
        ra, rb = rows[a.client_id], rows[b.client_id]
        assert ra["pid"] == os.getpid() and ra["uid"] == os.getuid() and ra["name"]
        assert ra["put_bytes"] == 4096 and ra["leases"] == 0
        assert rb["leases"] == 1 and rb["leased_bytes"] == 4096 and rb["put_bytes"] == 0
        assert ra["requests"] >= 2 and rb["requests"] >= 1  # put + seal; get
        assert len(rows) == 3  # and tierctl itself
        human = tierctl(daemon.socket, "clients")
        assert human.returncode == 0 and "LEASED" in human.stdout and "(this tierctl)" in human.stdout
        line_b = next(x for x in human.stdout.splitlines() if x.split()[0] == str(b.client_id))
        assert human_bytes(4096) in line_b
        del held

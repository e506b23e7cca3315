"""The Prometheus metrics on a real daemon: tierctl metrics, the HTTP endpoint, the textfile.

A scripted workload (puts, durable puts, an eviction, gets from RAM and from disk, releases, a miss)
runs on a real daemon with a real LMDB disk tier; then the exposition text, parsed by
prometheus_client's own parser, must agree with ``tierctl status --json`` taken right after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tierd import launch
from tierd.errors import NotFound
from tierd.exporter import ListenError, parse_listen
from tierd.metrics import GPU_COUNTERS, HELP, LATENCY_BUCKETS, NAMES
from tierd_client import Client

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-tierd.json"


def tierctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierd_client.tierctl", "--socket", str(sock), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text, by (name, sorted labels), through the library's parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def workload(sock: Path) -> tuple[dict, str, dict]:
    with Client(sock) as c:
        wait_until(lambda: c.stats()["hardware"], what="the hardware report (read once at start)")
        for i in range(6):
            c.put(f"w/{i}", np.full(50_000, i, dtype=np.float32), durable=i % 2 == 0)
        c.evict("w/0")  # now only on disk: the next get promotes it
        for _ in range(3):
            c.release(c.get("w/1"))
        c.release(c.get("w/0"))
        held = c.get_many(["w/2", "w/3"])  # leases held until the client closes
        with pytest.raises(NotFound):
            c.get("w/missing")
        # stays connected while the snapshot is taken: one client, two leases
        st = json.loads(tierctl(sock, "status", "--json").stdout)
        text = tierctl(sock, "metrics").stdout
        st_after = json.loads(tierctl(sock, "status", "--json").stdout)
        assert len(held) == 2
    return st, text, st_after


def test_metrics_parse_and_agree_with_status(start_daemon) -> None:
    d = start_daemon(disk_bytes="64MiB")
    st, text, st_after = workload(d.socket)
    got = samples(text)

    def one(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    for t in st["tiers"]:
        assert one("tierd_tier_capacity_bytes", tier=t["name"]) == t["capacity_bytes"]
        assert one("tierd_tier_used_bytes", tier=t["name"]) == t["used_bytes"]
        assert one("tierd_tier_entries", tier=t["name"]) == t["entries"]
    ram = st["tiers"][0]
    assert one("tierd_tier_fragmentation_ratio", tier="ram") == ram["fragmentation"]
    assert one("tierd_tier_largest_free_bytes", tier="ram") == ram["largest_free_bytes"]
    assert one("tierd_tier_ceiling_bytes", tier="ram") == st["placement"]["ram_ceiling_bytes"]
    disk = next(t for t in st["tiers"] if t["name"] == "disk")
    assert disk["writes"] == 3 and disk["reads"] == 1  # the three durable puts, the promotion of w/0
    for key in ("reads", "writes", "read_bytes", "write_bytes"):
        assert one(f"tierd_store_{key}_total", tier="disk") == disk[key] > 0
    assert 0 < one("tierd_store_read_seconds_total", tier="disk") == pytest.approx(disk["read_seconds"])
    assert 0 < one("tierd_store_write_seconds_total", tier="disk") == pytest.approx(disk["write_seconds"])

    # every counter, by its own name or relabelled; tierctl's status requests bump none of them, so
    # the status taken after tierctl metrics has the same counters as the one before it
    c = st["counters"]
    assert c == st_after["counters"]
    assert c["gets"] == 6 and c["hits_ram"] == 5 and c["reads_disk"] == 1 and c["not_found"] == 1
    assert c["promotions"] == 1 and c["demotions"] == 1
    assert c["promoted_bytes"] == c["demoted_bytes"] == 200_000
    for name in NAMES:
        if name not in c:  # the GPU tier's counters, shown only where there is one
            assert name in GPU_COUNTERS
            assert not any(k[0] == f"tierd_{name}_total" or k[1] == (("tier", "gpu"),) for k in got)
            continue
        if name.startswith("hits_"):
            assert one("tierd_hits_total", tier=name.removeprefix("hits_")) == c[name]
        elif name == "stall_us":
            assert one("tierd_prefetch_stall_seconds_total") == pytest.approx(c[name] / 1e6)
        else:
            assert one(f"tierd_{name}_total") == c[name], name
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["tierd_gets"].type == "counter" and fams["tierd_gets"].documentation == HELP["gets"]
    assert one("tierd_clients") == st["clients"] == 2  # the workload's client and the tierctl asking
    assert one("tierd_leases") == st["leases"] == 2
    p = st["pressure"]  # None before the monitor's first poll (a second after start): level 0
    level = ("none", "low", "high", "critical").index(p["level"]) if p is not None else 0
    assert one("tierd_memory_pressure_level") == level

    # latency: a histogram per verb, its counts those of status
    lat = st["latency"]
    assert lat["buckets"] == list(LATENCY_BUCKETS)
    assert sum(lat["verbs"]["get"]["counts"]) == 6  # five gets and the miss
    assert sum(lat["verbs"]["put"]["counts"]) == 6 and sum(lat["verbs"]["seal"]["counts"]) == 6
    assert fams["tierd_request_duration_seconds"].type == "histogram"
    for verb, v in lat["verbs"].items():
        n = sum(v["counts"]) + (verb == "status")  # the status request answered after this snapshot
        assert one("tierd_request_duration_seconds_count", verb=verb) == n
        assert one("tierd_request_duration_seconds_bucket", verb=verb, le="+Inf") == n
        if verb != "status":
            first = one("tierd_request_duration_seconds_bucket", verb=verb, le=str(LATENCY_BUCKETS[0]))
            assert first == v["counts"][0]
            assert one("tierd_request_duration_seconds_sum", verb=verb) == pytest.approx(v["sum"])
        assert v["sum"] > 0

    # the machine
    hw = st["hardware"]
    assert hw["cpu_cores"] == os.cpu_count() and hw["ram_bytes"] > 0
    assert one("tierd_machine_cpu_cores") == hw["cpu_cores"]
    assert one("tierd_machine_ram_bytes") == hw["ram_bytes"]
    assert (
        one(
            "tierd_build_info",
            version=st["daemon"]["version"],
            protocol=str(st["daemon"]["protocol"]),
            loop=st["daemon"]["loop"],
        )
        == 1
    )
    dev = hw["state_device"]
    info = next(s for s in fams["tierd_state_device_info"].samples)
    assert info.labels["device"] == (dev["device"] or "none")

    # the Grafana dashboard graphs series this daemon has
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {n for e in exprs for n in re.findall(r"\btierd_\w+", e)}
    assert len(wanted) >= 15
    assert wanted <= {name for name, _ in got}, wanted - {name for name, _ in got}


def test_machine_and_calibration_in_status(start_daemon) -> None:
    d = start_daemon(disk_bytes="64MiB")
    with Client(d.socket) as c:
        st = wait_until(lambda: (s := c.stats())["placement"]["calibration"] and s["hardware"] and s,
                        timeout=60, what="calibration and the hardware report")  # fmt: skip
    human = tierctl(d.socket, "status").stdout
    hw = st["hardware"]
    assert f"{hw['cpu_cores']} cores" in human
    assert f"state dir: {hw['state_device']['path']} on " in human
    if hw["gpus"]:
        assert all(g["name"] in human for g in hw["gpus"])
    else:
        assert f"gpus: {hw['gpu_note']}" in human and hw["gpu_note"].startswith("none")
    assert "calibration: memcpy" in human  # the calibration figures stay
    got = samples(tierctl(d.socket, "metrics").stdout)
    cal = st["placement"]["calibration"]
    assert got[("tierd_calibration_memcpy_gbps", ())] == pytest.approx(cal["memcpy_gbps"])


def http_get(address: str, path: str = "/metrics", request: bytes | None = None) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as s:
        s.sendall(request or f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_endpoint_answers_on_loopback(start_daemon) -> None:
    d = start_daemon("--metrics-listen", "127.0.0.1:0")
    with Client(d.socket) as c:
        c.put("h/x", np.ones(1000, dtype=np.float32))
        c.release(c.get("h/x"))
        st = c.stats()
    address = st["daemon"]["metrics_listen"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    reply = http_get(address)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    got = samples(body.decode())
    assert got[("tierd_puts_total", ())] == 1 and got[("tierd_gets_total", ())] == 1
    assert got[("tierd_tier_capacity_bytes", (("tier", "ram"),))] == 64 << 20
    # what a scraper does wrong gets an HTTP error or a closed connection, and the daemon goes on
    assert http_get(address, "/other").startswith(b"HTTP/1.1 404")
    assert http_get(address, request=b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert http_get(address, request=b"\x00\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert http_get(address, request=b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n") == b""
    assert http_get(address).startswith(b"HTTP/1.1 200 OK")
    with Client(d.socket) as c:
        assert c.stat("h/x")["key"] == "h/x"


def test_no_http_endpoint_by_default(start_daemon) -> None:
    d = start_daemon()
    with Client(d.socket) as c:
        assert c.stats()["daemon"]["metrics_listen"] is None
    # the daemon opened no TCP or UDP socket at all
    fds = Path(f"/proc/{d.pid}/fd")
    inodes = set()
    for f in os.listdir(fds):
        with contextlib.suppress(FileNotFoundError):  # open only for a moment (a /proc read), closed since
            inodes.add(os.readlink(fds / f))
    inet = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{d.pid}/net/{table}").read_text().splitlines()[1:]:
            inet.add(f"socket:[{line.split()[9]}]")
    assert not inodes & inet


def test_a_taken_port_is_a_configuration_error(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "tierd", "--socket", str(short_tmp / "t.sock"), "--state-dir",
             str(short_tmp / "state"), "--ram-bytes", "16MiB", "--disk-bytes", "0",
             "--metrics-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"tierd: metrics_listen: cannot listen on 127.0.0.1:{port}")
    )
    assert not (short_tmp / "t.sock").exists()


def test_textfile_appears_is_rewritten_and_goes_at_stop(short_tmp: Path) -> None:
    prom = short_tmp / "tierd.prom"
    old_umask = os.umask(0o077)  # as the unit's UMask=0077: the daemon inherits it
    try:
        d = launch.start(
            short_tmp / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
            "--metrics-textfile", str(prom), "--metrics-interval", "0.2",
            ram_bytes="16MiB", log_path=short_tmp / "tierd.log",
        )  # fmt: skip
    finally:
        os.umask(old_umask)
    try:
        with Client(d.socket) as c:

            def puts_in_file() -> float | None:
                try:  # a reader never sees half a file: it parses, or it is not there yet
                    return samples(prom.read_text()).get(("tierd_puts_total", ()))
                except FileNotFoundError:
                    return None

            assert wait_until(lambda: puts_in_file() is not None, what="the textfile") and puts_in_file() == 0
            first = prom.stat().st_ino
            c.put("f/x", np.ones(100, dtype=np.float32))
            wait_until(lambda: puts_in_file() == 1, what="the textfile rewritten with the put")
            assert prom.stat().st_ino != first  # replaced by a rename, not written in place
            assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter (another user) can read it
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
    assert not prom.exists()


def test_a_textfile_that_cannot_be_written_is_logged_and_the_daemon_goes_on(short_tmp: Path) -> None:
    folder = short_tmp / "textfile"
    folder.mkdir()
    prom = folder / "tierd.prom"
    d = launch.start(
        short_tmp / "tierd.sock", "--state-dir", str(short_tmp / "state"), "--disk-bytes", "0",
        "--metrics-textfile", str(prom), "--metrics-interval", "0.2",
        ram_bytes="16MiB", log_path=short_tmp / "tierd.log",
    )  # fmt: skip
    try:
        wait_until(prom.exists, what="the first textfile")
        prom.unlink()
        folder.rmdir()  # the directory goes away under the daemon
        wait_until(lambda: "cannot write it" in d.log(), what="the warning")
        with Client(d.socket) as c:
            c.put("f/y", np.ones(10, dtype=np.float32))
        folder.mkdir()  # and comes back: the next interval writes again
        wait_until(lambda: prom.exists() and samples(prom.read_text())[("tierd_puts_total", ())] == 1,
                   what="the textfile written again")  # fmt: skip
        assert d.log().count("cannot write it") == 1  # said once, not at every interval
    finally:
        assert d.stop() == 0, d.log()


def test_per_client_data_never_becomes_series() -> None:
    """A thousand clients are one gauge's value, not a thousand series (a scrape stays small)."""
    from tierd.exposition import render

    status = {
        "tiers": [{"name": "ram", "capacity_bytes": 1, "used_bytes": 0, "entries": 0}],
        "clients": 1000, "leases": 10, "counters": {n: 1 for n in NAMES},
        "client_list": [{"id": i} for i in range(1000)],
    }  # fmt: skip
    got = samples(render(status).decode())
    # per-client data never becomes series: the count does not grow with the clients
    assert got[("tierd_clients", ())] == 1000
    assert len(got) < 80


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("localhost:0", ("127.0.0.1", 0)),
     ("[::1]:9464", ("::1", 9464)), ("127.1.2.3:80", ("127.1.2.3", 80))],
)  # fmt: skip
def test_listen_addresses_that_are_loopback(spec: str, expected: tuple[str, int]) -> None:
    assert parse_listen(spec) == expected


@pytest.mark.parametrize(
    ("spec", "words"),
    [("0.0.0.0:9464", "not a loopback"), ("[::]:9464", "not a loopback"), ("10.0.0.1:9464", "not a loopback"),
     ("9464", "HOST:PORT"), ("127.0.0.1:99999", "HOST:PORT"), ("127.0.0.1:", "HOST:PORT"),
     ("host.example:9464", "not an IP address")],
)  # fmt: skip
def test_listen_addresses_refused(spec: str, words: str) -> None:
    with pytest.raises(ListenError, match=words):
        parse_listen(spec)

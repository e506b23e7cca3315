"""SIGHUP (``systemctl reload tierd``) re-reads the configuration and applies what can change live.

Against a real daemon started with ``--config FILE``: the file is rewritten, the daemon gets SIGHUP,
and the sd_notify datagrams say RELOADING=1 (with MONOTONIC_USEC) and then READY=1, as systemd
expects them. A reload under load (two clients holding leases and streaming gets) changes the
watermarks and the predictor and loses no lease, entry or connection; a bad file changes nothing.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import wait_until
from tierd import launch
from tierd_client import Client, TierdError

MIB = 1 << 20
N_KEYS = 40  # 1 MiB each: 40 MiB of a 64 MiB RAM tier, under the 0.9 watermark
HELD = 5  # entries each client keeps leased through the reload


def write_config(path: Path, **settings: object) -> None:
    lines = []
    for k, v in settings.items():
        lines.append(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}")
    path.write_text("\n".join(lines).replace("'", '"') + "\n")


def reload(d: launch.Daemon) -> tuple[str, str]:
    """SIGHUP, then the RELOADING=1 and the READY=1 datagrams that follow it."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    os.kill(d.pid, signal.SIGHUP)
    reloading = d.wait_message("RELOADING=1")
    ready = d.wait_message("READY=1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.search(r"^MONOTONIC_USEC=(\d+)$", reloading, re.M)
    assert m, reloading
    assert before <= int(m.group(1)) <= after, (before, m.group(1), after)
    return reloading, ready


def value(i: int) -> np.ndarray:
    return np.full(MIB // 4, i, dtype=np.float32)


def ram_tier(status: dict) -> dict:
    return next(t for t in status["tiers"] if t["name"] == "ram")


def test_reload_under_load_changes_watermarks_and_predictor_and_loses_nothing(
    short_tmp: Path, start_daemon, seed: int
) -> None:
    print(f"seed {seed}")
    cfg = short_tmp / "tierd.toml"
    write_config(cfg, ram_high_watermark=0.9, ram_low_watermark=0.75, predictor="sequence")
    d = start_daemon("--config", str(cfg), ram_bytes="64MiB", disk_bytes="256MiB")
    with Client(str(d.socket)) as admin:
        for i in range(N_KEYS):
            admin.put(f"load/{i}", value(i))
        before = admin.stats()
        assert before["placement"]["ram_high_watermark"] == 0.9
        assert before["prefetch"]["predictor"] == "sequence"
        assert ram_tier(before)["used_bytes"] >= N_KEYS * MIB * 0.9

        stop = threading.Event()
        holding = threading.Barrier(3)
        failures: list[str] = []
        gets = [0, 0]

        def worker(n: int) -> None:
            rng = random.Random(seed + n)
            try:
                with Client(str(d.socket), timeout=30) as c:
                    own = range(n * HELD, (n + 1) * HELD)
                    held = {i: c.get(f"load/{i}") for i in own}
                    holding.wait(10)
                    while not stop.is_set():
                        i = rng.randrange(2 * HELD, N_KEYS)
                        t = c.get(f"load/{i}")
                        if float(t[0]) != i or float(t[-1]) != i:
                            failures.append(f"client {n}: load/{i} read {float(t[0])}")
                        c.release(t)
                        gets[n] += 1
                    for i, t in held.items():  # the leases taken before the reload still hold
                        if not bool((t == i).all()):
                            failures.append(f"client {n}: leased load/{i} changed")
                        c.release(t)
            except (TierdError, threading.BrokenBarrierError) as e:  # reported below, with the log
                failures.append(f"client {n}: {type(e).__name__}: {e}")
                holding.abort()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        holding.wait(10)
        streamed = wait_until(lambda: min(gets) >= 20 and sum(gets), 20, "gets streaming before the reload")
        mid = admin.stats()
        assert mid["leases"] >= 2 * HELD
        assert mid["clients"] == 3

        write_config(cfg, ram_high_watermark=0.5, ram_low_watermark=0.3, predictor="none")
        _, ready = reload(d)
        assert "STATUS=reload 1: 3 settings applied, 0 need a restart" in ready, ready
        gets_at_reload = sum(gets)
        wait_until(lambda: sum(gets) >= gets_at_reload + 40, 20, "gets streaming after the reload")
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures, "\n".join(failures) + "\n" + d.log()
        print(f"{streamed} gets before the reload, {sum(gets)} in all")

        after = admin.stats()
        assert after["placement"]["ram_high_watermark"] == 0.5
        assert after["placement"]["ram_low_watermark"] == 0.3
        assert after["prefetch"]["predictor"] == "none"
        last = after["reload"]["last"]
        assert last["error"] is None and last["restart_needed"] == {}
        assert last["applied"]["predictor"] == {"from": "sequence", "to": "none"}
        # the two workers' connections were theirs to close, not the reload's: they end as they close
        wait_until(lambda: admin.stats()["clients"] == 1, 5, "the workers' connections to end")
        # the new high watermark holds: the balancer demoted down to the low one
        cap = ram_tier(after)["capacity_bytes"]
        wait_until(lambda: ram_tier(admin.stats())["used_bytes"] <= 0.5 * cap, 20, "demotion to 0.5")
        # nothing lost: every entry reads back whole, from wherever it went
        for i in range(N_KEYS):
            t = admin.get(f"load/{i}")
            assert bool((t == i).all()), i
            admin.release(t)
        assert len(admin.ls("load/")) == N_KEYS
    assert d.proc.poll() is None
    assert "Traceback" not in d.log() and " ERROR " not in d.log(), d.log()


#: a bad file, and what the error names
BAD_FILES = {
    "not TOML": ("ram_high_watermark = [\n", "tierd.toml"),
    "a bad value": ("ram_high_watermark = 0.5\nram_low_watermark = 0.8\n", "ram_low_watermark"),
    "an unknown setting": ("ram_high_watermark = 0.5\nram_hi_watermark = 0.4\n", "'ram_hi_watermark'"),
}


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_a_bad_file_keeps_the_old_settings(short_tmp: Path, start_daemon, bad: str) -> None:
    cfg = short_tmp / "tierd.toml"
    write_config(cfg, ram_high_watermark=0.8, ram_low_watermark=0.6, predictor="sequence")
    d = start_daemon("--config", str(cfg))
    with Client(str(d.socket)) as c:
        c.put("keep/x", value(7))
        held = c.get("keep/x")
        before = c.stats()
        content, named = BAD_FILES[bad]
        cfg.write_text(content)
        _, ready = reload(d)
        assert "STATUS=reload 1 failed, old settings kept" in ready, ready
        after = c.stats()
        assert after["placement"] == before["placement"]
        assert after["prefetch"]["predictor"] == "sequence"
        assert after["leases"] == 1 and after["clients"] == 1
        assert named in after["reload"]["last"]["error"]
        assert bool((held == 7).all())
        c.release(held)
    assert "keeping the settings in use" in d.log()
    # and the next good file is applied as usual
    write_config(cfg, ram_high_watermark=0.7, ram_low_watermark=0.6)
    reload(d)
    with Client(str(d.socket)) as c:
        assert c.stats()["placement"]["ram_high_watermark"] == 0.7


def test_a_setting_that_needs_a_restart_is_reported_and_left_alone(short_tmp: Path, start_daemon) -> None:
    cfg = short_tmp / "tierd.toml"
    write_config(cfg, ram_bytes="64MiB", tag_codecs="")
    d = start_daemon("--config", str(cfg), ram_bytes="")  # the file sets the size
    with Client(str(d.socket)) as c:
        cap = ram_tier(c.stats())["capacity_bytes"]
        assert cap == 64 * MIB
        write_config(cfg, ram_bytes="128MiB", tag_codecs="kv=zstd", log_level="debug")
        _, ready = reload(d)
        assert "STATUS=reload 1: 2 settings applied, 1 need a restart" in ready, ready
        s = c.stats()
        assert ram_tier(s)["capacity_bytes"] == cap
        assert s["placement"]["tag_codecs"] == {"kv": "zstd"}
        assert s["reload"]["last"]["restart_needed"] == {
            "ram_bytes": {"running": "64MiB", "configured": "128MiB"}
        }
        assert s["reload"]["last"]["applied"]["log_level"] == {"from": "info", "to": "debug"}
        assert "ram_bytes" not in s["reload"]["live"] and "predictor" in s["reload"]["live"]
    assert "ram_bytes changed ('64MiB' -> '128MiB') but takes a restart" in d.log()
    reload(d)  # the same file again: nothing new to apply, the restart still wanted
    with Client(str(d.socket)) as c:
        last = c.stats()["reload"]["last"]
        assert last["n"] == 2 and last["applied"] == {} and list(last["restart_needed"]) == ["ram_bytes"]
    write_config(cfg, ram_bytes="64MiB", tag_codecs="kv=zstd", log_level="debug")
    reload(d)
    assert "tierd.reload: no setting changed" in d.log()


def test_a_burst_of_sighups_is_coalesced_and_harmless(short_tmp: Path, start_daemon) -> None:
    cfg = short_tmp / "tierd.toml"
    write_config(cfg, ram_high_watermark=0.8, ram_low_watermark=0.6)
    d = start_daemon("--config", str(cfg))
    with Client(str(d.socket)) as c:
        c.put("burst/x", value(3))
        held = c.get("burst/x")
        write_config(cfg, ram_high_watermark=0.7, ram_low_watermark=0.6)
        for _ in range(50):
            os.kill(d.pid, signal.SIGHUP)
        # one reload at a time, one more for the signals that came during it: none is lost or doubled up
        wait_until(lambda: c.stats()["placement"]["ram_high_watermark"] == 0.7, 10, "the new watermark")
        last = c.stats()["reload"]["last"]
        assert last["error"] is None and 1 <= last["n"] <= 50
        assert bool((held == 3).all()) and c.stats()["leases"] == 1
        c.release(held)
    assert d.proc.poll() is None


def test_a_reload_opens_moves_and_closes_the_metrics_endpoint_and_changes_the_quota(
    short_tmp: Path, start_daemon
) -> None:
    import urllib.request

    cfg = short_tmp / "tierd.toml"
    write_config(cfg, ram_quota="100%")
    d = start_daemon("--config", str(cfg))
    with Client(str(d.socket)) as c:
        assert c.stats()["daemon"]["metrics_listen"] is None
        assert ram_tier(c.stats())["quota_bytes"] is None
        write_config(cfg, ram_quota="8MiB", metrics_listen="127.0.0.1:0")
        reload(d)
        s = c.stats()
        assert ram_tier(s)["quota_bytes"] == 8 * MIB
        addr = wait_until(lambda: c.stats()["daemon"]["metrics_listen"], what="the endpoint")
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            assert b"tierd_" in r.read()
        write_config(cfg, ram_quota="8MiB", metrics_listen="")
        reload(d)
        wait_until(lambda: c.stats()["daemon"]["metrics_listen"] is None, what="no endpoint")

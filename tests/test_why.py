"""``tierctl why KEY`` against a real daemon with a RAM and a disk tier: each part of the answer is
set up by a scripted workload and then read back, in JSON and as text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import wait_until
from tierd_client import Client, NotFound

KIB = 1 << 10


def tierctl(sock: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TIERD_SOCKET=str(sock))
    return subprocess.run(
        [sys.executable, "-m", "tierd_client.tierctl", *args], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip


def why(sock: Path, key: str) -> dict:
    r = tierctl(sock, "why", key, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_where_leases_pins_codec_and_older_versions(start_daemon) -> None:
    d = start_daemon("--tag-codecs", "kv=zstd", ram_bytes="32MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        c.put("w/a", np.ones(64 * KIB, dtype=np.float32), tags=["kv"])
        c.put("w/b", np.zeros(64 * KIB, dtype=np.float32))
        c.put("w/c", np.arange(64 * KIB, dtype=np.float32) / 4, codec="fp16")
        held = c.get("w/a")
        c.pin("w/b")
        c.evict("w/c")

        a = why(d.socket, "w/a")
        assert a["key"] == "w/a" and a["nbytes"] == 256 * KIB and a["tags"] == ["kv"]
        assert [loc["tier"] for loc in a["where"]] == ["ram"] and isinstance(a["where"][0]["offset"], int)
        me = {"name": os.path.basename(sys.argv[0]), "pid": os.getpid(), "uid": os.getuid()}
        assert a["leases"] == [{"client": c.client_id, "leases": 1, **me}]
        (ev,) = a["eviction"]
        assert ev["tier"] == "ram" and ev["policy"] == "auto" and ev["kept_because"] == "leased (1)"
        assert 1 <= ev["rank"] <= ev["of"] == 2  # w/a and w/b in RAM (w/c went down)
        tag_rule = "tag 'kv' -> zstd (when it is stored, if the codec suits it)"
        assert a["codec"] == {"codec": "zstd", "stored": False, "reason": tag_rule}
        assert a["prediction"]["predictor"] == "auto" and a["prediction"]["queued"] is None

        b = why(d.socket, "w/b")
        assert b["pinned"] == ["ram"] and b["eviction"][0]["kept_because"] == "pinned in ram"
        assert b["leases"] == []

        cc = why(d.socket, "w/c")
        assert cc["eviction"] == [] and [loc["tier"] for loc in cc["where"]] == ["disk"]
        assert cc["where"][0]["record"]["codec"] == "fp16"
        assert cc["codec"]["stored"] and cc["codec"]["codec"] == "fp16"
        assert cc["codec"]["reason"] == "requested by the put"
        assert cc["codec"]["ratio"] == 2.0 and cc["codec"]["error_bound"] > 0

        # a new version while the old one is leased: the old one is reported as still held
        c.put("w/a", np.full(64 * KIB, 2, dtype=np.float32), tags=["kv"])
        a2 = why(d.socket, "w/a")
        assert a2["version"] > a["version"] and a2["leases"] == []
        assert a2["older_versions"] == [{"version": a["version"], "leases": 1, "tiers": ["ram"]}]

        text = tierctl(d.socket, "why", "w/c")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].startswith("w/c v") and "float32 65536, 256.0 KiB" in lines[0]
        assert any(
            line.startswith("where:") and "disk (fp16, 128.0 KiB in 1 chunks)" in line for line in lines
        )
        assert any(line.startswith("eviction:") and "in no memory tier" in line for line in lines)
        assert any(line.startswith("codec:") and "requested by the put" in line for line in lines)
        held_text = tierctl(d.socket, "why", "w/b").stdout
        assert "pinned:     ram" in held_text and "kept: pinned in ram" in held_text
        c.release(held)

        missing = tierctl(d.socket, "why", "w/nothing")
        assert missing.returncode == 1 and "w/nothing" in missing.stderr
        bad = tierctl(d.socket, "why", "no-namespace")
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1
        try:
            c.why("w/nothing")
            raise AssertionError("why of a missing key answered")
        except NotFound:
            pass
    assert d.proc.poll() is None


def test_rank_follows_the_eviction_order(start_daemon) -> None:
    d = start_daemon(ram_bytes="32MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        for i in range(4):
            c.put(f"r/{i}", np.full(16 * KIB, i, dtype=np.float32))
        c.release(c.get("r/0"))  # r/0 is now the most recently used: r/1 is the coldest
        ranks = {k: why(d.socket, k)["eviction"][0] for k in ("r/0", "r/1", "r/2", "r/3")}
        assert [ranks[k]["rank"] for k in ("r/1", "r/2", "r/3", "r/0")] == [1, 2, 3, 4]
        assert ranks["r/1"]["next_victim"] and not ranks["r/0"]["next_victim"]
        assert all(r["kept_because"] is None for r in ranks.values())
        assert "next to be demoted" in tierctl(d.socket, "why", "r/1").stdout


def test_the_predictor_expects_the_next_key(start_daemon) -> None:
    d = start_daemon("--predictor", "sequence", ram_bytes="32MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        for i in range(3):
            c.put(f"s/{i}", np.full(16 * KIB, i, dtype=np.float32))
        for _ in range(3):  # a cycle the sequence predictor learns
            for i in range(3):
                c.release(c.get(f"s/{i}"))
        c.release(c.get("s/0"))

        def predicted() -> dict | None:
            return why(d.socket, "s/1")["prediction"]["last_prediction"]

        last = wait_until(predicted, 10, "a prediction of s/1")
        assert last["after"] == "s/0" and last["client"] == c.client_id and 0 < last["confidence"] <= 1
        assert last["seconds_ago"] >= 0
        text = tierctl(d.socket, "why", "s/1").stdout
        assert "prediction: predictor sequence; last predicted" in text and "after s/0" in text


def test_the_codec_reason_survives_a_restart(start_daemon) -> None:
    d = start_daemon(ram_bytes="32MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        c.put("p/z", np.zeros(64 * KIB, dtype=np.float32), durable=True, codec="zstd")
        before = c.why("p/z")["codec"]
    assert before["stored"] and before["reason"] == "requested by the put"
    d.stop()
    d = start_daemon(ram_bytes="32MiB", disk_bytes="64MiB")
    with Client(str(d.socket)) as c:
        after = c.why("p/z")
    assert [loc["tier"] for loc in after["where"]] == ["disk"]
    assert after["codec"] == before

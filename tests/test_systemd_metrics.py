"""systemd/tierd-metrics.conf: a valid drop-in that opens loopback only, within the exposure budget."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_systemd import ROOT, about_unit, analyze, installed_unit, needs_analyze, unit_settings
from tierd.exporter import parse_listen

DROPIN = ROOT / "systemd" / "tierd-metrics.conf"
MAX_EXPOSURE = 2.0  # measured 1.8 ("OK") with systemd 252 (the unit alone: 0.9)


def with_dropin(tmp: Path) -> Path:
    unit = installed_unit(tmp)
    d = tmp / "tierd.service.d"
    d.mkdir()
    (d / "tierd-metrics.conf").write_text(DROPIN.read_text())
    return unit


def test_dropin_opens_loopback_only() -> None:
    s = unit_settings(DROPIN.read_text())
    env = dict(v.split("=", 1) for v in s["Environment"])
    host, port = parse_listen(env["TIERD_METRICS_LISTEN"])  # the daemon accepts it: loopback
    assert host == "127.0.0.1" and port == 9464
    assert s["PrivateNetwork"] == ["no"]
    assert s["IPAddressAllow"] == ["localhost"]
    assert "IPAddressDeny" not in s  # the unit's IPAddressDeny=any stays in force
    assert "any" in unit_settings((ROOT / "systemd" / "tierd.service").read_text())["IPAddressDeny"]
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


@needs_analyze
def test_verify_with_the_dropin(tmp_path: Path) -> None:
    unit = with_dropin(tmp_path)
    r = analyze("verify", "--man=no", str(unit), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert about_unit(r.stderr) == [], r.stderr


@needs_analyze
def test_security_exposure_with_the_dropin(tmp_path: Path) -> None:
    unit = with_dropin(tmp_path)
    r = analyze("security", "--offline=yes", str(unit), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # the drop-in was read: the network lines changed
    assert re.search(r"✗ PrivateNetwork=", r.stdout), r.stdout
    assert "only localhost entries" in r.stdout, r.stdout
    m = re.search(r"Overall exposure level for tierd\.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout
    score = float(m.group(1))
    print(f"systemd-analyze security with tierd-metrics.conf: exposure {score} {m.group(2)}")
    assert score <= MAX_EXPOSURE, r.stdout

"""``tierd install-unit``: the unit written for this installation, where each manager looks for it.

Run as a user runs it (``python -m tierd install-unit``, a subprocess) with HOME and XDG dirs in a
temporary folder. The unit it writes must pass the checks tests/test_systemd.py applies to the
shipped one (``systemd-analyze verify`` with no complaint about it, the security exposure), with
ExecStart= naming the tierd beside this interpreter; every other line is the shipped unit's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tests.test_systemd import (
    MAX_EXPOSURE,
    UNIT,
    about_unit,
    analyze,
    needs_analyze,
    tierd_script,
    unit_settings,
)


def install_unit(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(tmp / "home"), XDG_CONFIG_HOME=str(tmp / "config"))
    return subprocess.run([sys.executable, "-m", "tierd", "install-unit", *args], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp)  # fmt: skip


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_user_unit_points_at_this_installation(tmp_path: Path) -> None:
    r = install_unit(tmp_path, "--user")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "tierd.service"
    assert files_under(tmp_path / "config") == [unit]
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    text = unit.read_text()
    assert unit_settings(text)["ExecStart"] == [tierd_script()]
    shipped = UNIT.read_text().splitlines()
    written = text.splitlines()
    assert len(shipped) == len(written)
    assert [a for a, b in zip(shipped, written, strict=True) if a != b] == [
        next(line for line in shipped if line.startswith("ExecStart="))
    ]
    out = r.stdout.splitlines()
    assert out[0] == f"wrote {unit}"
    assert "daemon-reload" in out[1]  # run where systemd runs, else the command to run
    assert "next: systemctl --user enable --now tierd" in out
    # again: nothing to change
    again = install_unit(tmp_path, "--user")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == f"unchanged {unit}"


def test_print_writes_nothing(tmp_path: Path) -> None:
    r = install_unit(tmp_path, "--user", "--print")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "tierd.service"
    assert r.stdout.startswith(f"# {unit}\n")
    assert f"\nExecStart={tierd_script()}\n" in r.stdout and "[Install]" in r.stdout
    assert files_under(tmp_path) == []


def test_system_unit_and_the_next_command(tmp_path: Path) -> None:
    target = tmp_path / "etc"
    r = install_unit(tmp_path, "--system", "--unit-dir", str(target))
    assert r.returncode == 0, r.stderr
    assert files_under(target) == [target / "tierd.service"]
    assert "next: systemctl enable --now tierd" in r.stdout.splitlines()
    printed = install_unit(tmp_path, "--system", "--print")
    assert printed.stdout.startswith("# /etc/systemd/system/tierd.service\n")


@pytest.mark.parametrize("flag", ["gpu", "metrics"])
def test_drop_ins_when_shipped_and_a_note_when_not(tmp_path: Path, flag: str) -> None:
    name = f"tierd-{flag}.conf"
    ships = (resources.files("tierd.systemd") / name).is_file()
    assert ships == (UNIT.parent / name).is_file()  # the package data is the checkout's systemd/
    r = install_unit(tmp_path, "--user", f"--{flag}")
    assert r.returncode == 0, r.stderr
    user = tmp_path / "config" / "systemd" / "user"
    if ships:
        drop_in = user / "tierd.service.d" / name
        assert files_under(user) == sorted([user / "tierd.service", drop_in])
        assert drop_in.read_text() == (UNIT.parent / name).read_text()
        assert r.stderr == ""
    else:
        assert files_under(user) == [user / "tierd.service"]
        note = f"this tierd ships no {name} (--{flag}): the unit is installed without it"
        assert r.stderr == f"tierd install-unit: {note}\n"


def test_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    r = install_unit(tmp_path, "--unit-dir", str(blocked / "sub"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot write" in r.stderr, r.stderr
    both = install_unit(tmp_path, "--user", "--system")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "tierd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "install-unit" in help_.stdout


@needs_analyze
def test_the_written_unit_passes_verify_and_security(tmp_path: Path) -> None:
    r = install_unit(tmp_path, "--user")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "tierd.service"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    v = analyze("--user", "verify", "--man=no", str(unit), env=env, cwd=tmp_path)
    assert v.returncode == 0 and about_unit(v.stderr) == [], v.stderr
    s = analyze("security", "--offline=yes", str(unit), cwd=tmp_path)
    m = re.search(r"Overall exposure level for tierd\.service: ([0-9.]+)", s.stdout)
    assert m and float(m.group(1)) < MAX_EXPOSURE, s.stdout

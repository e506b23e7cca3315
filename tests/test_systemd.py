"""systemd/tierd.service is a valid unit, its sandbox is tight, and the daemon runs inside it.

systemd cannot run here (PID 1 is not systemd), so the unit is checked three ways: ``systemd-analyze
verify`` (which reports bad values on stderr and still exits 0), ``systemd-analyze security
--offline=yes`` (the exposure score), and an strace of a real daemon serving a client, compared with
what the unit's SystemCallFilter=, RestrictAddressFamilies= and MemoryDenyWriteExecute= allow.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tierd import config, launch

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tierd.service"
EXAMPLE = ROOT / "systemd" / "tierd.toml.example"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
MAX_EXPOSURE = 1.5  # measured 0.9 ("SAFE") with systemd 252


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every Key=value of a unit file, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


SETTINGS = unit_settings(UNIT.read_text())


def tierd_script() -> str:
    """The installed `tierd` console script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "tierd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("tierd")
    if found is None:
        pytest.fail("the tierd console script is not installed (pip install -e .)")
    return found


def installed_unit(tmp: Path) -> Path:
    """The unit as a user installs it: ExecStart= pointing at the real console script."""
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={tierd_script()}", UNIT.read_text())
    path = tmp / "tierd.service"
    path.write_text(text)
    return path


def analyze(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=30, env=env, cwd=cwd)


def about_unit(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "tierd" in line]


# -- verify ---------------------------------------------------------------------------------------


@needs_analyze
def test_verify_system_unit(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    r = analyze("verify", "--man=no", str(unit), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert about_unit(r.stderr) == [], r.stderr


@needs_analyze
def test_verify_user_unit(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    unit = installed_unit(tmp_path)
    r = analyze("--user", "verify", "--man=no", str(unit), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert about_unit(r.stderr) == [], r.stderr


@needs_analyze
def test_verify_as_shipped_only_misses_the_binary(tmp_path: Path) -> None:
    """Unmodified, the only complaint may be that /usr/local/bin/tierd is not installed here."""
    shutil.copy(UNIT, tmp_path / "tierd.service")
    r = analyze("verify", "--man=no", str(tmp_path / "tierd.service"), cwd=tmp_path)
    complaints = about_unit(r.stderr)
    if Path(SETTINGS["ExecStart"][0]).exists():
        assert complaints == [], r.stderr
    else:
        assert complaints, "verify should notice the missing ExecStart binary"
        assert all("is not executable" in c and SETTINGS["ExecStart"][0] in c for c in complaints), r.stderr


@needs_analyze
def test_gpu_drop_in_opens_the_nvidia_devices_only(tmp_path: Path) -> None:
    """systemd/tierd-gpu.conf parses, applies over the unit and keeps the exposure low."""
    unit = installed_unit(tmp_path)
    (tmp_path / "tierd.service.d").mkdir()
    shutil.copy(UNIT.parent / "tierd-gpu.conf", tmp_path / "tierd.service.d" / "tierd-gpu.conf")
    r = analyze("verify", "--man=no", str(unit), cwd=tmp_path)
    assert r.returncode == 0 and about_unit(r.stderr) == [], r.stderr
    r = analyze("security", "--offline=yes", str(unit), cwd=tmp_path)
    assert "tierd-gpu.conf" not in r.stderr, r.stderr  # no value it could not parse
    marked = [line for line in r.stdout.splitlines() if line.startswith(("✓", "✗"))]
    rows = {line.split()[1].rstrip("="): line for line in marked}
    assert rows["PrivateDevices"].startswith("✗")  # the drop-in applied
    assert "char-nvidia*:rw" in rows["DeviceAllow"]
    exposure = float(re.search(r"Overall exposure level for tierd.service: ([\d.]+)", r.stdout)[1])
    assert exposure <= MAX_EXPOSURE + 0.5, r.stdout


@needs_analyze
def test_security_exposure(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    r = analyze("security", "--offline=yes", str(unit), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"Overall exposure level for tierd\.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout
    score = float(m.group(1))
    print(f"systemd-analyze security: exposure {score} {m.group(2)}")
    assert score < MAX_EXPOSURE, r.stdout


# -- the unit agrees with the daemon ---------------------------------------------------------------


def test_unit_matches_the_daemon() -> None:
    one = {k: v[-1] for k, v in SETTINGS.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["KillSignal"] == "SIGTERM"
    # SIGHUP reloads the settings (tests/test_reload.py)
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["WatchdogSec"] == "30"
    assert one["RuntimeDirectory"] == "tierd"
    assert one["StateDirectory"] == "tierd"
    assert "TIERD_SOCKET=%t/tierd/tierd.sock" in SETTINGS["Environment"]
    # the daemon's "bad configuration" exit status is not worth a restart loop
    assert one["RestartPreventExitStatus"] == "2"
    # SIGTERM drains for graceful_timeout: systemd must wait longer than that before SIGKILL
    assert float(one["TimeoutStopSec"]) > config.Config().graceful_timeout
    assert one["RestrictAddressFamilies"] == "AF_UNIX"
    assert one["MemoryDenyWriteExecute"] == "yes"
    assert one["WantedBy"]


def test_example_config_has_every_setting_and_loads() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert sorted(data) == sorted(config.SETTINGS)
    text = EXAMPLE.read_text()
    for name in config.SETTINGS:  # each with a comment line right above it
        lines = text.splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
        assert lines[i - 1].startswith("#"), f"{name} has no comment"
    cfg = config.load(["--config", str(EXAMPLE)], {})
    assert {k: getattr(cfg, k) for k in config.SETTINGS} == {
        k: getattr(config.Config(), k) for k in config.SETTINGS
    }
    cfg.validate()


# -- the sandbox lets the daemon do its work --------------------------------------------------------


@functools.cache
def _expand(group: str) -> frozenset[str]:
    """System calls in a systemd syscall-filter group (nested groups expanded)."""
    r = analyze("syscall-filter", group)
    assert r.returncode == 0, r.stderr
    names: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        word = line.split("#")[0].strip()
        if not word:
            continue
        if word.startswith("@"):
            names |= _expand(word)
        else:
            names.add(word)
    return frozenset(names)


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines allow, applied in order as systemd does."""
    allowed: set[str] = set()
    for i, value in enumerate(SETTINGS["SystemCallFilter"]):
        deny = value.startswith("~")
        assert i > 0 or not deny, "this check expects an allow list first"
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _expand(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_daemon_fits_the_sandbox(short_tmp: Path) -> None:
    from tierd_client import Client

    trace = short_tmp / "trace"
    try:
        d = launch.start(
            short_tmp / "tierd.sock",
            "--state-dir",
            str(short_tmp / "state"),
            ram_bytes="16MiB",
            log_path=short_tmp / "tierd.log",
            timeout=20,
            prefix=["strace", "-f", "-qq", "-o", str(trace)],
        )
    except launch.LaunchError as e:
        if "ptrace" in str(e) or "Operation not permitted" in str(e):
            pytest.skip(f"strace cannot trace here: {e}")
        raise
    try:
        with Client(str(d.socket)) as c:
            c.put("sandbox/x", np.arange(4096, dtype=np.float32), tags=["t"], ttl=60)
            t = c.get("sandbox/x")
            assert float(t.sum()) == float(np.arange(4096, dtype=np.float32).sum())
            c.release(t)
            assert c.ls("sandbox/")
            c.stats()
            c.delete("sandbox/x")
    finally:
        # strace does not pass SIGTERM on: signal the daemon itself, as systemd would (MAINPID=)
        mainpid = int(re.search(r"^MAINPID=(\d+)$", d.messages[0], re.M).group(1))
        os.kill(mainpid, signal.SIGTERM)
        d.proc.wait(10)
        rc = d.stop()
    assert rc == 0, d.log()
    calls = []
    for line in trace.read_text().splitlines():
        m = re.match(r"\d+\s+([a-z_0-9]+)\(", line)
        if m:
            calls.append((m.group(1), line))
    used = {name for name, _ in calls}
    assert {"memfd_create", "accept4", "sendmsg"} <= used, sorted(used)
    # SystemCallFilter=: every system call the daemon made is allowed (execve of the interpreter too)
    assert used - allowed_syscalls() == set()
    # RestrictAddressFamilies=AF_UNIX
    families = {re.search(r"socket\((AF_\w+)", line).group(1) for name, line in calls if name == "socket"}
    assert families == {"AF_UNIX"}
    # MemoryDenyWriteExecute=yes: no writable+executable mapping, no mprotect adding PROT_EXEC
    for name, line in calls:
        if name in ("mmap", "mprotect", "pkey_mprotect"):
            assert not ("PROT_WRITE" in line and "PROT_EXEC" in line), line
            assert not (name != "mmap" and "PROT_EXEC" in line), line

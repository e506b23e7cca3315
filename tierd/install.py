"""``tierd install-unit``: install the systemd unit for this very installation of tierd.

The unit (``systemd/tierd.service``, shipped as package data of ``tierd.systemd``) names the daemon
with ``ExecStart=``; here it is rewritten to the ``tierd`` console script beside the running
interpreter (``sys.executable``, a virtual environment's ``bin/`` included, not resolved through
symlinks, which would leave the venv), else the one on PATH, else ``python -m tierd``. Then:

- ``--user`` (the default, except for root): ``$XDG_CONFIG_HOME/systemd/user`` (``~/.config/...``);
  ``--system``: ``/etc/systemd/system``; ``--unit-dir`` overrides either;
- drop-ins asked for (``--gpu``: ``tierd-gpu.conf``, ``--metrics``: ``tierd-metrics.conf``) go to
  ``tierd.service.d/`` next to the unit, when this installation ships them (a note otherwise);
- files are written atomically (a temporary file, then rename), mode 0644;
- ``systemctl [--user] daemon-reload`` runs where systemd runs (``/run/systemd/system`` exists, as
  sd_booted(3) checks, and ``systemctl`` is on PATH); its failure is reported, not fatal;
- the next command is printed: ``systemctl --user enable --now tierd``.

``--print`` shows each file (path, then content) and changes nothing. Exit status: 0 done, 2 a
problem the user must fix (a directory that cannot be written, the unit missing from the package).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

UNIT = "tierd.service"
#: the drop-ins a flag asks for, by flag
DROP_INS = {"gpu": "tierd-gpu.conf", "metrics": "tierd-metrics.conf"}


class InstallError(Exception):
    """Something the user must fix; the message says what (exit status 2)."""


@dataclass(frozen=True)
class File:
    path: Path
    text: str


def shipped(name: str) -> str | None:
    """A file of systemd/ as this installation ships it (package data), or None if it has none."""
    item = resources.files("tierd.systemd") / name
    return item.read_text(encoding="utf-8") if item.is_file() else None


def tierd_command() -> str:
    """How systemd should start this installation's daemon (an ExecStart= value)."""
    beside = Path(sys.executable).parent / "tierd"  # not resolved: a venv's python is a symlink
    if beside.is_file() and os.access(beside, os.X_OK):
        return _quote(str(beside))
    found = shutil.which("tierd")
    if found is not None:
        return _quote(os.path.abspath(found))
    return f"{_quote(sys.executable)} -m tierd"


def _quote(path: str) -> str:
    """A path as one ExecStart= word: % doubled (systemd specifiers), quoted if it has blanks."""
    path = path.replace("%", "%%")
    return f'"{path}"' if re.search(r"\s", path) else path


def unit_dir(system: bool, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if system:
        return Path("/etc/systemd/system")
    config = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(config) / "systemd" / "user"


def plan(directory: Path, drop_ins: list[str], exec_start: str) -> tuple[list[File], list[str]]:
    """The files to write, and a note for each drop-in asked for that this installation lacks."""
    unit = shipped(UNIT)
    if unit is None:
        raise InstallError(f"this installation ships no {UNIT} (package data of tierd.systemd is missing)")
    text, n = re.subn(r"(?m)^ExecStart=.*$", lambda _: f"ExecStart={exec_start}", unit)
    if n != 1:
        raise InstallError(f"the shipped {UNIT} has {n} ExecStart= lines, not one")
    files = [File(directory / UNIT, text)]
    notes = []
    for flag in drop_ins:
        name = DROP_INS[flag]
        content = shipped(name)
        if content is None:
            notes.append(f"this tierd ships no {name} (--{flag}): the unit is installed without it")
        else:
            files.append(File(directory / f"{UNIT}.d" / name, content))
    return files, notes


def write(f: File) -> bool:
    """Write ``f`` atomically; returns whether it changed anything."""
    if f.path.is_file() and f.path.read_text(encoding="utf-8") == f.text:
        return False
    f.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.path.parent, prefix=f".{f.path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f.text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, f.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def systemd_running() -> bool:
    """Whether this machine booted with systemd (sd_booted(3)) and has systemctl."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def daemon_reload(user: bool) -> str:
    """Run ``systemctl [--user] daemon-reload``; a line saying what happened."""
    cmd = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
    shown = " ".join(cmd)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{shown}` failed ({e}): run it yourself"
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return f"`{shown}` failed ({why}): run it yourself"
    return f"ran `{shown}`"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierd install-unit",
        description=(
            "Install systemd/tierd.service with ExecStart= pointing at this installation's tierd "
            f"({tierd_command()}), run `systemctl daemon-reload` where systemd runs, and print the "
            "command that starts it."
        ),
        epilog="Exit status: 0 installed (or printed), 2 a problem to fix (a directory you cannot write).",
    )
    who = p.add_mutually_exclusive_group()
    user_help = "a user service in $XDG_CONFIG_HOME/systemd/user (the default, except for root)"
    who.add_argument("--user", action="store_true", help=user_help)
    system_help = "a system service in /etc/systemd/system (needs root; the default for root)"
    who.add_argument("--system", action="store_true", help=system_help)
    p.add_argument("--print", action="store_true", dest="show",
                   help="show the files (path, then content) instead of writing them")  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="add the GPU drop-in (tierd-gpu.conf), if shipped")
    p.add_argument("--metrics", action="store_true",
                   help="add the metrics listener drop-in (tierd-metrics.conf), if shipped")  # fmt: skip
    p.add_argument("--unit-dir", metavar="DIR", help="write here instead of the manager's unit directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    system = args.system or (not args.user and os.geteuid() == 0)
    directory = Path(args.unit_dir) if args.unit_dir else unit_dir(system)
    drop_ins = [flag for flag in DROP_INS if getattr(args, flag)]
    try:
        files, notes = plan(directory, drop_ins, tierd_command())
    except InstallError as e:
        print(f"tierd install-unit: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"tierd install-unit: {note}", file=sys.stderr)
    if args.show:
        for f in files:
            print(f"# {f.path}")
            print(f.text, end="" if f.text.endswith("\n") else "\n")
        return 0
    for f in files:
        try:
            changed = write(f)
        except OSError as e:
            hint = " (run it as root, or use --user)" if system else ""
            print(f"tierd install-unit: cannot write {f.path}: {e.strerror}{hint}", file=sys.stderr)
            return 2
        print(f"{'wrote' if changed else 'unchanged'} {f.path}")
    manager = "" if system else " --user"
    if args.unit_dir:
        print(f"(--unit-dir: not reloading systemd; `systemctl{manager} daemon-reload` once it is in place)")
    elif systemd_running():
        print(daemon_reload(user=not system))
    else:
        print(f"systemd is not running here: run `systemctl{manager} daemon-reload` where it is")
    print(f"next: systemctl{manager} enable --now tierd")
    if not system:
        print("      (and `loginctl enable-linger $USER` to keep it running while you are logged out)")
    return 0

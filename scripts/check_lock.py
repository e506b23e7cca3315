"""Check that this Python environment holds exactly what requirements.lock names (setup.sh runs it last).

Every locked package must be installed at its locked version, as this interpreter sees it (a package of
the system's site-packages shadowed by the venv's counts as the venv's), and torch must import. Exit 1
with one line per difference. Packages the lock does not name (the system's own) are not checked:
their requirements are the system's business.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name


def locked(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def main() -> int:
    lock = Path(sys.argv[1] if len(sys.argv) > 1 else "requirements.lock")
    pins = locked(lock)
    wrong = []
    for name, version in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (locked {version})")
            continue
        if have != version:
            wrong.append(f"{name}: {have} installed, {version} locked")
    try:
        import torch
    except ImportError as e:
        wrong.append(f"torch: does not import ({e})")
    else:
        print(f"check_lock: {len(pins)} locked packages at their versions; torch {torch.__version__}")
    for w in wrong:
        print(f"check_lock: {w}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

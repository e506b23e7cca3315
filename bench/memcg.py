"""A memory cgroup (v1) for the benchmarks that run a daemon and a model process under one RAM
limit (bench_qwen3vl.py, bench_finetune.py): page cache and both processes count against it, as on a
small machine. Needs root and /sys/fs/cgroup/memory (see /work/shared/MACHINE.md)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CG_ROOT = Path("/sys/fs/cgroup/memory")


class Cgroup:
    def __init__(self, name: str) -> None:
        self.path = CG_ROOT / name
        self.path.mkdir()

    def set(self, f: str, v: int | str) -> None:
        (self.path / f).write_text(str(v))

    def get(self, f: str) -> str:
        return (self.path / f).read_text()

    def prefix(self) -> list[str]:
        """A command prefix that moves the command into this group before it starts."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def oom_kills(self) -> int:
        for line in self.get("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        """Kill what is left in the group (only our own children are ever put there) and remove it."""
        for _ in range(50):
            for p in self.get("cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(p), 9)
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

"""scripts/import_graph.py: the repository has no import cycle, and a cycle of any kind of import
(top level, lazy, TYPE_CHECKING, relative, across packages) is found and named."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "import_graph.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def tree(root: Path, files: dict[str, str]) -> Path:
    for folder in ("tierd", "client", "model_integration"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").touch()
    for rel, src in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    return root


def test_the_repository_has_no_import_cycle() -> None:
    r = run()
    assert r.returncode == 0, r.stderr
    assert "no import cycles" in r.stdout
    # the graph is printed, under the import names the packages install as
    assert "tierd.connection -> " in r.stdout and "tierd_client.aio -> " in r.stdout
    assert "tierd.server" not in r.stdout.split("tierd.connection -> ")[1].splitlines()[0]


def test_a_cycle_through_lazy_and_type_checking_imports_is_named(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "tierd/a.py": "from tierd import b\n",
        "tierd/b.py": "def f():\n    from tierd.c import g\n",  # lazy
        "tierd/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",
        "tierd/ok.py": "import tierd.a\n",
    })  # fmt: skip
    r = run("--quiet", "--root", str(root))
    assert r.returncode == 1
    assert "tierd.a -> tierd.b -> tierd.c -> tierd.a" in r.stderr


def test_a_cycle_across_packages_and_a_package_reexport_that_is_not_one(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        # a package whose __init__ re-exports its submodule is not a cycle with it
        "tierd/predict/__init__.py": "from tierd.predict.base import make\n",
        "tierd/predict/base.py": "from tierd.predict.log import Access\n",
        "tierd/predict/log.py": "",
    })  # fmt: skip
    assert run("--root", str(root)).returncode == 0
    (root / "client" / "x.py").write_text("from tierd_integration import y\n")
    (root / "model_integration" / "y.py").write_text("import tierd_client.x\n")
    r = run("--root", str(root))
    assert r.returncode == 1
    assert "tierd_client.x -> tierd_integration.y -> tierd_client.x" in r.stderr

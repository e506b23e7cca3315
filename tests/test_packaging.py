"""What a user's install gets: the daemon and the client without the model extra, and a lock that matches.

A daemon-only machine installs ``tierd`` with no extras: transformers and safetensors must not come
with it, and nothing the daemon or the client imports may need them. These tests check the built
wheel's own metadata, import every daemon and client module in a fresh interpreter, and run
``tierd --help`` / ``tierctl --help`` / ``tierctl import`` in an interpreter where the model extra's
packages cannot be imported (as in a venv without them), all offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
MODEL_EXTRA = {"transformers", "safetensors"}

# Runs before the code under test: the model extra's packages behave as if not installed.
HIDE_MODEL_EXTRA = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"transformers", "safetensors"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built from a copy of the sources, so the build leaves nothing (build/, *.egg-info) in the checkout
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tierd", "client", "model_integration", "systemd"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-qq", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-w", str(out), "."], cwd=src, check=True, timeout=300)
    (whl,) = out.glob("tierd-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel_metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def test_the_wheel_ships_the_unit_and_install_unit_finds_it(wheel: Path, tmp_path: Path) -> None:
    """An installed copy (the wheel unpacked, first on the path: no checkout behind it) finds its unit."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    shipped = {p.name for p in (ROOT / "systemd").iterdir() if p.suffix in (".service", ".conf", ".example")}
    assert {f"tierd/systemd/{n}" for n in shipped} <= names, sorted(names)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HOME": str(tmp_path / "home")}
    code = "import sys, tierd; print(tierd.__file__); sys.argv[1:] = ['install-unit', '--user', '--print']\n"
    code += "from tierd.server import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(tmp_path / "site" / "tierd" / "__init__.py")), r.stdout
    assert "\n[Unit]\n" in r.stdout and "\nExecStart=" in r.stdout


def _extra(req: Requirement) -> str | None:
    if req.marker is None:
        return None
    for extra in ("model", "test", "bench"):
        if req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            return extra
    return None


def test_a_plain_install_does_not_pull_the_model_extra(wheel_metadata: list[Requirement]) -> None:
    plain = {canonicalize_name(r.name) for r in wheel_metadata if _extra(r) is None}
    assert "torch" in plain and "lmdb" in plain
    assert not plain & MODEL_EXTRA, f"the daemon's install pulls {plain & MODEL_EXTRA}"
    assert not plain & {"ray", "accelerate", "pytest"}
    model = {canonicalize_name(r.name) for r in wheel_metadata if _extra(r) == "model"}
    assert model == MODEL_EXTRA
    bench = {canonicalize_name(r.name) for r in wheel_metadata if _extra(r) == "bench"}
    assert bench == {"ray", "accelerate"}


def test_no_daemon_or_client_module_imports_the_model_extra() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import tierd, tierd_client
        for pkg in (tierd, tierd_client):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not m.name.endswith(".__main__"):  # that one runs the program
                    importlib.import_module(m.name)
        loaded = sorted({m.partition(".")[0] for m in sys.modules} & {"transformers", "safetensors",
                        "tierd_integration", "accelerate", "ray"})
        print(loaded)
        """
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"imported by the daemon or the client: {r.stdout}"


@pytest.mark.parametrize("entry", ["tierd.server", "tierd_client.tierctl"])
def test_help_works_without_the_model_extra(entry: str) -> None:
    code = f"import sys\nsys.argv = ['x', '--help']\nfrom {entry} import main\nmain()"
    r = _python(HIDE_MODEL_EXTRA + code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:"), r.stdout


def test_the_integration_names_the_extra_it_needs() -> None:
    r = _python(HIDE_MODEL_EXTRA + "import tierd_integration")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "pip install 'tierd[model]'" in last, r.stderr


def test_tierctl_import_names_the_extra_it_needs(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    code = HIDE_MODEL_EXTRA + "import sys\nfrom tierd_client.tierctl import main\nsys.exit(main())"
    r = _python(code, "--socket", str(tmp_path / "none.sock"), "import", str(tmp_path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "tierd[model]" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_lock_covers_every_declared_dependency() -> None:
    """requirements.lock pins a version inside every range pyproject.toml declares (all extras): a range
    changed without `make lock` fails here, not on a fresh machine."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for reqs in project["optional-dependencies"].values():
        declared += [Requirement(r) for r in reqs]
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line[:1].isalnum() and "==" in line:
            name, _, rest = line.partition("==")
            pins[canonicalize_name(name)] = rest.split()[0]
    torch_pin = (ROOT / "scripts" / "torch.pin").read_text().strip()
    pins.setdefault("torch", torch_pin.partition("==")[2])
    linux = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    for req in declared:
        if req.marker is not None and not Marker(str(req.marker)).evaluate(linux):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is declared but not locked: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req} is declared but {name}=={pins[name]} is locked: run make lock"
        )

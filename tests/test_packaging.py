"""What ships: the runtime wheel holds the product (router, engine, operator, dashboards, the shared
core) mapped into ``kvstack.*``, and nothing of the test harness; the repository holds no symlink."""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _package_folder(package: str) -> Path:
    """The folder ``package`` is built from, by the longest package-dir prefix (as setuptools maps it)."""
    mapping: dict[str, str] = SETUPTOOLS["package-dir"]
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[cut:])
    raise AssertionError(f"{package} is not under any package-dir entry")


def test_no_symlink_is_tracked() -> None:
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert [line for line in staged.stdout.splitlines() if line.startswith("120000")] == []


def test_every_folder_with_python_is_a_listed_package() -> None:
    # setuptools cannot discover mapped folders, so a new subpackage must be named in pyproject.toml.
    listed = set(SETUPTOOLS["packages"])
    for package in listed:
        assert _package_folder(package).is_dir(), package
    roots = {ROOT / folder for folder in SETUPTOOLS["package-dir"].values()}
    found = set()
    for root in roots:
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            folder = path.parent
            for package in listed:
                if _package_folder(package) == folder:
                    found.add(folder)
                    break
            else:
                raise AssertionError(f"{path.relative_to(ROOT)} is in no listed package")
    assert found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("kvstack-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_the_product_and_no_test_harness(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "kvstack/router/proxy.py",
        "kvstack/router/policies/cache_aware.py",
        "kvstack/engine/sim/server.py",
        "kvstack/operator/handlers.py",
        "kvstack/operator/crds/kvstack.dev_kvstacks.yaml",
        "kvstack/dashboards/json/router.json",
        "kvstack/dashboards/rules/kvstack.rules.yaml",
        "kvstack/common/errors.py",
        "kvstack/py.typed",
    ):
        assert module in names, module
    assert "kvstack/operator/__init__.py" not in names  # kvstack.operator stays a namespace portion
    if os.environ.get("KVSTACK_REQUIRE_NATIVE") == "1":  # make unit: the compiled relay must ship
        assert "kvstack/router/_relay.abi3.so" in names and "kvstack/router/_relay.pyi" in names
        assert "-cp311-abi3-" in wheel.name  # one build for the GPU machines' CPython 3.12 too
    assert not [n for n in names if "testing" in n.split("/")[0:2] or n.startswith("kvstack_testing")]
    assert not [n for n in names if n.startswith(("tests/", "router/", "operator/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = (
        email.parser.Parser()
        .parsestr(zipfile.ZipFile(wheel).read(metadata).decode())
        .get_all("Requires-Dist")
    )
    assert requires is not None
    plotting = [r for r in requires if r.startswith("matplotlib")]
    assert plotting and all('extra == "bench"' in r for r in plotting)  # only behind kvstack[bench]


@pytest.mark.slow
def test_the_installed_wheel_runs_the_router_and_the_operator(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    # -S: no site hooks, so the checkout's editable finder stays out; the dependencies come from this
    # environment's site-packages, the kvstack package only from the wheel.
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    probe = (
        "import kvstack, kvstack.router.app, kvstack.operator.handlers, kvstack.engine.sim.server, operator;"
        "import importlib.util as u;"
        "print(kvstack.__file__); print(operator.__file__); print(u.find_spec('kvstack_testing'))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert not out[1].startswith(str(target))  # the stdlib's operator, not ours
    for command in (["router", "--help"], ["operator", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-S", "-m", "kvstack", *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Usage" in proc.stdout

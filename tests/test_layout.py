"""The repository layout: product folders import under kvstack.*, and nothing shadows the stdlib."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_operator_folder_never_shadows_stdlib_operator() -> None:
    # -S skips site, so the stdlib operator is not preloaded; cwd is the repo root, first on sys.path.
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not out.startswith(str(ROOT)), out
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_product_folders_import_under_kvstack() -> None:
    import kvstack.engine.cli
    import kvstack.operator.cli
    import kvstack.router.cli

    for mod, folder in (
        (kvstack.engine.cli, "engine"),
        (kvstack.router.cli, "router"),
        (kvstack.operator.cli, "operator"),
    ):
        assert Path(mod.__file__).resolve().parent == ROOT / folder


# Spelt in pieces so this file does not name them itself.
_OUTSIDE = ("../" + "shared", "shared/" + "reference", "shared/" + "research", "shared/" + "gpu")


def test_nothing_reads_or_cites_anything_beside_the_repository() -> None:
    # A clone with nothing beside it must pass `make test`: reference facts live in tests/reference.
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    offenders = []
    for name in filter(None, tracked):
        path = ROOT / name
        if name.startswith("bench-results/") and path.suffix not in {".md", ".py"}:
            continue  # recorded run logs quote the machines' own paths
        if not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if any(marker in text for marker in _OUTSIDE):
            offenders.append(name)
    assert offenders == [], offenders
    assert (ROOT / "tests" / "reference" / "README.md").is_file()

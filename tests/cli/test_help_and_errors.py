"""Every help page reads at 80 columns, and expected failures end in one line, never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from kvstack.cli import app

KVSTACK = str(Path(sys.executable).with_name("kvstack"))


# typer renders with its own copy of click, so commands and options are matched by shape, not class
def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, group
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KVSTACK, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_every_command_is_checked() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"up", "router", "operator", "engine sim", "engine serve", "bench routing", "version"} <= names


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "kvstack")
def test_help_reads_at_80_columns(path: tuple[str, ...]) -> None:
    out = _run([*path, "--help"], env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("Usage: kvstack"), text
    for line in text.splitlines():
        assert len(line) <= 80, f"wider than 80 columns: {line!r}"
        assert "…" not in line, f"a truncated name: {line!r}"
        assert not re.search(r"\w-$", line), f"a word broken at its hyphen: {line!r}"
    # each option's first column: its names (all whole) and, if it takes a value, a metavar
    firsts = [ln.strip().split("  ")[0] for ln in text.splitlines() if ln.startswith("  -")]
    by_names = {frozenset(re.findall(r"(?<![\w<])-{1,2}\w[\w-]*", first)): first for first in firsts}
    for param in COMMANDS[path].params:
        if param.param_type_name != "option" or param.hidden:
            continue
        first = by_names.get(frozenset([*param.opts, *param.secondary_opts]))
        assert first is not None, f"{param.opts} not shown whole:\n{text}"
        if param.is_flag:  # a flag takes no value: no <bool> (or any) metavar after its names
            assert "<" not in first, first
        else:
            assert re.search(r" <[^>]+>$", first), f"no metavar: {first}"
    assert "<bool>" not in text


def _one_line_failure(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def path_with_only(tmp_path: Path) -> Iterator[Callable[..., dict[str, str]]]:
    """A PATH with only the named programs of this machine (a missing-binary machine, for real)."""

    def make(*keep: str) -> dict[str, str]:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        for program in keep:
            found = shutil.which(program)
            if found is None:
                pytest.skip(f"{program} is not installed")
            (bin_dir / program).symlink_to(found)
        return {"PATH": str(bin_dir)}

    yield make


def test_up_without_prometheus_installed(
    path_with_only: Callable[..., dict[str, str]], unused_port: int
) -> None:
    env = path_with_only("redis-server")
    out = _run(["up", "--prometheus", "--port", str(unused_port)], env=env)
    _one_line_failure(out, 2, "kvstack up: prometheus not found on PATH", "make sysdeps")


def test_up_without_redis_installed_names_the_way_out(
    path_with_only: Callable[..., dict[str, str]], unused_port: int
) -> None:
    out = _run(["up", "--port", str(unused_port)], env=path_with_only())
    _one_line_failure(out, 2, "redis-server not found on PATH", "--no-lmcache")


def test_up_on_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run(["up", "--port", str(port), "--no-lmcache"])
    _one_line_failure(out, 2, f"port {port} on 127.0.0.1 is in use", "--port")


@pytest.mark.parametrize(
    ("command", "content", "needle"),
    [
        (["router", "--config"], "port: [8000\n", "expected ',' or ']'"),
        (["router", "--config"], None, "No such file or directory"),
        (["engine", "sim", "--config"], "a: b: c\n", "line 1, column 5"),
        (["engine", "serve", "-c"], "- a\n", "must hold a mapping"),
        (["router", "--config"], "bogus: 1\n", "bogus"),
    ],
)
def test_bad_config_file(tmp_path: Path, command: list[str], content: str | None, needle: str) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    out = _run([*command, str(path)])
    _one_line_failure(out, 2, str(path) if content != "bogus: 1\n" else "bogus", needle)


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}"}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
current-context: c
users: [{{name: u, user: {{token: x}}}}]
"""
    )
    return path


def test_operator_with_an_unreachable_cluster(tmp_path: Path, unused_port: int) -> None:
    kubeconfig = _kubeconfig(tmp_path, f"https://127.0.0.1:{unused_port}")
    out = _run(["operator", "--kubeconfig", str(kubeconfig)])
    _one_line_failure(out, 2, f"cannot reach the Kubernetes API at https://127.0.0.1:{unused_port}")


def test_operator_with_a_missing_kubeconfig(tmp_path: Path) -> None:
    out = _run(["operator", "--kubeconfig", str(tmp_path / "none")])
    _one_line_failure(out, 2, "kubeconfig", "No such file or directory")


@pytest.mark.parametrize(
    "command",
    [["router", "--engine", "http://127.0.0.1:9"], ["engine", "sim"]],
    ids=["router", "engine sim"],
)
def test_a_server_on_a_port_in_use(command: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run([*command, "--port", str(port)])
    assert out.returncode != 0
    line = _one_line_failure(out, out.returncode)
    assert "address already in use" in line.lower()


def test_a_child_that_fails_to_start_is_reported_without_a_traceback(tmp_path: Path) -> None:
    """A benchmark's simulator refuses its settings: the command says so (with the child's own
    last log lines) and exits 1."""
    args = ["bench", "routing", "--quick", "--workload", "multi_round_qa", "--policy", "cache_aware"]
    out = _run([*args, "--num-gpu-blocks", "64", "--out", str(tmp_path)], timeout=120)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith("error: sim0 exited with 2"), out.stderr
    assert "num_gpu_blocks" in out.stderr  # the simulator's own reason follows

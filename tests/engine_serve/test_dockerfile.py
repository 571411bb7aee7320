"""engine/Dockerfile cannot be built here; check that its pins and ports agree with the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvstack.common.config import build
from kvstack.engine.serve.config import EngineConfig
from kvstack.engine.serve.versions import LMCACHE_VERSION, VLLM_IMAGE, VLLM_VERSION


def _instructions(repo_root: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = (repo_root / "engine" / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    out = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for word, rest in instructions if word == name]


@pytest.fixture
def instructions(repo_root: Path) -> list[tuple[str, str]]:
    return _instructions(repo_root)


def test_base_image_is_the_pinned_vllm_release(instructions: list[tuple[str, str]]) -> None:
    assert _args(instructions, "FROM") == [VLLM_IMAGE]
    assert VLLM_IMAGE.endswith(f":v{VLLM_VERSION}")


def test_lmcache_pin_matches_the_code(instructions: list[tuple[str, str]]) -> None:
    pins = re.findall(r"lmcache==([\w.]+)", " ".join(_args(instructions, "RUN")))
    assert pins == [LMCACHE_VERSION]


def test_entrypoint_is_engine_serve_in_exec_form(instructions: list[tuple[str, str]]) -> None:
    (entry,) = _args(instructions, "ENTRYPOINT")
    assert json.loads(entry) == ["kvstack", "engine", "serve"]


def test_runs_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = _args(instructions, "USER")
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_exposes_the_default_api_and_event_ports(instructions: list[tuple[str, str]]) -> None:
    exposed = {int(p.split("/")[0]) for args in _args(instructions, "EXPOSE") for p in args.split()}
    cfg = build(EngineConfig, "test", model="m")
    event_ports = {
        int(ep.rsplit(":", 1)[1]) for ep in (cfg.kv_events.endpoint, cfg.kv_events.replay_endpoint) if ep
    }
    assert exposed == {cfg.port, *event_ports}

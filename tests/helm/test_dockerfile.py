"""router/Dockerfile agrees with the chart: base image, user, port, entrypoint, and what it copies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "router" / "Dockerfile").read_text()
VALUES = yaml.safe_load((ROOT / "helm" / "kvstack" / "values.yaml").read_text())


def instructions(name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", DOCKERFILE, re.MULTILINE)]


def test_final_stage_is_python_slim_as_a_non_root_user() -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE
    assert instructions("FROM")[-1] == "${PYTHON_IMAGE}"
    assert not any("rust" in line for line in instructions("COPY")[-1:])  # no toolchain at runtime
    user = instructions("USER")[-1]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    pod = VALUES["router"]["podSecurityContext"]
    assert (uid, gid) == (pod["runAsUser"], pod["runAsGroup"])


def test_entrypoint_runs_the_router_on_the_charts_port() -> None:
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["kvstack", "router"]
    assert instructions("EXPOSE") == [str(VALUES["router"]["port"])]


def test_every_copied_path_exists() -> None:
    for line in instructions("COPY"):
        if line.startswith("--from"):
            continue
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source


def test_the_chart_points_at_the_router_image() -> None:
    assert VALUES["router"]["image"]["repository"].endswith("/router")
    assert VALUES["operator"]["image"]["repository"] == VALUES["router"]["image"]["repository"]
    assert VALUES["engines"]["image"]["repository"].endswith("/engine")
    assert (ROOT / "engine" / "Dockerfile").is_file()


def test_the_build_stage_compiles_the_relay_and_checks_it() -> None:
    """setuptools-rust builds router/native only where cargo and a linker exist (it is optional,
    so a stage without them would ship an image that relays every event in Python)."""
    build = DOCKERFILE.split("FROM ${PYTHON_IMAGE} AS build", 1)[1].split("FROM ${PYTHON_IMAGE}\n", 1)[0]
    assert "COPY --from=rust /usr/local/cargo /usr/local/cargo" in build
    assert "gcc" in build and "PATH=/usr/local/cargo/bin" in build
    assert "assert available()" in build  # the image build fails without the relay
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "router/native/target/" in ignored  # the checkout's cargo output never enters the image

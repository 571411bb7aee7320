"""Static discovery: entry validation, the registry following the file, bad files kept out."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from tests.router_discovery.conftest import until

from kvstack.common.config import ConfigError
from kvstack.router.discovery import StaticDiscovery, parse_endpoints
from kvstack.router.discovery.static import merge_endpoints, sim_engine_entry
from kvstack.router.engines import Endpoint, EngineRegistry

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([A], [Endpoint(A, A)]),
        ([A + "/"], [Endpoint(A, A)]),  # trailing slash dropped
        ({"engines": [A, B]}, [Endpoint(A, A), Endpoint(B, B)]),
        (None, []),
        ({"engines": None}, []),
        (
            [
                {
                    "url": "https://engine.example:443",
                    "name": "e",
                    "models": ["x", "y"],
                    "kv_events_endpoint": "tcp://10.0.0.1:5557",
                    "kv_events_replay_endpoint": "tcp://10.0.0.1:5558",
                    "device": "node-1/gpu-0",
                }
            ],
            [
                Endpoint(
                    "https://engine.example:443",
                    "e",
                    frozenset({"x", "y"}),
                    "tcp://10.0.0.1:5557",
                    "tcp://10.0.0.1:5558",
                    device="node-1/gpu-0",
                )
            ],
        ),
    ],
)
def test_parse_endpoints(data: Any, expected: list[Endpoint]) -> None:
    assert parse_endpoints(data, source="test") == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("http://a:1", "expected a list"),
        ({"engine": [A]}, "expected a list"),
        ([42], r"engines\.0: expected a URL"),
        (["10.0.0.1:8000"], r"engines\.0\.url: .*http\(s\) base URL"),
        (["ftp://x:1"], r"engines\.0\.url"),
        ([A, "http://x:1/v1"], r"engines\.1\.url"),  # a base URL, not a path
        ([{"url": A, "modles": ["x"]}], r"engines\.0\.modles"),
        ([{"url": A, "kv_events_endpoint": "10.0.0.1:5557"}], r"engines\.0\.kv_events_endpoint"),
        ([{"name": "no-url"}], r"engines\.0\.url"),
        ([{"url": A, "device": ""}], r"engines\.0\.device"),
        ([A, A + "/"], r"engines\.1\.url: .* listed twice"),
    ],
)
def test_parse_endpoints_rejects_naming_the_entry(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_endpoints(data, source="engines.yaml")


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (
            ["m"],
            Endpoint(
                "http://127.0.0.1:9101",
                "sim0",
                frozenset({"m"}),
                "tcp://127.0.0.1:9102",
                "tcp://127.0.0.1:9103",
            ),
        ),
        (
            [],
            Endpoint(
                "http://127.0.0.1:9101", "sim0", frozenset(), "tcp://127.0.0.1:9102", "tcp://127.0.0.1:9103"
            ),
        ),
    ],
)
def test_a_simulators_entry_is_one_the_engines_file_parser_reads_back(
    models: list[str], expected: Endpoint
) -> None:
    entry = sim_engine_entry("sim0", http=9101, kv_events=9102, kv_replay=9103, models=models)
    assert parse_endpoints([entry], source="engines.yaml") == [expected]
    assert ("models" in entry) == bool(models)  # none listed: the router learns them from /v1/models
    shared = sim_engine_entry("sim0", http=9101, kv_events=9102, kv_replay=9103, models=models, device="g")
    assert parse_endpoints([shared], source="engines.yaml")[0].device == "g"


def test_merge_later_wins() -> None:
    merged = merge_endpoints([Endpoint(A, "cli"), Endpoint(B, B)], [Endpoint(A, "file")])
    assert merged == [Endpoint(A, "file"), Endpoint(B, B)]


def write(path: Path, text: str) -> None:
    """Replace the file the way a ConfigMap update or an editor does: a new inode."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def urls(registry: EngineRegistry) -> set[str]:
    return {st.url for st in registry.all()}


async def test_urls_only() -> None:
    registry = EngineRegistry()
    discovery = StaticDiscovery(registry, urls=[A, Endpoint(B, "b", frozenset({"m"}))])
    await discovery.start()
    try:
        assert urls(registry) == {A, B}
        b = registry.get(B)
        assert b is not None and b.models == {"m"} and b.name == "b"
    finally:
        await discovery.stop()


def test_bad_cli_urls_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"static engine URLs: engines\.0\.url"):
        StaticDiscovery(EngineRegistry(), urls=["localhost:8000"])


async def test_bad_file_at_start_fails(tmp_path: Path) -> None:
    path = tmp_path / "engines.yaml"
    path.write_text("- url: [unclosed\n")
    with pytest.raises(ConfigError, match=r"engines\.yaml"):
        await StaticDiscovery(EngineRegistry(), file=path).start()
    with pytest.raises(ConfigError, match="cannot read"):
        await StaticDiscovery(EngineRegistry(), file=tmp_path / "missing.yaml").start()


async def test_file_reload_follows_changes_and_ignores_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "engines.yaml"
    write(path, f"- {A}\n- url: {B}\n  models: [m]\n")
    registry = EngineRegistry()
    discovery = StaticDiscovery(registry, urls=[C], file=path, reload_interval=0.05, reload_on_sighup=False)
    await discovery.start()
    try:
        assert urls(registry) == {A, B, C}
        a_state = registry.get(A)

        write(path, f'{{"engines": ["{A}", "{B}/"]}}')  # JSON is fine too; B loses its models
        await until(lambda: discovery.reloads == 2, "reload after a change")
        assert urls(registry) == {A, B, C}
        assert registry.get(A) is a_state  # unchanged engines keep their live state

        write(path, f"- {A}\n")
        await until(lambda: urls(registry) == {A, C}, "B removed")

        gen = registry.generation
        write(path, "- not a url\n")
        await asyncio.sleep(0.3)  # six polls: a bad file must not change anything
        write(path, "[[[")
        await asyncio.sleep(0.3)
        path.unlink()
        await asyncio.sleep(0.3)
        assert urls(registry) == {A, C}
        assert registry.generation == gen
        assert discovery.reloads == 3

        write(path, f"- {B}\n")
        await until(lambda: urls(registry) == {B, C}, "a good file after bad ones")
    finally:
        await discovery.stop()


async def test_sighup_reloads_now(tmp_path: Path) -> None:
    path = tmp_path / "engines.yaml"
    write(path, f"- {A}\n")
    registry = EngineRegistry()
    discovery = StaticDiscovery(registry, file=path, reload_interval=3600)
    await discovery.start()
    try:
        if not discovery._sighup_installed:
            pytest.skip("SIGHUP handlers need the main thread of a Unix process")
        # same size and mtime granularity could hide the change from polling; SIGHUP does not care
        path.write_text(f"- {B}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: urls(registry) == {B}, "reload on SIGHUP")
    finally:
        await discovery.stop()
    assert not discovery._sighup_installed

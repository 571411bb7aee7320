"""``/ready`` waits for the engines' KV-event history (router/readiness.py): the decision's table,
and a router whose one engine's replay socket never answers, against a simulator."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from kvstack.common.waits import wait_until
from kvstack.router.readiness import Readiness, readiness

from .conftest import RouterFactory, run_event_sims


@pytest.mark.parametrize(
    ("available", "syncing", "since", "timeout", "was_ready", "need_engine", "expected"),
    [
        (0, 0, 0.0, 30.0, False, True, Readiness(False, "no_engine")),
        (0, 0, 99.0, 30.0, True, True, Readiness(False, "no_engine")),  # ready once, nothing to route to
        (0, 0, 0.0, 30.0, False, False, Readiness(True, "no_engine")),  # the startup probe: hold requests
        (2, 0, 0.0, 30.0, False, True, Readiness(True, "ready")),
        (2, 1, 0.5, 30.0, False, True, Readiness(False, "syncing")),
        (2, 1, 0.5, 30.0, False, False, Readiness(False, "syncing")),  # an engine up: its history first
        (2, 2, 29.9, 30.0, False, True, Readiness(False, "syncing")),
        (2, 1, 30.0, 30.0, False, True, Readiness(True, "sync_timed_out")),  # a hung replay keeps no one out
        (2, 1, 0.5, 0.0, False, True, Readiness(True, "ready")),  # the wait turned off
        (2, 1, 0.5, 30.0, True, True, Readiness(True, "ready")),  # a later replay does not take it back
    ],
)
def test_readiness(
    available: int,
    syncing: int,
    since: float,
    timeout: float,
    was_ready: bool,
    need_engine: bool,
    expected: Readiness,
) -> None:
    assert readiness(available, syncing, since, timeout, was_ready, need_engine) == expected


@pytest.mark.parametrize(
    ("answer", "latches"),
    [
        (Readiness(True, "ready"), True),
        (Readiness(True, "sync_timed_out"), True),
        (Readiness(True, "no_engine"), False),  # the startup probe's 200: no engine's history yet
        (Readiness(False, "syncing"), False),
        (Readiness(False, "no_engine"), False),
    ],
)
def test_only_a_ready_answer_with_an_engine_latches(answer: Readiness, latches: bool) -> None:
    assert answer.latches is latches


def _silent_replay(engines_file: Path) -> None:
    """Point the engine's replay at a port nothing serves: its replay waits its timeout, then fails."""
    (entry,) = yaml.safe_load(engines_file.read_text())
    entry["kv_events_replay_endpoint"] = "tcp://127.0.0.1:1"
    engines_file.write_text(yaml.safe_dump([entry]))


def _ready(url: str) -> tuple[int, dict[str, object]]:
    resp = httpx.get(f"{url}/ready", timeout=5)
    return resp.status_code, resp.json()


def test_ready_waits_for_the_replay_until_it_ends(tmp_path: Path, router: RouterFactory) -> None:
    with run_event_sims(tmp_path, count=1) as (_, engines_file):
        _silent_replay(engines_file)
        events = {"replay_timeout_s": 6.0, "replay_cooldown_s": 0.0}
        r = router(
            engines_file=engines_file, policy="cache_aware", available=1, cache_aware={"events": events}
        )
        status, body = _ready(r.url)
        assert status == 503, body  # available, but its history not in the index yet
        assert body["reason"] == "syncing" and body["syncing_engines"] == 1 and body["available_engines"] == 1
        wait_until(lambda: _ready(r.url)[0] == 200, "the replay to give up and the router to be ready", 20)
        status, body = _ready(r.url)
        assert body["reason"] == "ready" and body["syncing_engines"] == 0


def test_ready_without_the_wait(tmp_path: Path, router: RouterFactory) -> None:
    with run_event_sims(tmp_path, count=1) as (_, engines_file):
        _silent_replay(engines_file)
        events = {"replay_timeout_s": 6.0}
        r = router(
            engines_file=engines_file,
            policy="cache_aware",
            available=1,
            cache_aware={"events": events},
            ready_sync_timeout_s=0,
        )
        status, body = _ready(r.url)
        assert status == 200 and body["syncing_engines"] == 1, body

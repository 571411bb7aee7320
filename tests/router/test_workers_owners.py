"""Stored-response owners shared by the workers (router/shared_owners.py): the cell format and
its choices as tables, two mappings of one file, and ``GET /v1/responses/{id}`` through the other
worker of a real two-worker router."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from tests.conftest import free_port
from tests.router.conftest import KVSTACK, MODEL, Sim

from kvstack.common.procs import ManagedProcess
from kvstack.common.waits import wait_until
from kvstack.router.shared_owners import (
    OwnersTable,
    SharedOwners,
    decode,
    encode,
    find,
    pick_way,
    table_cells,
)
from kvstack.router.sticky import StickyResponsesConfig
from kvstack.router.workers import WORKER_HEADER

EMPTY = 0


@pytest.mark.parametrize(
    ("entries", "cells"), [(0, 1024), (100, 1024), (256, 1024), (257, 2048), (100_000, 1 << 19)]
)
def test_table_cells(entries: int, cells: int) -> None:
    assert table_cells(entries) == cells


@pytest.mark.parametrize(
    ("tag", "slot", "minute"), [(0, 0, 0), ((1 << 36) - 1, 1023, 65535), (12345, 7, 70000)]
)
def test_a_cell_round_trips(tag: int, slot: int, minute: int) -> None:
    assert decode(encode(tag, slot, minute)) == (tag, slot, minute % 65536)
    assert decode(EMPTY)[1] is None


@pytest.mark.parametrize(
    ("pair", "tag", "way"),
    [
        ((EMPTY, EMPTY), 5, 0),
        ((encode(9, 1, 100), EMPTY), 5, 1),  # an empty cell before evicting
        ((encode(9, 1, 100), encode(5, 2, 90)), 5, 1),  # the id's own cell, even if older
        ((encode(9, 1, 100), encode(8, 2, 90)), 5, 1),  # else the older
        ((encode(9, 1, 80), encode(8, 2, 90)), 5, 0),
        ((encode(9, 1, 65530), encode(8, 2, 3)), 5, 0),  # minutes wrap: 65530 is older than 3
    ],
)
def test_pick_way(pair: tuple[int, int], tag: int, way: int) -> None:
    assert pick_way(pair, tag, now_minute=100) == way


@pytest.mark.parametrize(
    ("pair", "now", "ttl", "slot"),
    [
        ((encode(5, 3, 100), EMPTY), 100, 60, 3),
        ((EMPTY, encode(5, 3, 100)), 130, 60, 3),
        ((encode(5, 3, 100), EMPTY), 161, 60, None),  # expired
        ((encode(6, 3, 100), EMPTY), 100, 60, None),  # another id
        ((EMPTY, EMPTY), 100, 60, None),
    ],
)
def test_find(pair: tuple[int, int], now: int, ttl: int, slot: int | None) -> None:
    assert find(pair, 5, now, ttl) == slot


def test_one_workers_owner_is_found_by_another(tmp_path: Path) -> None:
    path = tmp_path / "owners"
    OwnersTable.create(path, 1024).close()
    urls = {0: "http://a", 1: "http://b"}
    slots = {u: s for s, u in urls.items()}
    config = StickyResponsesConfig(max_entries=100, ttl_s=120)
    one, two = (SharedOwners(config, OwnersTable(path, 1024), slots.get, urls.get) for _ in range(2))
    one.remember("resp_1", "http://b", now=1000.0)
    one.remember("resp_2", "http://unknown", now=1000.0)  # no column: only this worker knows it
    assert two.owner("resp_1", now=1010.0) == "http://b"
    assert (two.owner("resp_2", 1010.0), one.owner("resp_2", 1010.0)) == (None, "http://unknown")
    assert two.owner("resp_1", now=1000.0 + 240) is None  # past the TTL (to the minute)
    ids = [f"resp_{i}" for i in range(100)]
    for i, rid in enumerate(ids):
        one.remember(rid, urls[i % 2], now=2000.0)
    assert sum(two.owner(rid, 2000.0) == urls[i % 2] for i, rid in enumerate(ids)) >= 97
    off = SharedOwners(StickyResponsesConfig(max_entries=0), OwnersTable(path, 1024), slots.get, urls.get)
    assert off.owner("resp_1", 1010.0) is None  # sticky_responses off: nothing routed


@pytest.mark.slow
def test_a_stored_response_is_found_through_the_other_worker(tmp_path: Path) -> None:
    sims = []
    try:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [KVSTACK, "engine", "sim", "--port", str(port), "--speed", "20"]
            env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
            sims.append(
                Sim(
                    url,
                    ManagedProcess(f"store-{i}", argv, tmp_path, env=env, ready_url=f"{url}/health").start(),
                )
            )
        for sim in sims:
            sim.proc.wait_ready(30)
        port = free_port()
        argv = [KVSTACK, "router", "--port", str(port), "--workers", "2", "--policy", "round_robin"]
        argv += [a for s in sims for a in ("--engine", s.url)]
        env = {"KVSTACK_ROUTER_EXPOSE_ENGINE_HEADER": "true", "KVSTACK_ROUTER_MONITOR__PROBE_INTERVAL": "0.2"}
        router = ManagedProcess("router", argv, tmp_path, env=env).start()
        base = f"http://127.0.0.1:{port}"
        try:
            seen: set[str] = set()

            def ready() -> bool:
                try:
                    answer = httpx.get(base + "/ready", timeout=5)
                except httpx.TransportError:
                    return False
                if answer.status_code == 200:
                    seen.add(answer.headers[WORKER_HEADER])
                return len(seen) == 2

            wait_until(ready, "both workers ready", 60, 0.05)
            body = {"model": MODEL, "input": "remember this", "max_output_tokens": 4, "store": True}
            created = httpx.post(base + "/v1/responses", json=body, timeout=30)
            assert created.status_code == 200, created.text
            rid, writer = created.json()["id"], created.headers[WORKER_HEADER]
            others: list[httpx.Response] = []

            def read_by_the_other() -> bool:
                answer = httpx.get(f"{base}/v1/responses/{rid}", timeout=10)
                assert answer.status_code == 200, answer.text  # from either worker
                if answer.headers[WORKER_HEADER] != writer:
                    others.append(answer)
                return bool(others)

            wait_until(read_by_the_other, "the other worker to answer the GET", 60, 0.0)
            assert others[0].json()["id"] == rid
            assert others[0].headers["x-kvstack-engine"] == created.headers["x-kvstack-engine"]
        finally:
            router.stop(timeout=35)
    finally:
        for sim in sims:
            sim.proc.stop()

"""The pure parts of ``workers: N`` (router/workers.py, router/shared_load.py) and the shared load
table across real processes."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from kvstack.common.config import ConfigError
from kvstack.common.waits import wait_until
from kvstack.router.config import load_settings
from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.shared_load import LoadTable, SharedLoad, SlotClient, SlotMap, answer
from kvstack.router.supervision import (
    GiveUp,
    Restart,
    RestartPolicy,
    after_death,
    cpu_budget,
    cpu_quota,
    worker_count,
    zombie_children,
)

# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("given", "expected"), [(None, 1), ("3", 3), ("auto", 0), ("AUTO", 0), ("0", 0), (4, 4)]
)
def test_workers_setting(given: object, expected: int) -> None:
    assert load_settings(workers=given).workers == expected


def test_workers_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_ROUTER_WORKERS", "auto")
    assert load_settings().workers == 0


@pytest.mark.parametrize("bad", ["-1", "many", "1.5", "513"])
def test_bad_workers_name_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match="workers"):
        load_settings(workers=bad)


# ---------------------------------------------------------------------------- how many


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [
        (None, None),
        ("max 100000\n", None),
        ("200000 100000\n", 2.0),
        ("150000 100000", 1.5),
        ("50000 100000", 0.5),
        ("garbage", None),
        ("0 100000", None),
    ],
)
def test_cpu_quota(cpu_max: str | None, quota: float | None) -> None:
    assert cpu_quota(cpu_max) == quota


@pytest.mark.parametrize(
    ("affinity", "quota", "cpus"),
    [(16, None, 16), (16, 2.0, 2), (16, 1.5, 2), (16, 0.5, 1), (2, 8.0, 2), (0, None, 1)],
)
def test_cpu_budget(affinity: int, quota: float | None, cpus: int) -> None:
    assert cpu_budget(affinity, quota) == cpus


@pytest.mark.parametrize(("setting", "cpus", "count"), [(1, 16, 1), (3, 16, 3), (0, 16, 16), (0, 1, 1)])
def test_worker_count(setting: int, cpus: int, count: int) -> None:
    assert worker_count(setting, cpus) == count


# ---------------------------------------------------------------------------- restarts

POLICY = RestartPolicy(max_deaths=3, window_s=60.0, first_delay_s=0.1, max_delay_s=1.0)


@pytest.mark.parametrize(
    ("deaths", "now", "outcome"),
    [
        ([100.0], 100.0, Restart(0.1)),
        ([99.0, 100.0], 100.0, Restart(0.2)),
        ([98.0, 99.0, 100.0], 100.0, Restart(0.4)),
        ([97.0, 98.0, 99.0, 100.0], 100.0, GiveUp(4)),  # a fourth death within the window
        ([10.0, 20.0, 30.0, 100.0], 100.0, Restart(0.1)),  # the old ones are out of the window
        ([90.0, 95.0, 100.0], 100.0, Restart(0.4)),
    ],
)
def test_after_death(deaths: list[float], now: float, outcome: Restart | GiveUp) -> None:
    assert after_death(deaths, now, POLICY) == outcome


def test_a_refused_configuration_is_given_up_at_once() -> None:
    outcome = after_death([100.0], 100.0, POLICY, exit_code=2)
    assert outcome == GiveUp(1, "config_error") and outcome.exit_code == 2
    assert after_death([100.0], 100.0, POLICY, exit_code=1) == Restart(0.1)
    assert after_death([100.0], 100.0, POLICY, exit_code=-9) == Restart(0.1)  # killed
    assert GiveUp(6).exit_code == 1


def test_restart_delay_is_capped() -> None:
    policy = RestartPolicy(max_deaths=100, first_delay_s=0.5, max_delay_s=2.0)
    assert after_death([float(t) for t in range(10)], 10.0, policy) == Restart(2.0)


# ---------------------------------------------------------------------------- the slot map


def test_slot_map_shares_a_slot_per_url_and_frees_it_when_nobody_holds_it() -> None:
    slots = SlotMap(capacity=2)
    assert slots.acquire(0, "http://a") == 0
    assert slots.acquire(1, "http://a") == 0  # the same engine: the same column for every worker
    assert slots.acquire(0, "http://b") == 1
    assert slots.acquire(0, "http://c") is None  # full
    assert slots.release(0, "http://a") is None  # worker 1 still holds it
    assert slots.release(1, "http://a") == 0
    assert slots.slot("http://a") is None
    assert slots.acquire(1, "http://c") == 0  # reused
    assert slots.release(0, "http://unknown") is None


def test_slot_map_releases_a_dead_workers_slots() -> None:
    slots = SlotMap()
    for url in ("http://a", "http://b"):
        slots.acquire(0, url)
    slots.acquire(1, "http://b")
    assert slots.release_worker(0) == [0]  # a is free; b is still worker 1's
    assert slots.slot("http://b") == 1
    assert slots.release_worker(0) == []


# ---------------------------------------------------------------------------- the table


def test_table_sums_workers_and_cells_see_their_peers(tmp_path: Path) -> None:
    table = LoadTable.create(tmp_path / "t", workers=3, slots=4)
    cells = [table.cell(w, 2) for w in range(3)]
    for w, cell in enumerate(cells):
        cell.publish(w + 1)
    assert table.total(2) == 6 and table.total(1) == 0
    assert [c.peers() for c in cells] == [5, 4, 3]
    table.clear_row(1)
    assert table.total(2) == 4
    table.clear_slot(2)
    assert table.total(2) == 0
    table.close()


def test_engine_in_flight_adds_the_other_workers(tmp_path: Path) -> None:
    table = LoadTable.create(tmp_path / "t", workers=2, slots=4)
    ep = Endpoint(url="http://a", name="a")
    mine, theirs = EngineState(endpoint=ep), EngineState(endpoint=ep)
    mine.attach_load(table.cell(0, 3))
    theirs.attach_load(table.cell(1, 3))
    mine.in_flight += 1
    mine.in_flight += 1
    theirs.in_flight += 1
    assert (mine.in_flight, theirs.in_flight, mine.own_in_flight, theirs.own_in_flight) == (3, 3, 2, 1)
    assert mine.load == 3.0
    mine.in_flight -= 1
    assert (theirs.in_flight, table.total(3)) == (2, 2)
    assert mine.detach_load()  # the engine left this worker's discovery: its share goes
    assert (theirs.in_flight, mine.in_flight) == (1, 1)
    assert not mine.detach_load()
    table.close()


def test_one_worker_counts_alone() -> None:
    st = EngineState(endpoint=Endpoint(url="http://a", name="a"))
    st.in_flight += 2
    st.in_flight -= 1
    assert (st.in_flight, st.own_in_flight) == (1, 1)


# ---------------------------------------------------------------------------- across processes


def _worker(path: Path, index: int, conn: Connection, urls: list[str], hold: int, go: Connection) -> None:
    """A worker: its registry holds ``urls``; it puts ``hold`` requests in flight at each, reports
    what it sees, then ends them on demand."""
    registry = EngineRegistry()
    shared = SharedLoad(registry, LoadTable(path, 2), index, SlotClient(conn))
    shared.start()
    registry.sync(Endpoint(url=u, name=u) for u in urls)
    states = {st.url: st for st in registry.all()}
    for st in states.values():
        for _ in range(hold):
            st.in_flight += 1
    go.send("holding")
    while (msg := go.recv()) != "end":
        go.send({url: st.in_flight for url, st in states.items()} if msg == "look" else None)
    for st in states.values():
        for _ in range(hold):
            st.in_flight -= 1
    go.send({url: st.in_flight for url, st in states.items()})
    go.recv()


def test_two_worker_processes_see_each_others_in_flight_load(tmp_path: Path) -> None:
    """Two processes with their own registries: each sees the sum at the engine they share and
    only its own at the one it alone knows; the supervisor's slot map answers both."""
    ctx = multiprocessing.get_context("fork")  # the test module cannot be imported by a fresh interpreter
    table = LoadTable.create(tmp_path / "load", workers=2)
    slots = SlotMap()
    procs, controls, slot_conns = [], [], []
    plan = [(["http://shared", "http://only-0"], 2), (["http://shared"], 3)]
    for index, (urls, hold) in enumerate(plan):
        ours, theirs = ctx.Pipe()
        control, remote = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(table.path, index, theirs, urls, hold, remote))
        p.start()
        procs.append(p)
        controls.append(control)
        slot_conns.append(ours)

    def serve_slots() -> bool:
        for index, conn in enumerate(slot_conns):
            while conn.poll():
                op, url = conn.recv()
                conn.send(answer(slots, table, index, op, url))
        return all(c.poll() for c in controls)

    try:
        wait_until(serve_slots, "both workers holding their requests", 60, 0.01)
        assert [c.recv() for c in controls] == ["holding", "holding"]
        looks = []
        for c in controls:
            c.send("look")
            looks.append(c.recv())
        assert looks == [{"http://shared": 5, "http://only-0": 2}, {"http://shared": 5}]
        shared_slot = slots.slot("http://shared")
        assert shared_slot is not None and table.total(shared_slot) == 5
        controls[1].send("end")
        assert controls[1].recv() == {"http://shared": 2}  # only worker 0's are left
        controls[0].send("look")
        assert controls[0].recv() == {"http://shared": 2, "http://only-0": 2}
        controls[0].send("end")
        assert controls[0].recv() == {"http://shared": 0, "http://only-0": 0}
        for c in controls:
            c.send("bye")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        table.close()


def test_zombie_children_are_found() -> None:
    """What the supervisor (PID 1 in a container) reaps: children that exited and were not waited for."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: child.pid in zombie_children(os.getpid()), "the child to exit unreaped", 30, 0.02)
    finally:
        child.wait()
    assert child.pid not in zombie_children(os.getpid())

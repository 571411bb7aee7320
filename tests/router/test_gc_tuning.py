"""The router process's GC settings (process-wide, so each case runs in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvstack.common.config import ConfigError
from kvstack.router.config import load_settings

_PROBE = """
import gc, json, sys
from kvstack.router.gc_tuning import tune_gc
before = gc.get_threshold()
tune_gc(int(sys.argv[1]))
print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))
"""


@pytest.mark.parametrize(
    ("threshold", "gen0", "frozen"),
    [
        (0, None, False),  # Python's defaults, nothing frozen
        (50_000, 50_000, True),
        (1_000, 1_000, True),
    ],
)
def test_tune_gc(threshold: int, gen0: int | None, frozen: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threshold)], capture_output=True, text=True, check=True, timeout=60
    )
    before, after, freeze_count = json.loads(out.stdout)
    assert after[0] == (before[0] if gen0 is None else gen0)
    assert after[1:] == before[1:]  # the older generations keep their ratios
    assert (freeze_count > 0) is frozen  # startup's objects are out of every later pass


def test_the_setting_defaults_to_bounded_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().gc_gen0_threshold == 7_000
    monkeypatch.setenv("KVSTACK_ROUTER_GC_GEN0_THRESHOLD", "-1")
    with pytest.raises(ConfigError, match="gc_gen0_threshold"):
        load_settings()


_GARBAGE = """
import gc, json, sys, tracemalloc
from kvstack.router.gc_tuning import tune_gc
tune_gc(int(sys.argv[1]))
tracemalloc.start()
for _ in range(120_000):
    cycle = {"payload": bytes(1000)}  # one tracked object, 1 KB it references
    cycle["self"] = cycle  # a cycle: reference counting never frees it
    del cycle
print(json.dumps(tracemalloc.get_traced_memory()[1]))
"""


@pytest.mark.parametrize("threshold", [7_000, 50_000])
def test_cyclic_garbage_held_is_bounded_by_the_threshold(threshold: int) -> None:
    """What the router once held: a young pass runs once ``threshold`` objects survived, so at most
    that many garbage cycles (and what they reference) wait for it, however many are made."""
    out = subprocess.run(
        [sys.executable, "-c", _GARBAGE, str(threshold)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    peak = json.loads(out.stdout)
    per_cycle = 1000 + 33 + 184  # the payload, its bytes header, a small dict (CPython 3.11)
    assert 0.8 * threshold * per_cycle <= peak <= 1.3 * threshold * per_cycle + 256 * 1024

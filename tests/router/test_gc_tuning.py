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
    # rarer young passes must not make older garbage wait longer: each older generation is
    # collected every second pass of the younger one (Python's defaults untouched at 0)
    assert after[1:] == (before[1:] if gen0 is None else [1, 1])
    assert (freeze_count > 0) is frozen  # startup's objects are out of every later pass


def test_the_setting_defaults_to_rare_passes_and_rejects_negatives(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().gc_gen0_threshold == 50_000
    monkeypatch.setenv("KVSTACK_ROUTER_GC_GEN0_THRESHOLD", "-1")
    with pytest.raises(ConfigError, match="gc_gen0_threshold"):
        load_settings()

"""Every engine-serve test starts from an environment without KVSTACK_ENGINE_* settings."""

from __future__ import annotations

import os

import pytest

from kvstack.engine.serve.config import ENV_PREFIX


@pytest.fixture(autouse=True)
def _clean_engine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)

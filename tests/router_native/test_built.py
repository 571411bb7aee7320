"""Where the build must have produced the compiled relay (make unit sets KVSTACK_REQUIRE_NATIVE=1),
its absence is a failure, not a skip."""

from __future__ import annotations

import os

import pytest

from kvstack.router import native_relay


@pytest.mark.skipif(os.environ.get("KVSTACK_REQUIRE_NATIVE") != "1", reason="KVSTACK_REQUIRE_NATIVE is not 1")
def test_the_compiled_relay_is_built() -> None:
    assert native_relay.available(), "kvstack.router._relay is missing: make venv builds it (Rust + cargo)"

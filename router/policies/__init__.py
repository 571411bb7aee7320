"""Routing policies by name: ``make_policy("least_loaded")``.

Built-in policies are pure and take only a random source. Policies that live in their own
modules (``cache_aware``, ``prefix_trie``) are imported on demand; such a module exposes
``make_policy(registry=..., settings=..., rng=...) -> Policy``. Every policy subclasses
:class:`~kvstack.router.policies.base.Policy`, which declares its hooks and lifecycle.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

from kvstack.router.engines import EngineRegistry
from kvstack.router.policies.base import Policy
from kvstack.router.policies.least_loaded import LeastLoadedPolicy
from kvstack.router.policies.round_robin import RoundRobinPolicy
from kvstack.router.policies.session import SessionPolicy

_MODULES: dict[str, str] = {
    "cache_aware": "kvstack.router.policies.cache_aware",
    "prefix_trie": "kvstack.router.policies.prefix_trie",
}


def policy_names() -> list[str]:
    """Every policy name the router accepts."""
    return sorted(["round_robin", "least_loaded", "session", *_MODULES])


def make_policy(
    name: str,
    *,
    registry: EngineRegistry | None = None,
    settings: Any = None,
    rng: random.Random | None = None,
) -> Policy:
    """The policy called ``name``; ``ValueError`` names the known ones when it is unknown."""
    rng = rng or random.Random()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_loaded":
        return LeastLoadedPolicy(rng=rng)
    if name == "session":
        return SessionPolicy(rng=rng)
    if name in _MODULES:
        module = importlib.import_module(_MODULES[name])
        factory = getattr(module, "make_policy", None)
        if factory is None:
            raise ValueError(f"routing policy {name!r} cannot be built by name yet (no make_policy)")
        policy: Policy = factory(registry=registry, settings=settings, rng=rng)
        return policy
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(policy_names())}")

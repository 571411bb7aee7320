"""The cache-aware policy's decision log: one JSON line per decision at DEBUG (``--log-level debug``).

What each engine was predicted to serve from which tier (as the index holds it now, and the share of
its GPU hit expected to survive the queue ahead), and why the chosen one won. Off at any other
level: the benchmark's per-request trace (:mod:`kvstack.bench.trace`) reads these lines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvstack.router.engines import EngineState
from kvstack.router.policies.cache_aware_tiers import TierEstimate
from kvstack.router.tier_cost import TierCosts

if TYPE_CHECKING:
    from kvstack.router.policies.cache_aware_decide import CandidateView, Choice

decision_log = logging.getLogger("kvstack.router.decision")


def log_decision(
    request_id: str,
    prompt_tokens: int,
    candidates: Sequence[EngineState],
    views: Sequence[CandidateView],
    estimates: Sequence[TierEstimate],
    choice: Choice,
    est_ttft_s: Sequence[float],
    costs: TierCosts,
) -> None:
    engines = [
        {
            "engine": st.name,
            "gpu_tokens": m.gpu_blocks * m.block_size,
            "cpu_tokens": (m.local_blocks - m.gpu_blocks) * m.block_size,
            "shared_tokens": (m.reachable_blocks - m.local_blocks) * m.block_size,
            "resident": round(e.resident, 3),
            "hit_tokens": round(v.hit_tokens, 1),
            "load_s": round(v.load_s, 6),
            "queued_tokens": round(v.queued_tokens, 1),
            "running": v.running,
            "load": v.load,
            "device_busy": v.device_busy,
            "queue_wait_s": round(v.queue_wait_s, 4),
            "prefill_rate": round(v.prefill_rate),
            "est_ttft_s": round(t, 6),
        }
        for st, v, e, t in zip(candidates, views, estimates, est_ttft_s, strict=True)
        for m in (e.match,)
    ]
    decision_log.debug(
        "decision",
        extra={
            "request_id": request_id,
            "prompt_tokens": prompt_tokens,
            "chosen": candidates[choice.index].name,
            "route_reason": choice.reason,
            "engines": engines,
            # the tier costs learnt so far (router/tier_cost.py), in us per token
            "tier_cost_us": {"cpu": round(costs.cpu_s * 1e6, 2), "shared": round(costs.shared_s * 1e6, 2)},
        },
    )

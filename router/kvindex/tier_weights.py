"""What a prompt token loaded from a KV tier is worth against a GPU hit, from measured load costs.

The index values each tier's matched blocks at these weights (``IndexSettings.cpu_weight``,
``shared_weight``); the cache-aware policy learns the same costs online (``router/tier_cost.py``).
"""

from __future__ import annotations


def tier_weight(load_us_per_token: float, compute_us_per_token: float, failure: float = 0.0) -> float:
    """What a prompt token an engine loads from a tier is worth, as a fraction of a GPU hit.

    A GPU hit saves computing the token. A load saves it too, less the load's own time, and only
    when the token comes back: a load that fails (``failure``: the share of tokens asked for that
    do not) is paid and then computed anyway. So ``(1 - failure) - load / compute``, floored at 0: a
    tier slower than computing is worth nothing (vLLM loads what LMCache announces, so the router
    can only avoid counting on it).
    """
    if compute_us_per_token <= 0:
        raise ValueError("compute_us_per_token must be positive")
    return max(0.0, (1.0 - failure) - load_us_per_token / compute_us_per_token)


# Measured on the H200 run of two vLLM 0.24 + LMCache 0.5.3 engines sharing one GPU (the engines'
# "Retrieved N out of M required tokens ... cost" log lines, kvstack.engine.sim.fit.retrieve_fit):
# LMCache's CPU tier loads 4.0 us/token; Redis 330 us per token asked for, and 43% of those never
# came back. Computing a token took ~70 us on that shared GPU (17.7 us at full GPU / share 0.26).
H200_COMPUTE_US_PER_TOKEN = 68.0
H200_CPU_WEIGHT = tier_weight(4.0, H200_COMPUTE_US_PER_TOKEN)  # 0.94
H200_SHARED_WEIGHT = tier_weight(330.0, H200_COMPUTE_US_PER_TOKEN, failure=0.43)  # 0.0

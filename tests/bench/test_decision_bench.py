"""The decision microbenchmark measures the path it claims to: hits on a populated index."""

from __future__ import annotations

import math

from kvstack.bench import decision


def test_cached_prompts_hit_and_fresh_ones_miss() -> None:
    out = decision.run(engines=2, prompt_tokens=512, num_gpu_blocks=512, samples=100)
    # every timed request shares a stored system prompt; fresh random prompts share nothing
    assert out["cached_tokens_ms"]["hit_share"] == 1.0
    assert out["uncached_tokens_ms"]["hit_share"] == 0.0
    # 2 engines x 16 prompts of 32 blocks, half of each a system prompt shared with other prompts
    assert 0 < out["indexed_blocks"] <= 2 * 512
    for part in ("cached_tokens_ms", "uncached_tokens_ms"):
        q = out[part]
        assert all(math.isfinite(q[k]) and q[k] > 0 for k in ("p50", "p90", "p99"))
        assert q["p50"] <= q["p90"] <= q["p99"]

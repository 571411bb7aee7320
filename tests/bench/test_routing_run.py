"""One routing-benchmark case end to end: real simulators, the real router, the real driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.bench import routing, routing_goals, stats, workloads


def small_case(tmp_path: Path, engines: int = 2) -> tuple[routing.RoutingSetup, workloads.Workload]:
    """The least a sim takes; 16 groups of 4 prompts sharing a 2,048-token system prompt: half the
    cluster's KV, ~20 req/s."""
    setup = routing.RoutingSetup(engines=engines, num_gpu_blocks=2048, log_dir=tmp_path)
    w = workloads.shared_prefix(
        setup.capacity_tokens,
        "under",
        prompts_per_group=4,
        system_tokens=2048,
        question_tokens=16,
        answer_tokens=8,
        prefill_tokens_per_s=setup.prefill_tokens_per_s,
        load=0.6,
    )
    return setup, w


@pytest.mark.slow
def test_a_cache_aware_case_hits_near_the_oracle(tmp_path: Path) -> None:
    setup, w = small_case(tmp_path)
    row = routing.run_case(setup, w, "cache_aware")
    assert (row["requests"], row["errors"], row["first_reads"]) == (64, 0, 16)
    assert sum(row["requests_per_engine"]) == 64  # the engines' own counters saw every request
    # every repeat can hit its group's system prompt; the first read of each group cannot
    assert row["oracle_hit_rate"] > 0.5
    # The goal (0.9) is the benchmark's to check, on a quiet machine (it reads 1.0 there, run after
    # run). Here the machine may be busy: a repeat that reaches its group's engine while the group's
    # first read is still prefilling finds no finished blocks, a miss the engine counts and the
    # oracle does not (a CI run read 0.896). Round robin reads 0.69 on this trace.
    assert row["hit_vs_oracle"] >= 0.8
    assert row["route_reasons"].get("cold", 0) >= 2  # the groups' first reads, spread cold
    assert row["ttft_p90"] <= row["ttft_all_p99"]
    assert len(row["loadavg"]) == 2
    assert row["dispatch_mean_ms"] > 0  # the router's own share of the TTFT, from its histogram
    # every repeat's TTFT is kept for the under-filled goal's noise interval
    assert len(row[routing_goals.SAMPLES]) == 64 - 16
    assert stats.percentile(row[routing_goals.SAMPLES], 90) == pytest.approx(1000 * row["ttft_p90"], rel=1e-3)


@pytest.mark.slow
def test_a_seed_repeats_the_tries_random_placement(tmp_path: Path) -> None:
    """The trie places each group's first prompt on a random engine; a run's seed fixes the draw."""
    setup, w = small_case(tmp_path, engines=4)
    placements = [
        routing.run_case(setup, w, "prefix_trie", seed=seed)["requests_per_engine"] for seed in (7, 7, 8)
    ]
    assert placements[0] == placements[1]
    assert placements[0] != placements[2]  # 32 groups over 4 engines: seeds 7 and 8 draw apart

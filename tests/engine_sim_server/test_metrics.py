"""``/metrics`` of a real simulator: the reference's families and types, values that follow requests."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.engine_sim_server.conftest import MODEL, Sim, run_sim
from tests.engine_sim_server.promtext import sample


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_every_reference_family_with_its_type_and_labels(sim: Sim, reference_dir: Path) -> None:
    reference_text = (reference_dir / "vllm-0.24-metrics.txt").read_text()
    ref = {n: t for n, t in families(reference_text).items() if n.startswith("vllm:")}
    ours = families(sim.metrics())
    assert {n: ours.get(n) for n in ref} == ref
    assert not {n for n in ours if n.startswith("vllm:")} - set(ref)

    # label names match too, sample by sample (bucket bounds aside)
    def label_names(text: str) -> dict[str, set[frozenset[str]]]:
        out: dict[str, set[frozenset[str]]] = {}
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                if s.name.startswith("vllm:"):
                    out.setdefault(s.name, set()).add(frozenset(s.labels) - {"le"})
        return out

    assert label_names(sim.metrics()) == label_names(reference_text)
    text = sim.metrics()
    assert sample(text, "vllm:engine_sleep_state", sleep_state="awake", engine="0", model_name=MODEL) == 1
    assert sample(text, "vllm:cache_config_info", block_size="16", num_gpu_blocks="2000") == 1


def test_histogram_buckets_match_the_reference(sim: Sim, reference_dir: Path) -> None:
    def buckets(text: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                if s.name.startswith("vllm:") and s.name.endswith("_bucket"):
                    out.setdefault(f.name, []).append(s.labels["le"])
        return out

    ref = buckets((reference_dir / "vllm-0.24-metrics.txt").read_text())
    ours = buckets(sim.metrics())
    for name, les in ref.items():
        if name in (
            "vllm:request_prompt_tokens",
            "vllm:request_generation_tokens",
            "vllm:request_max_num_generation_tokens",
            "vllm:request_params_max_tokens",
            "vllm:request_prefill_kv_computed_tokens",
        ):
            # 1-2-5 buckets up to max_model_len: the reference pod ran 20000, this one 2048
            assert ours[name] == [le for le in les if le == "+Inf" or float(le) <= 2048]
        else:
            assert ours[name] == les, name


def test_values_follow_requests() -> None:
    with run_sim("--speed", "50", "--max-model-len", "4096", "--num-gpu-blocks", "1000") as s:
        url = f"{s.base_url}/completions"
        prompt = list(range(1000, 1000 + 160))  # 10 full blocks of 16
        for _ in range(2):
            r = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "ignore_eos": True})
            assert r.status_code == 200
        text = s.metrics()
        assert sample(text, "vllm:request_success_total", finished_reason="length") == 2
        assert sample(text, "vllm:generation_tokens_total") == 16
        assert sample(text, "vllm:prompt_tokens_total") == 320
        queries = sample(text, "vllm:prefix_cache_queries_total")
        hits = sample(text, "vllm:prefix_cache_hits_total")
        assert queries == 320  # tokens, not blocks
        assert hits % 16 == 0 and 144 <= hits <= 160  # the second request hit (almost) all its blocks
        assert sample(text, "vllm:prompt_tokens_by_source_total", source="local_cache_hit") == hits
        assert sample(text, "vllm:prompt_tokens_by_source_total", source="local_compute") == 320 - hits
        assert sample(text, "vllm:prompt_tokens_cached_total") == hits
        assert sample(text, "vllm:request_prompt_tokens_count") == 2
        assert sample(text, "vllm:request_prompt_tokens_sum") == 320
        assert sample(text, "vllm:time_to_first_token_seconds_count") == 2
        assert sample(text, "vllm:inter_token_latency_seconds_count") == 14
        assert sample(text, "vllm:request_params_max_tokens_sum") == 16
        # one observation per output step (8 per request, run one after the other), counted as vLLM
        # does: a prompt with its first token, then one token per step
        assert sample(text, "vllm:iteration_tokens_total_count") == 16
        assert sample(text, "vllm:iteration_tokens_total_sum") == 320 + 16
        usage = sample(text, "vllm:kv_cache_usage_perc")
        assert 0 <= usage <= 1
        assert sample(text, "vllm:num_requests_running") == 0
        assert sample(text, "vllm:num_requests_waiting") == 0
        r = httpx.post(f"{s.url}/reset_prefix_cache")
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_counts_as_stop(sim: Sim, stream: bool) -> None:
    url = f"{sim.base_url}/completions"
    body = {
        "model": MODEL,
        "prompt": f"Count the stop strings {stream}.",
        "max_tokens": 20,
        "ignore_eos": True,
    }
    text = httpx.post(url, json=body, timeout=10).json()["choices"][0]["text"]
    before = {
        r: sample(sim.metrics(), "vllm:request_success_total", finished_reason=r) for r in ("stop", "abort")
    }
    r = httpx.post(url, json={**body, "stop": text[8:14], "stream": stream}, timeout=10)
    assert r.status_code == 200
    assert (
        ('"finish_reason":"stop"' in r.text) if stream else r.json()["choices"][0]["finish_reason"] == "stop"
    )
    after = {
        r: sample(sim.metrics(), "vllm:request_success_total", finished_reason=r) for r in ("stop", "abort")
    }
    assert after == {"stop": before["stop"] + 1, "abort": before["abort"]}


def test_the_mounted_metrics_app_answers_only_the_samples_asked_as_vllms_does(sim: Sim) -> None:
    # vLLM 0.24: the instrumentator's /metrics ignores the query; prometheus_client's app mounted
    # under it answers /metrics/ with the name[] samples alone (what the router's scrape asks for)
    asked = [
        "vllm:num_requests_running",
        "vllm:prefix_cache_hits_total",
        "vllm:request_queue_time_seconds_sum",
    ]
    query = [("name[]", name) for name in asked]
    filtered = httpx.get(f"{sim.url}/metrics/", params=query)
    assert filtered.status_code == 200
    got = {s.name for f in text_string_to_metric_families(filtered.text) for s in f.samples}
    assert got == set(asked)
    whole = httpx.get(f"{sim.url}/metrics", params=query).text
    assert len(families(whole)) > 30 and len(whole) > 10 * len(filtered.text)

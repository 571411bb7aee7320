"""The metrics parser against the real vLLM 0.24 scrape and the exposition format's corner cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.router.scrape import parse_labels, parse_vllm_metrics, split_sample


def test_reference_scrape(reference_dir: Path) -> None:
    m = parse_vllm_metrics((reference_dir / "vllm-0.24-metrics.txt").read_text())
    assert m.num_running == 0.0
    assert m.num_waiting == 0.0
    assert m.kv_cache_usage == 0.0
    assert m.block_size == 16
    assert m.num_gpu_blocks == 34604
    assert m.counters["prefix_cache_queries"] == 184832.0
    assert m.counters["prefix_cache_hits"] == 41248.0
    assert m.counters["external_prefix_cache_hits"] == 0.0
    assert set(m.by_model) == {"dummy-8b"}


def _line(name: str, value: float, model: str = "m", engine: str = "0", **labels: str) -> str:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f'{name}{{engine="{engine}",model_name="{model}"{extra}}} {value}'


MULTI = "\n".join(
    [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        _line("vllm:num_requests_running", 3, "a", "0"),
        _line("vllm:num_requests_running", 2, "a", "1"),
        _line("vllm:num_requests_running", 4, "b", "0"),
        _line("vllm:num_requests_waiting", 1, "a"),
        _line("vllm:num_requests_waiting", 5, "b"),
        _line("vllm:num_requests_waiting_by_reason", 99, "a", reason="capacity"),
        _line("vllm:kv_cache_usage_perc", 0.25, "a", "0"),
        _line("vllm:kv_cache_usage_perc", 0.5, "a", "1"),
        _line("vllm:kv_cache_usage_perc", 0.75, "b"),
        _line("vllm:cache_config_info", 1, "a", "0", block_size="16", num_gpu_blocks="100"),
        _line("vllm:cache_config_info", 1, "a", "1", block_size="16", num_gpu_blocks="200"),
        _line("vllm:prefix_cache_hits_total", 10, "a"),
        _line("vllm:prefix_cache_hits_created", 1.7e9, "a"),
        _line("vllm:prefix_cache_hits_total", 5, "b"),
    ]
)


def test_several_models_and_engine_cores_aggregate() -> None:
    m = parse_vllm_metrics(MULTI)
    assert m.num_running == 9  # summed over models and data-parallel cores
    assert m.num_waiting == 6  # the _by_reason breakdown is not counted twice
    assert m.kv_cache_usage == 0.75  # the fullest core
    assert m.num_gpu_blocks == 300
    assert m.block_size == 16
    assert m.counters == {"prefix_cache_hits": 15.0}
    assert m.by_model["a"].num_running == 5
    assert m.by_model["a"].kv_cache_usage == 0.5
    assert m.by_model["b"].num_waiting == 5


@pytest.mark.parametrize(
    ("text", "running", "waiting", "usage", "block_size", "blocks"),
    [
        ("", None, None, None, None, None),
        ("vllm:num_requests_running 7", 7.0, None, None, None, None),  # no labels at all
        ('vllm:num_requests_running{model_name="m"} 2 1700000000000', 2.0, None, None, None, None),
        ('vllm:kv_cache_usage_perc{model_name="m"} NaN', None, None, None, None, None),
        ('vllm:num_requests_waiting{model_name="m"} 1e+01\r', None, 10.0, None, None, None),
        ('vllm:cache_config_info{block_size="None",num_gpu_blocks="None"} 1.0', None, None, None, None, None),
        ('vllm:cache_config_info{block_size="32",num_gpu_blocks="8"} 1.0', None, None, None, 32, 8),
        ("vllm:gpu_cache_usage_perc 0.9", None, None, None, None, None),  # removed V0 name: ignored
        ("x_vllm:num_requests_running 5\n# HELP vllm:num_requests_running x", None, None, None, None, None),
        ("a 1\r\nvllm:num_requests_running 4\r\nb 2", 4.0, None, None, None, None),
    ],
)
def test_parse_table(
    text: str,
    running: float | None,
    waiting: float | None,
    usage: float | None,
    block_size: int | None,
    blocks: int | None,
) -> None:
    m = parse_vllm_metrics(text)
    assert (m.num_running, m.num_waiting, m.kv_cache_usage) == (running, waiting, usage)
    assert (m.block_size, m.num_gpu_blocks) == (block_size, blocks)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ('a="1"', {"a": "1"}),
        ('a="1",b="two"', {"a": "1", "b": "two"}),
        ('a="1",', {"a": "1"}),
        ('a="with \\"quotes\\"",b="x"', {"a": 'with "quotes"', "b": "x"}),
        ('a="back\\\\slash",b="nl\\n"', {"a": "back\\slash", "b": "nl\n"}),
        ('a="ends in backslash\\\\"', {"a": "ends in backslash\\"}),
        ('a="comma, {brace}"', {"a": "comma, {brace}"}),
    ],
)
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected


@pytest.mark.parametrize(
    "line",
    [
        "vllm:num_requests_running",
        'vllm:num_requests_running{model_name="m"}',
        'vllm:num_requests_running{model_name="m} 1',
        "vllm:num_requests_running{model_name=m} 1",
        'vllm:num_requests_running{model_name="m"} abc',
    ],
)
def test_malformed_wanted_line_raises(line: str) -> None:
    with pytest.raises(ValueError):
        split_sample(line)
    with pytest.raises(ValueError):
        parse_vllm_metrics(line)

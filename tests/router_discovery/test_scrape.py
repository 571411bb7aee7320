"""The metrics parser against the real vLLM 0.24 scrape and the exposition format's corner cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.router.scrape import ScrapeParser, parse_labels, parse_vllm_metrics, split_sample, wanted_lines


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


def test_wanted_lines_are_the_samples_of_the_read_families(reference_dir: Path) -> None:
    lines = wanted_lines((reference_dir / "vllm-0.24-metrics.txt").read_text())
    names = [line.split("{", 1)[0] for line in lines]
    assert names == [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:external_prefix_cache_queries_total",
        "vllm:external_prefix_cache_hits_total",
        "vllm:request_queue_time_seconds_count",  # the histogram's count and sum, not its buckets
        "vllm:request_queue_time_seconds_sum",
        "vllm:cache_config_info",
    ]


RUNNING_0 = 'vllm:num_requests_running{engine="0",model_name="dummy-8b"} 0.0'


def test_scrape_parser_agrees_with_the_parser_over_successive_scrapes(reference_dir: Path) -> None:
    ref = (reference_dir / "vllm-0.24-metrics.txt").read_text()
    assert RUNNING_0 in ref
    busy = ref.replace(RUNNING_0, RUNNING_0.replace("0.0", "3.0"))
    other = ref.replace("# HELP vllm:num_requests_running", "# HELP vllm:num_requests_running (changed)")
    parser = ScrapeParser()
    for text in (ref, ref, busy, other, MULTI, "", ref, "vllm:num_requests_running 7"):
        assert parser.parse(text) == parse_vllm_metrics(text)


def test_an_unchanged_scrape_is_not_parsed_again(reference_dir: Path) -> None:
    ref = (reference_dir / "vllm-0.24-metrics.txt").read_text()
    parser = ScrapeParser()
    first = parser.parse(ref)
    assert parser.parse(ref) is first  # the same body
    other = ref.replace("# HELP vllm:num_requests_running", "# HELP vllm:num_requests_running (changed)")
    assert parser.parse(other) is first  # another body, the same wanted lines
    busy = parser.parse(ref.replace(RUNNING_0, RUNNING_0.replace("0.0", "3.0")))
    assert busy is not first
    assert (busy.num_running, first.num_running) == (3.0, 0.0)


def test_a_malformed_scrape_raises_and_the_last_good_one_stays(reference_dir: Path) -> None:
    ref = (reference_dir / "vllm-0.24-metrics.txt").read_text()
    parser = ScrapeParser()
    first = parser.parse(ref)
    with pytest.raises(ValueError):
        parser.parse(ref.replace(RUNNING_0, RUNNING_0.replace("0.0", "abc")))
    assert parser.parse(ref) is first

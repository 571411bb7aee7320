from pathlib import Path

import pytest

from kvstack.bench import promtext


def test_reference_scrape_parses_and_sums(reference_dir: Path) -> None:
    samples = promtext.parse((reference_dir / "vllm-0.24-metrics.txt").read_text())
    assert promtext.total(samples, "vllm:prefix_cache_hits_total") == 41248.0
    assert promtext.total(samples, "vllm:request_success_total", finished_reason="length") == 249.0
    # 249 TTFT observations; the p50 falls in the (0.25, 0.5] bucket
    assert 0.25 < promtext.histogram_quantile(samples, "vllm:time_to_first_token_seconds", 0.5) <= 0.5


HIST = """# TYPE h histogram
h_bucket{le="0.1"} {a}
h_bucket{le="1.0"} {b}
h_bucket{le="+Inf"} {c}
h_count {c}
h_sum 1
"""


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [((10, 10, 10), 0.5, 0.05), ((0, 10, 10), 0.5, 0.55), ((0, 0, 10), 0.99, 1.0)],
)
def test_histogram_quantile(counts: tuple[int, int, int], q: float, expected: float) -> None:
    a, b, c = counts
    samples = promtext.parse(HIST.replace("{a}", str(a)).replace("{b}", str(b)).replace("{c}", str(c)))
    assert promtext.histogram_quantile(samples, "h", q) == pytest.approx(expected)


def test_delta_between_scrapes() -> None:
    before = promtext.parse('# TYPE c counter\nc_total{x="1"} 5\nc_total{x="2"} 1\n')
    after = promtext.parse('# TYPE c counter\nc_total{x="1"} 8\nc_total{x="2"} 4\n')
    assert promtext.delta(before, after, "c_total") == 6
    assert promtext.delta(before, after, "c_total", x="1") == 3

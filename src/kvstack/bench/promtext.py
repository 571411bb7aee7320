"""Read Prometheus text exposition into flat samples, and compute deltas between two scrapes."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = Mapping[SampleKey, float]


def parse(text: str) -> dict[SampleKey, float]:
    """``{(sample name, sorted labels): value}`` for every sample in ``text``."""
    out: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[SampleKey, float]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse(resp.read().decode())


def total(samples: Mapping[SampleKey, float], name: str, **labels: str) -> float:
    """Sum of samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


def delta(
    before: Mapping[SampleKey, float], after: Mapping[SampleKey, float], name: str, **labels: str
) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def histogram_quantile(
    samples: Mapping[SampleKey, float], name: str, q: float, before: Mapping[SampleKey, float] | None = None
) -> float:
    """Prometheus-style quantile estimate from ``name``_bucket samples (linear within a bucket)."""
    buckets: dict[float, float] = {}
    for (n, lbls), v in samples.items():
        if n != f"{name}_bucket":
            continue
        le = float(dict(lbls)["le"])
        base = (before or {}).get((n, lbls), 0.0)
        buckets[le] = buckets.get(le, 0.0) + v - base
    if not buckets:
        return float("nan")
    edges = sorted(buckets)
    count = buckets[edges[-1]]
    if count <= 0:
        return float("nan")
    rank = q * count
    prev_le, prev_c = 0.0, 0.0
    for le in edges:
        c = buckets[le]
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return prev_le

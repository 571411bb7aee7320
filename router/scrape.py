"""Parse the few vLLM 0.24 metrics the router routes on out of a Prometheus text scrape.

A full vLLM scrape is ~600 lines, almost all histogram buckets; the router needs a handful of
gauges. :func:`parse_vllm_metrics` looks only at lines that start with the names it wants, so it
never builds a full exposition model. Pure: text in, :class:`EngineMetrics` out.

An engine pod may serve several models (``model_name`` label) or run several data-parallel engine
cores (``engine`` label). The pod-level figures aggregate over all series: running and waiting
requests add up, KV usage is the fullest core's (a new prefix evicts there first), GPU blocks add
up; per-model figures are kept in :attr:`EngineMetrics.by_model`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"
# Counters kept in EngineState.extra, for policies and the router's own metrics.
COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
)
_GAUGES = (RUNNING, WAITING, KV_USAGE)
_WANTED = (*_GAUGES, CACHE_CONFIG, *COUNTERS)
_ESCAPE = re.compile(r"\\(.)")


def _unescape(match: re.Match[str]) -> str:
    char = match.group(1)
    return "\n" if char == "n" else char


@dataclass(slots=True)
class ModelMetrics:
    """The gauges of one served model (summed over its engine cores; KV usage is the max)."""

    num_running: float = 0.0
    num_waiting: float = 0.0
    kv_cache_usage: float = 0.0


@dataclass(slots=True)
class EngineMetrics:
    """What one scrape says about an engine pod. ``None``: the scrape had no such series."""

    num_running: float | None = None
    num_waiting: float | None = None
    kv_cache_usage: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    counters: dict[str, float] = field(default_factory=dict)  # short name (no vllm:, no _total) -> sum
    by_model: dict[str, ModelMetrics] = field(default_factory=dict)


def parse_labels(text: str) -> dict[str, str]:
    """``a="1",b="x \\"y\\""`` -> ``{"a": "1", "b": 'x "y"'}`` (the exposition format's escapes)."""
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lstrip(",").strip()
        if eq + 1 >= n or text[eq + 1] != '"':
            raise ValueError(f"label {key!r} has no quoted value")
        j = eq + 2
        chunks: list[str] = []
        while True:
            end = text.find('"', j)
            if end < 0:
                raise ValueError(f"label {key!r} value is not terminated")
            # count the backslashes right before the quote: an odd number escapes it
            k = end
            while k > j and text[k - 1] == "\\":
                k -= 1
            chunks.append(text[j:end])
            if (end - k) % 2 == 0:
                break
            chunks.append('"')
            j = end + 1
        value = "".join(chunks)
        if "\\" in value:
            value = _ESCAPE.sub(_unescape, value)
        labels[key] = value
        i = end + 1
    return labels


def split_sample(line: str) -> tuple[str, dict[str, str], float]:
    """One sample line -> (metric name, labels, value). Raises ValueError on a malformed line."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rfind("}")
        if close < brace:
            raise ValueError(f"unbalanced braces: {line[:80]!r}")
        name = line[:brace]
        labels = parse_labels(line[brace + 1 : close])
        rest = line[close + 1 :].split()
    else:
        parts = line.split()
        name, labels, rest = parts[0], {}, parts[1:]
    if not rest:
        raise ValueError(f"sample without a value: {line[:80]!r}")
    return name, labels, float(rest[0])  # a trailing timestamp, if any, is ignored


def _int_label(labels: dict[str, str], key: str) -> int | None:
    raw = labels.get(key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # vLLM writes "None" for unset config fields


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Aggregate the routing gauges of one vLLM ``/metrics`` scrape.

    Only the wanted series' lines are looked at; a malformed one
    raises ValueError (the caller then treats the scrape as failed rather than trusting half of it).
    """
    out = EngineMetrics()
    for line in _wanted_lines(text):
        name, labels, value = split_sample(line)
        if math.isnan(value):
            continue
        if name in _GAUGES:
            model = out.by_model.setdefault(labels.get("model_name", ""), ModelMetrics())
            if name == RUNNING:
                model.num_running += value
                out.num_running = (out.num_running or 0.0) + value
            elif name == WAITING:
                model.num_waiting += value
                out.num_waiting = (out.num_waiting or 0.0) + value
            else:
                model.kv_cache_usage = max(model.kv_cache_usage, value)
                out.kv_cache_usage = value if out.kv_cache_usage is None else max(out.kv_cache_usage, value)
        elif name == CACHE_CONFIG:
            block_size = _int_label(labels, "block_size")
            if block_size is not None and out.block_size is None:
                out.block_size = block_size
            blocks = _int_label(labels, "num_gpu_blocks")
            if blocks is not None:
                out.num_gpu_blocks = (out.num_gpu_blocks or 0) + blocks
        elif name in COUNTERS:
            short = name.removeprefix("vllm:").removesuffix("_total")
            out.counters[short] = out.counters.get(short, 0.0) + value
    return out


def _wanted_lines(text: str) -> list[str]:
    """The sample lines of the wanted series, found by substring search (C speed) rather than by
    splitting and testing every line of the ~600-line scrape."""
    lines = []
    for name in _WANTED:
        pos = text.find(name)
        while pos >= 0:
            end = pos + len(name)
            # a sample starts a line, and the name ends there (not num_requests_waiting_by_reason)
            if (pos == 0 or text[pos - 1] == "\n") and text[end : end + 1] in ("{", " ", "", "\n", "\r"):
                stop = text.find("\n", end)
                lines.append(text[pos : len(text) if stop < 0 else stop].rstrip("\r"))
            pos = text.find(name, end)
    return lines

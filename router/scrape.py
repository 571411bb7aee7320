"""Parse the few vLLM 0.24 metrics the router routes on out of a Prometheus text scrape.

A full vLLM scrape is ~600 lines (50 KB), almost all histogram buckets; the router needs ten
series. :func:`parse_vllm_metrics` finds the lines that start with the names it wants in one
regular-expression pass (C speed: the other lines are never split or looked at in Python), so it
never builds a full exposition model. Pure: text in, :class:`EngineMetrics` out.
:class:`ScrapeParser` is the same for one engine's successive scrapes, skipping the work a scrape
that has not changed would repeat: an idle engine's body, the static ``cache_config_info`` line.

An engine pod may serve several models (``model_name`` label) or run several data-parallel engine
cores (``engine`` label). The pod-level figures aggregate over all series: running and waiting
requests add up, KV usage is the fullest core's (a new prefix evicts there first), GPU blocks add
up; per-model figures are kept in :attr:`EngineMetrics.by_model`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode

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
    # the engine's own queue wait (router/queue_wait.py): a histogram's sum and count, never buckets
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_queue_time_seconds_count",
)
_GAUGES = (RUNNING, WAITING, KV_USAGE)
_WANTED = (*_GAUGES, CACHE_CONFIG, *COUNTERS)
# The scrape asks for just these samples. vLLM 0.24 serves ``/metrics`` twice: the instrumentator's
# route answers that exact path with everything (~50 KB), and prometheus_client's own app, mounted
# under it, answers ``/metrics/`` and honours ``name[]`` (its restricted registry): ~2 KB. A whole
# scrape a second per engine cost the router ~0.5 ms of CPU each (half its idle CPU with two
# engines) and the engine's API server the rendering of every histogram; an engine whose
# ``/metrics/`` does not filter (or does not exist) is scraped at ``/metrics``
# (:attr:`ScrapeParser.filtered`).
FILTERED_SCRAPE = "/metrics/?" + urlencode([("name[]", name) for name in _WANTED])
FULL_SCRAPE = "/metrics"
_ESCAPE = re.compile(r"\\(.)")
# A wanted sample line: at a line's start, the name, then its labels, its value or the line's end
# (not vllm:num_requests_waiting_by_reason). The names' common prefix, "\nvllm:", is what the
# regular-expression engine searches for, at C speed; everything else on other lines is skipped.
_WANTED_LINE = re.compile(r"\n(?:" + "|".join(map(re.escape, _WANTED)) + r")(?=[{ \r\n]|\Z)[^\n]*")
Sample = tuple[str, dict[str, str], float]


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
    return _aggregate([split_sample(line) for line in wanted_lines(text)])


def wanted_lines(text: str) -> list[str]:
    """The sample lines of the wanted series, in the scrape's order (without their line ends)."""
    # the leading newline makes a sample on the first line start a line like the others
    return [match[1:].rstrip("\r") for match in _WANTED_LINE.findall("\n" + text)]


class ScrapeParser:
    """:func:`parse_vllm_metrics` for the successive scrapes of one engine, without repeating work.

    A body equal to the last one gives the last result (a vLLM body only changes when the engine
    did something); otherwise only the wanted lines that changed since the last scrape are split
    (the ``cache_config_info`` line, the longest, never does). The result is shared between equal
    scrapes: read it, do not change it. A malformed scrape raises ValueError and leaves the last
    good one remembered. ``filtered``: scrape the engine at :data:`FILTERED_SCRAPE` (until it is
    found not to filter), else at :data:`FULL_SCRAPE`.
    """

    @property
    def path(self) -> str:
        """Where to scrape the engine next."""
        return FILTERED_SCRAPE if self.filtered else FULL_SCRAPE

    __slots__ = ("_lines", "_metrics", "_samples", "_text", "filtered")

    def __init__(self) -> None:
        self.filtered = True  # the engine's scrapes are asked for the wanted samples alone
        self._text: str | None = None
        self._lines: list[str] = []
        self._samples: dict[str, Sample] = {}
        self._metrics = EngineMetrics()

    def parse(self, text: str) -> EngineMetrics:
        if text == self._text:
            return self._metrics
        lines = wanted_lines(text)
        if lines != self._lines or self._text is None:
            known = self._samples
            samples = [known[line] if line in known else split_sample(line) for line in lines]
            self._metrics = _aggregate(samples)
            self._samples = dict(zip(lines, samples, strict=True))
            self._lines = lines
        self._text = text
        return self._metrics


def _aggregate(samples: list[Sample]) -> EngineMetrics:
    out = EngineMetrics()
    for name, labels, value in samples:
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

"""PromQL building blocks shared by the dashboards and the rules, so both always agree.

Conventions (the ones dashboards in the wild get wrong): counters are always ``rate()``-d, quantiles
are ``histogram_quantile`` over ``sum by (le, ...)``, ratios divide sums of rates and are guarded with
``(den > 0)`` so idle periods show no data instead of NaN, and every selector filters on the ``$model``
and ``$namespace`` template variables.
"""

from __future__ import annotations

import re

# vLLM labels its series with model_name; the router uses the same label so joins work.
ENGINE_SEL = 'model_name=~"$model", namespace=~"$namespace"'
ROUTER_SEL = 'model_name=~"$model", namespace=~"$namespace"'
# Router series without a model label (per engine, per policy) still filter on namespace.
NS_SEL = 'namespace=~"$namespace"'
RATE_WINDOW = "$__rate_interval"


def selector(metric: str, sel: str = ENGINE_SEL) -> str:
    return f"{metric}{{{sel}}}" if sel else metric


def rate(metric: str, sel: str = ENGINE_SEL, window: str = RATE_WINDOW) -> str:
    return f"rate({selector(metric, sel)}[{window}])"


def sum_rate(metric: str, by: str = "", sel: str = ENGINE_SEL, window: str = RATE_WINDOW) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({rate(metric, sel, window)})"


def quantile(q: float, histogram: str, by: str = "", sel: str = ENGINE_SEL, window: str = RATE_WINDOW) -> str:
    """``histogram_quantile`` over the sum of bucket rates, grouped by ``le`` plus ``by``."""
    groups = "le" + (f", {by}" if by else "")
    return f"histogram_quantile({q}, sum by ({groups}) ({rate(histogram + '_bucket', sel, window)}))"


def divide(numerator: str, denominator: str) -> str:
    """``num / (den > 0)``: empty, never NaN or Inf, when the denominator is 0."""
    return f"({numerator} / ({denominator} > 0))"


def share(numerator: str, denominator: str) -> str:
    """``num / (den > 0)`` where a missing numerator counts as 0 while the denominator exists.

    For error ratios: with traffic but no errors the numerator has no series at all (no 5xx label
    value was ever seen), and a plain :func:`divide` would show "No data" under full load. ``or
    (den * 0)`` fills in 0 with the denominator's labels; with no traffic the result stays empty.
    """
    return f"(({numerator} or ({denominator} * 0)) / ({denominator} > 0))"


def ratio(
    numerator: str, denominator: str, by: str = "", sel: str = ENGINE_SEL, window: str = RATE_WINDOW
) -> str:
    """Sum of rates over sum of rates, guarded by :func:`divide`."""
    return divide(sum_rate(numerator, by, sel, window), sum_rate(denominator, by, sel, window))


def mean(histogram: str, by: str = "", sel: str = ENGINE_SEL, window: str = RATE_WINDOW) -> str:
    """Windowed mean of a histogram: rate of ``_sum`` over rate of ``_count`` (never lifetime)."""
    return divide(
        sum_rate(histogram + "_sum", by, sel, window), sum_rate(histogram + "_count", by, sel, window)
    )


# What Grafana substitutes at query time; tests and the preview do the same before asking Prometheus.
_VARIABLE = re.compile(r"\$(\{)?(__rate_interval|__interval|__range|[A-Za-z_][A-Za-z0-9_]*)(?(1)\})")


def expand(expr: str, rate_interval: str = "15s", values: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced: windows by ``rate_interval``, filters by ``.*``."""
    given = values or {}

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name in given:
            return given[name]
        if name.startswith("__"):
            return rate_interval
        return ".*"

    return _VARIABLE.sub(sub, expr)


_STRIP = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # string literals
    r"|\{[^}]*\}"  # label matchers
    r"|\[[^\]]*\]"  # range and subquery windows
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"  # label lists
)
_IDENT = re.compile(r"(?<![\w:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names selected in ``expr``: identifiers that are not functions, keywords or labels."""
    bare = _STRIP.sub(" ", expr)
    return {m.group(1) for m in _IDENT.finditer(bare)} - _KEYWORDS

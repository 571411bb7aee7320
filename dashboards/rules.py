"""Recording and alert rules for kvstack, as data; rendered to a Prometheus rule file.

Recording rules precompute the expensive queries (quantiles and ratios over every engine); alerts
are written against them where possible so that rule evaluation stays cheap. Each alert names its
``inputs``: queries that must return data on a live stack, so a renamed metric or label is caught
even while the alert itself (rightly) stays silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvstack.dashboards import autoscaler as op
from kvstack.dashboards.adapters import LORA_OPS
from kvstack.dashboards.promql import divide, quantile, ratio, sum_rate

W = "5m"
BY_MODEL = "model_name, namespace"
# Targets are selected by the `kvstack_component` target label, which the chart's PodMonitors and
# ServiceMonitor relabel from the pods' app.kubernetes.io/component label (and the local scrape config
# sets alike). Job names follow the release and nameOverride/fullnameOverride, so a `job` regex would
# silently stop matching on a renamed release.
COMPONENT_LABEL = "kvstack_component"
ENGINE = f'{COMPONENT_LABEL}="engine"'
ROUTER = f'{COMPONENT_LABEL}="router"'
REDIS = f'{COMPONENT_LABEL}="redis"'
# Every alert links its page in docs/runbooks/ (tests/observability/test_runbooks.py keeps them paired).
RUNBOOK_BASE = "https://github.com/kvstack/kvstack/blob/main/docs/runbooks/"
# The TTFT SLO: 99% of requests see their first token within 1 s (1.0 is a vLLM bucket boundary).
TTFT_SLO_SECONDS = "1.0"
TTFT_SLO_OBJECTIVE = 0.99
BUDGET = round(1 - TTFT_SLO_OBJECTIVE, 6)


@dataclass(frozen=True, slots=True)
class Record:
    record: str
    expr: str


@dataclass(frozen=True, slots=True)
class Alert:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    inputs: tuple[str, ...]
    # Alerts on operator series: verified live by tests/operator/test_dashboards_live.py (needs a
    # cluster) and by promtool unit tests; the simulator-only live test skips them.
    needs_operator: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK_BASE}{self.alert}.md"


def _slo_errors(window: str) -> str:
    bucket = f'vllm:time_to_first_token_seconds_bucket{{le="{TTFT_SLO_SECONDS}"}}'
    good = f"sum by ({BY_MODEL}) (rate({bucket}[{window}]))"
    total = f"sum by ({BY_MODEL}) (rate(vllm:time_to_first_token_seconds_count[{window}]))"
    return f"1 - {divide(good, total)}"


RECORDS: list[Record] = [
    Record(
        "kvstack:vllm_ttft_seconds:p90_5m", quantile(0.9, "vllm:time_to_first_token_seconds", BY_MODEL, "", W)
    ),
    Record(
        "kvstack:vllm_ttft_seconds:p99_5m",
        quantile(0.99, "vllm:time_to_first_token_seconds", BY_MODEL, "", W),
    ),
    Record(
        "kvstack:vllm_itl_seconds:p90_5m", quantile(0.9, "vllm:inter_token_latency_seconds", BY_MODEL, "", W)
    ),
    Record(
        "kvstack:vllm_prefix_cache_hit:ratio_rate5m",
        ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", BY_MODEL, "", W),
    ),
    Record(
        "kvstack:vllm_external_prefix_cache_hit:ratio_rate5m",
        ratio(
            "vllm:external_prefix_cache_hits_total",
            "vllm:external_prefix_cache_queries_total",
            BY_MODEL,
            "",
            W,
        ),
    ),
    Record(
        "kvstack:vllm_generation_tokens:rate5m", sum_rate("vllm:generation_tokens_total", BY_MODEL, "", W)
    ),
    Record(
        "kvstack:vllm_request_errors:ratio_rate5m",
        divide(
            sum_rate("vllm:request_success_total", BY_MODEL, 'finished_reason="error"', W),
            sum_rate("vllm:request_success_total", BY_MODEL, "", W),
        ),
    ),
    Record("kvstack:vllm_num_requests_waiting:sum", f"sum by ({BY_MODEL}) (vllm:num_requests_waiting)"),
    Record("kvstack:vllm_kv_cache_usage:max", f"max by ({BY_MODEL}) (vllm:kv_cache_usage_perc)"),
    # Share of requests whose TTFT exceeded the SLO, over the windows of the burn-rate alerts.
    *(
        Record(f"kvstack:vllm_ttft_slo_errors:ratio_rate{w}", _slo_errors(w))
        for w in ("5m", "30m", "1h", "6h")
    ),
    Record(
        "kvstack:router_requests:rate5m",
        sum_rate("kvstack_router_requests_total", f"{BY_MODEL}, status", "", W),
    ),
    Record(
        "kvstack:router_errors:ratio_rate5m",
        divide(
            sum_rate("kvstack_router_requests_total", BY_MODEL, 'status=~"5.."', W),
            sum_rate("kvstack_router_requests_total", BY_MODEL, "", W),
        ),
    ),
    Record(
        "kvstack:router_ttft_seconds:p99_5m",
        quantile(0.99, "kvstack_router_time_to_first_token_seconds", BY_MODEL, "", W),
    ),
]

_MODEL_SEEN = f"group by ({BY_MODEL}) (max_over_time(vllm:num_requests_running[1h]))"
_MODEL_NOW = f"group by ({BY_MODEL}) (vllm:num_requests_running)"

ALERTS: list[Alert] = [
    Alert(
        "KvstackEngineDown",
        f"up{{{ENGINE}}} == 0",
        "2m",
        "critical",
        "Engine {{ $labels.pod }} cannot be scraped",
        "Prometheus has not scraped the vLLM engine {{ $labels.namespace }}/{{ $labels.pod }} for 2 "
        "minutes: it crashed, hangs or is still loading the model.",
        (f"up{{{ENGINE}}}",),
    ),
    Alert(
        "KvstackModelHasNoEngine",
        f"{_MODEL_SEEN} unless on ({BY_MODEL}) {_MODEL_NOW}",
        "2m",
        "critical",
        "No engine serves model {{ $labels.model_name }}",
        "Engines of {{ $labels.namespace }}/{{ $labels.model_name }} reported in the last hour, but none "
        "does now: every request for this model fails.",
        (_MODEL_SEEN, _MODEL_NOW),
    ),
    Alert(
        "KvstackRouterNoAvailableEngine",
        "sum by (namespace, pod) (kvstack_router_engine_available) == 0",
        "1m",
        "critical",
        "Router {{ $labels.pod }} has no available engine",
        "Every engine the router knows is unhealthy (requests get 503) or ejected (requests go to the "
        "ejected ones as a last resort, and mostly fail): check the engines and the router's upstream "
        "errors.",
        ("sum by (namespace, pod) (kvstack_router_engine_available)",),
    ),
    Alert(
        "KvstackRouterDown",
        f"up{{{ROUTER}}} == 0",
        "2m",
        "critical",
        "Router {{ $labels.pod }} cannot be scraped",
        "Prometheus has not scraped the router {{ $labels.namespace }}/{{ $labels.pod }} for 2 minutes.",
        (f"up{{{ROUTER}}}",),
    ),
    Alert(
        "KvstackRouterKVEventsLost",
        "sum by (namespace, pod) (rate(kvstack_router_kv_event_batches_lost_total[5m])) > 0",
        "10m",
        "warning",
        "Router {{ $labels.pod }} keeps losing KV events",
        "For 10 minutes the router has lost KV-event batches that neither the live stream nor a replay "
        "delivered: its block index drifts from the engines and cache-aware routing degrades. Check the "
        "engines' replay endpoints and the network between router and engines.",
        ("sum by (namespace, pod) (rate(kvstack_router_kv_event_batches_lost_total[5m]))",),
    ),
    Alert(
        "KvstackEngineQueueGrowing",
        "kvstack:vllm_num_requests_waiting:sum > 10 and "
        "deriv(kvstack:vllm_num_requests_waiting:sum[10m]) > 0",
        "10m",
        "warning",
        "Requests pile up for model {{ $labels.model_name }}",
        "More than 10 requests wait in the engines of {{ $labels.model_name }} and the queue keeps "
        "growing: add replicas or check the autoscaler.",
        ("kvstack:vllm_num_requests_waiting:sum", "deriv(kvstack:vllm_num_requests_waiting:sum[10m])"),
    ),
    Alert(
        "KvstackKVCacheNearlyFull",
        "kvstack:vllm_kv_cache_usage:max > 0.9",
        "10m",
        "warning",
        "KV cache above 90% for model {{ $labels.model_name }}",
        "An engine of {{ $labels.model_name }} has used more than 90% of its KV cache for 10 minutes; "
        "expect preemptions and lower prefix-cache hit rates.",
        ("kvstack:vllm_kv_cache_usage:max",),
    ),
    Alert(
        "KvstackTTFTBudgetBurnFast",
        f"kvstack:vllm_ttft_slo_errors:ratio_rate1h > (14.4 * {BUDGET}) and "
        f"kvstack:vllm_ttft_slo_errors:ratio_rate5m > (14.4 * {BUDGET})",
        "2m",
        "critical",
        "TTFT SLO budget burning fast for {{ $labels.model_name }}",
        f"More than 14.4x the error budget of the TTFT SLO ({round(TTFT_SLO_OBJECTIVE * 100)}% under "
        f"{TTFT_SLO_SECONDS}s) is being spent: at this rate a 30-day budget lasts 2 days.",
        ("kvstack:vllm_ttft_slo_errors:ratio_rate1h", "kvstack:vllm_ttft_slo_errors:ratio_rate5m"),
    ),
    Alert(
        "KvstackTTFTBudgetBurnSlow",
        f"kvstack:vllm_ttft_slo_errors:ratio_rate6h > (6 * {BUDGET}) and "
        f"kvstack:vllm_ttft_slo_errors:ratio_rate30m > (6 * {BUDGET})",
        "15m",
        "warning",
        "TTFT SLO budget burning for {{ $labels.model_name }}",
        "More than 6x the TTFT error budget is being spent, over 6 hours and still now: at this rate a "
        "30-day budget lasts 5 days.",
        ("kvstack:vllm_ttft_slo_errors:ratio_rate6h", "kvstack:vllm_ttft_slo_errors:ratio_rate30m"),
    ),
    Alert(
        "KvstackEngineErrors",
        "kvstack:vllm_request_errors:ratio_rate5m > 0.05",
        "5m",
        "warning",
        "Engine errors above 5% for {{ $labels.model_name }}",
        "More than 5% of the requests finished by the engines of {{ $labels.model_name }} ended in error.",
        ("kvstack:vllm_request_errors:ratio_rate5m",),
    ),
    Alert(
        "KvstackRouterErrors",
        "kvstack:router_errors:ratio_rate5m > 0.05",
        "5m",
        "critical",
        "Router 5xx above 5% for {{ $labels.model_name }}",
        "More than 5% of the router's answers for {{ $labels.model_name }} are 5xx: engines fail, time "
        "out or none is available.",
        ("kvstack:router_errors:ratio_rate5m",),
    ),
    Alert(
        "KvstackRedisDown",
        f"up{{{REDIS}}} == 0 or redis_up{{{REDIS}}} == 0",
        "2m",
        "warning",
        "The shared LMCache store (Redis) is down",
        "Engines keep serving by recomputing, but cross-pod KV sharing through LMCache is lost until "
        "Redis is back.",
        (f"redis_up{{{REDIS}}}",),
    ),
    Alert(
        "KvstackLMCacheEvictionFailing",
        "sum by (namespace, pod) (rate(lmcache:local_cpu_evict_failed_count_total[5m])) > 0",
        "10m",
        "warning",
        "LMCache in {{ $labels.pod }} cannot make room in its CPU tier",
        "For 10 minutes LMCache in {{ $labels.namespace }}/{{ $labels.pod }} has found its CPU tier "
        "full with nothing it may evict (chunks pinned by lookups or held by Redis writes still "
        "queued): stores are cut short, so prefixes this pod computes are no longer offloaded or "
        "shared. A full tier alone is normal (LMCache evicts the least recently used chunk).",
        ("sum by (namespace, pod) (rate(lmcache:local_cpu_evict_failed_count_total[5m]))",),
    ),
    Alert(
        "KvstackAutoscalerStalled",
        f"time() - {op.LAST_EVAL} > 300",
        "5m",
        "critical",
        "The autoscaler stopped evaluating {{ $labels.model_name }}",
        "The operator has not evaluated {{ $labels.namespace }}/{{ $labels.model_name }} for over 5 "
        "minutes: replicas no longer follow load.",
        (op.LAST_EVAL,),
        needs_operator=True,
    ),
    Alert(
        "KvstackScaleUpStalled",
        f"{op.DESIRED} > {op.READY}",
        "15m",
        "warning",
        "{{ $labels.model_name }} has fewer ready replicas than desired",
        "The autoscaler wants more replicas of {{ $labels.namespace }}/{{ $labels.model_name }} than "
        "are ready, for 15 minutes: pods are pending (no GPU) or fail to start.",
        (op.DESIRED, op.READY),
        needs_operator=True,
    ),
    Alert(
        "KvstackAutoscalerBlind",
        f"max({op.PROM_UP}) == 0",
        "5m",
        "warning",
        "The autoscaler cannot query Prometheus",
        "The operator's Prometheus queries fail, so it holds every model at its current size.",
        (op.PROM_UP,),
        needs_operator=True,
    ),
    # Flow control (router/flow/): refusals and objective misses, each for 15 minutes.
    Alert(
        "KvstackFlowSheddingSustained",
        divide(
            "sum by (namespace) (rate(kvstack_router_flow_shed_total[5m]))",
            "sum by (namespace) (rate(kvstack_router_requests_total[5m]))",
        )
        + " > 0.05",
        "15m",
        "warning",
        "The router refuses more than 5% of requests in {{ $labels.namespace }}",
        "Flow control has answered 429 to more than 5% of requests for 15 minutes: the engines are "
        "saturated and demand exceeds capacity; add replicas or check the autoscaler.",
        (
            "sum by (namespace) (rate(kvstack_router_flow_shed_total[5m]))",
            "sum by (namespace) (rate(kvstack_router_requests_total[5m]))",
        ),
    ),
    Alert(
        "KvstackFlowObjectiveMisses",
        divide(
            f"sum by ({BY_MODEL}, class) (rate(kvstack_router_flow_objective_misses_total[5m]))",
            f"sum by ({BY_MODEL}, class) (rate(kvstack_router_flow_goodput_total[5m]))"
            f" + sum by ({BY_MODEL}, class) (rate(kvstack_router_flow_objective_misses_total[5m]))",
        )
        + " > 0.1",
        "15m",
        "warning",
        "Class {{ $labels.class }} of {{ $labels.model_name }} misses its TTFT objective",
        "More than 10% of admitted {{ $labels.class }} requests for {{ $labels.model_name }} got their "
        "first token later than their class's objective for 15 minutes: admission predicts too "
        "optimistically or the engines slowed down.",
        (
            f"sum by ({BY_MODEL}, class) (rate(kvstack_router_flow_objective_misses_total[5m]))",
            f"sum by ({BY_MODEL}, class) (rate(kvstack_router_flow_goodput_total[5m]))",
        ),
    ),
    Alert(
        "KvstackAutoscalerThrashing",
        f'sum by ({BY_MODEL}) (increase({op.DECISIONS}{{direction="up"}}[30m])) >= 2 and '
        f'sum by ({BY_MODEL}) (increase({op.DECISIONS}{{direction="down"}}[30m])) >= 2',
        "10m",
        "warning",
        "The autoscaler is thrashing {{ $labels.model_name }}",
        "{{ $labels.model_name }} was scaled both up and down at least twice in 30 minutes: widen the "
        "thresholds' gap or lengthen the cooldown.",
        (op.DECISIONS,),
        needs_operator=True,
    ),
    # LoRA (dashboards/adapters.py). The operator retries a wanted load every evaluation: failures
    # in every 5-minute window for 10 minutes are a load that keeps failing, not a blip.
    Alert(
        "KvstackLoraAdapterLoadFailing",
        f'sum by ({BY_MODEL}) (increase({LORA_OPS}{{operation="load", result="failure"}}[5m])) > 0',
        "10m",
        "warning",
        "LoRA adapters of {{ $labels.model_name }} keep failing to load",
        "The operator's loads of adapters onto {{ $labels.model_name }} engines have failed for 10 minutes: "
        "requests for those adapters wait or fail. status.adapters[].lastError says why.",
        (LORA_OPS,),
        needs_operator=True,
    ),
]


def rule_groups() -> list[dict[str, Any]]:
    """Rule groups in Prometheus' rule-file structure (also the PrometheusRule ``spec.groups``)."""
    return [
        {"name": "kvstack.recording", "rules": [{"record": r.record, "expr": r.expr} for r in RECORDS]},
        {
            "name": "kvstack.alerts",
            "rules": [
                {
                    "alert": a.alert,
                    "expr": a.expr,
                    "for": a.for_,
                    "labels": {"severity": a.severity, **a.labels},
                    "annotations": {
                        "summary": a.summary,
                        "description": a.description,
                        "runbook_url": a.runbook_url,
                    },
                }
                for a in ALERTS
            ],
        },
    ]

"""The four kvstack dashboards: Overview, Engines (per pod), Router and Autoscaler."""

from __future__ import annotations

from kvstack.dashboards import router
from kvstack.dashboards.adapters import adapters_row
from kvstack.dashboards.autoscaler import DESIRED, autoscaler_rows, replicas_panel
from kvstack.dashboards.engines import ITL, PER_MODEL, PER_POD, TTFT, cache_row, engine_rows, latency
from kvstack.dashboards.kvstore import lmcache_row, redis_row
from kvstack.dashboards.panels import Dashboard, Panel, Query, Row, Variable
from kvstack.dashboards.promql import ENGINE_SEL, ROUTER_SEL, quantile, ratio, selector, share, sum_rate

NAMESPACE = Variable("namespace", "Namespace", "label_values(vllm:num_requests_running, namespace)")
MODEL = Variable(
    "model", "Model", 'label_values(vllm:num_requests_running{namespace=~"$namespace"}, model_name)'
)
POD = Variable(
    "pod",
    "Pod",
    'label_values(vllm:num_requests_running{namespace=~"$namespace", model_name=~"$model"}, pod)',
)
ROUTER_MODEL = Variable(
    "model", "Model", 'label_values(kvstack_router_requests_total{namespace=~"$namespace"}, model_name)'
)
OPERATOR_MODEL = Variable("model", "Model", f'label_values({DESIRED}{{namespace=~"$namespace"}}, model_name)')


def _stat(
    title: str,
    expr: str,
    unit: str,
    description: str,
    thresholds: tuple[tuple[float, str], ...] = (),
    no_value: str = "No data",
    max: float | None = None,
) -> Panel:
    return Panel(
        title,
        [Query(expr)],
        unit=unit,
        description=description,
        kind="stat",
        width=4,
        height=4,
        thresholds=thresholds,
        no_value=no_value,
        max=max,
    )


def _tiles() -> Row:
    return Row(
        "Service",
        [
            _stat(
                "Requests/s",
                sum_rate(router.REQUESTS, sel=ROUTER_SEL),
                "reqps",
                "Requests answered by the router, every status (kvstack_router_requests_total).",
            ),
            _stat(
                "Router 5xx ratio",
                share(
                    sum_rate(router.REQUESTS, sel=router.ERRORS_SEL),
                    sum_rate(router.REQUESTS, sel=ROUTER_SEL),
                ),
                "percentunit",
                "Share of router answers with a 5xx status: 0 under traffic without errors, "
                "No traffic only when the router answered nothing in the window.",
                thresholds=((0.01, "orange"), (0.05, "red")),
                no_value="No traffic",
            ),
            _stat(
                "TTFT p99 (router)",
                quantile(0.99, router.TTFT, sel=ROUTER_SEL),
                "s",
                "p99 time to first token seen by clients (kvstack_router_time_to_first_token_seconds).",
                thresholds=((1.0, "orange"), (5.0, "red")),
                no_value="No traffic",
            ),
            _stat(
                "Engines serving",
                f"count({selector('vllm:num_requests_running')})",
                "short",
                "Engine pods Prometheus scrapes right now (series of vllm:num_requests_running).",
                thresholds=(),
            ),
            _stat(
                "Requests waiting",
                f"sum({selector('vllm:num_requests_waiting')})",
                "short",
                "Requests queued in all engines (vllm:num_requests_waiting).",
                thresholds=((10, "orange"), (50, "red")),
            ),
            _stat(
                "KV cache (max)",
                f"max({selector('vllm:kv_cache_usage_perc')})",
                "percentunit",
                "KV cache usage of the most loaded engine (vllm:kv_cache_usage_perc).",
                max=1,
                thresholds=((0.9, "orange"), (0.98, "red")),
            ),
        ],
    )


def _latency() -> Row:
    by, sel = "model_name", ENGINE_SEL
    return Row(
        "Latency: router and engines",
        [
            Panel(
                "Time to first token: router vs engine",
                [
                    *(
                        Query(
                            quantile(q, router.TTFT, by, ROUTER_SEL),
                            f"router p{round(q * 100)} {{{{model_name}}}}",
                        )
                        for q in (0.5, 0.9, 0.99)
                    ),
                    *(
                        Query(quantile(q, TTFT, by, sel), f"engine p{round(q * 100)} {{{{model_name}}}}")
                        for q in (0.5, 0.9, 0.99)
                    ),
                ],
                unit="s",
                description="p50/p90/p99 TTFT at the router (what clients see) and at the engines "
                "(kvstack_router_time_to_first_token_seconds, vllm:time_to_first_token_seconds).",
            ),
            latency("Inter-token latency (engine)", ITL, PER_MODEL),
            router.router_overhead(),
            Panel(
                "Output tokens/s",
                [Query(sum_rate("vllm:generation_tokens_total", by, sel), "{{model_name}}")],
                unit="short",
                stack=True,
                description="Generated tokens per second (vllm:generation_tokens_total).",
            ),
        ],
    )


def _saturation() -> Row:
    cache = cache_row(PER_MODEL).panels
    return Row(
        "Saturation, caching and scale",
        [
            Panel(
                "Requests waiting (engines and router)",
                [
                    Query(
                        f"sum by (model_name) ({selector('vllm:num_requests_waiting')})",
                        "engines {{model_name}}",
                    ),
                    Query(
                        f"sum by (model_name) ({selector('kvstack_router_queued_requests', ROUTER_SEL)})",
                        "router {{model_name}}",
                    ),
                ],
                unit="short",
                description="Requests queued in the engines' schedulers (vllm:num_requests_waiting) and in "
                "the router's admission queue (kvstack_router_queued_requests).",
            ),
            cache[0],
            Panel(
                "Prefix and LMCache hit rates",
                [
                    Query(
                        ratio(
                            "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "model_name"
                        ),
                        "GPU prefix {{model_name}}",
                    ),
                    Query(
                        ratio(
                            "vllm:external_prefix_cache_hits_total",
                            "vllm:external_prefix_cache_queries_total",
                            "model_name",
                        ),
                        "LMCache {{model_name}}",
                    ),
                ],
                unit="percentunit",
                max=1,
                description="Prompt tokens hit in the GPU prefix cache, and in LMCache, over tokens "
                "queried (vllm:prefix_cache_*, vllm:external_prefix_cache_*).",
            ),
            replicas_panel(),
        ],
    )


def overview() -> Dashboard:
    return Dashboard(
        "kvstack-overview",
        "kvstack / Overview",
        "Traffic, errors, latency at the router and the engines, saturation, caching and scale per model.",
        [_tiles(), Row("Traffic", [router.request_rate(), router.error_ratio()]), _latency(), _saturation()],
        variables=(NAMESPACE, MODEL),
    )


def engines() -> Dashboard:
    return Dashboard(
        "kvstack-engines",
        "kvstack / Engines",
        "vLLM 0.24 engine pods one by one: latency, queues, KV cache, prefix cache, LMCache and the "
        "Redis store the engines share.",
        [*engine_rows(PER_POD), lmcache_row(), redis_row()],
        variables=(NAMESPACE, MODEL, POD),
    )


def router_dashboard() -> Dashboard:
    return Dashboard(
        "kvstack-router",
        "kvstack / Router",
        "The cache-aware router: traffic per engine, latency it adds, decisions, retries, ejections, "
        "disconnects and rejections.",
        [*router.router_rows(), adapters_row()],
        variables=(NAMESPACE, ROUTER_MODEL),
    )


def autoscaler() -> Dashboard:
    return Dashboard(
        "kvstack-autoscaler",
        "kvstack / Autoscaler",
        "The operator's autoscaler: desired vs ready replicas, decisions and their reasons, staleness.",
        autoscaler_rows(),
        variables=(NAMESPACE, OPERATOR_MODEL),
    )


def dashboards() -> dict[str, Dashboard]:
    """File stem -> dashboard."""
    return {
        "overview": overview(),
        "engines": engines(),
        "router": router_dashboard(),
        "autoscaler": autoscaler(),
    }

"""Router panels, on the ``kvstack_router_*`` series of ``kvstack.router.metrics``.

The traffic, latency, decision and client rows live here; the cache-aware routing row is in
``router_cache`` and the flow-control row in ``router_flow``.

Per-request series carry ``model_name`` (vLLM's label); per-engine series carry only ``engine`` (the
router's stable engine name) and per-policy series ``policy``, so those filter on namespace alone.
"""

from __future__ import annotations

from kvstack.dashboards.engines import TTFT as ENGINE_TTFT
from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import NS_SEL, ROUTER_SEL, quantile, selector, share, sum_rate
from kvstack.dashboards.router_cache import cache_aware_row
from kvstack.dashboards.router_flow import flow_control_row

REQUESTS = "kvstack_router_requests_total"
TTFT = "kvstack_router_time_to_first_token_seconds"
E2E = "kvstack_router_request_duration_seconds"
DECISION = "kvstack_router_routing_decision_seconds"
TOKENIZE = "kvstack_router_tokenize_seconds"
DISPATCH = "kvstack_router_dispatch_seconds"
ERRORS_SEL = ROUTER_SEL + ', status=~"5.."'


def request_rate() -> Panel:
    return Panel(
        "Requests/s by model and status",
        [Query(sum_rate(REQUESTS, "model_name, status", ROUTER_SEL), "{{model_name}} {{status}}")],
        unit="reqps",
        stack=True,
        description="Requests answered by the router (kvstack_router_requests_total); 499 means the "
        "client went away.",
    )


def error_ratio() -> Panel:
    return Panel(
        "Error ratio (router 5xx, engine errors)",
        [
            Query(
                share(
                    sum_rate(REQUESTS, "model_name", ERRORS_SEL), sum_rate(REQUESTS, "model_name", ROUTER_SEL)
                ),
                "router 5xx {{model_name}}",
            ),
            Query(
                share(
                    sum_rate(
                        "vllm:request_success_total",
                        "model_name",
                        ROUTER_SEL + ', finished_reason="error"',
                    ),
                    sum_rate("vllm:request_success_total", "model_name", ROUTER_SEL),
                ),
                "engine errors {{model_name}}",
            ),
        ],
        unit="percentunit",
        thresholds=((0.01, "orange"), (0.05, "red")),
        description="Share of router answers with a 5xx status, and of engine requests that finished "
        "with an error (errors after streaming started never show as 5xx); 0 under traffic without "
        "errors, empty without traffic.",
    )


def router_latency(title: str, histogram: str, what: str) -> Panel:
    return Panel(
        title,
        [
            Query(quantile(q, histogram, "model_name", ROUTER_SEL), f"p{round(q * 100)} {{{{model_name}}}}")
            for q in (0.5, 0.9, 0.99)
        ],
        unit="s",
        description=f"p50/p90/p99 of {histogram}: {what}",
    )


def router_overhead() -> Panel:
    return Panel(
        "Router overhead",
        [
            Query(
                f"{quantile(0.5, TTFT, 'model_name', ROUTER_SEL)} - "
                f"{quantile(0.5, ENGINE_TTFT, 'model_name', ROUTER_SEL)}",
                "p50 TTFT router - engine {{model_name}}",
            ),
            Query(quantile(0.99, DECISION, "policy", NS_SEL), "p99 routing decision {{policy}}"),
            *(
                Query(quantile(q, DISPATCH, "policy", NS_SEL), f"p{round(q * 100)} dispatch {{{{policy}}}}")
                for q in (0.5, 0.99)
            ),
        ],
        unit="s",
        min=None,
        description="Median TTFT seen at the router minus the engines' own median TTFT (network, "
        "proxy and queueing in the router), the p99 time spent choosing an engine, and the time from "
        "arrival to the request sent to an engine (kvstack_router_dispatch_seconds).",
    )


def in_flight() -> Panel:
    return Panel(
        "In-flight requests per engine",
        [
            Query(
                f"sum by (engine) ({selector('kvstack_router_engine_in_flight_requests', NS_SEL)})",
                "{{engine}}",
            )
        ],
        unit="short",
        description="Requests the router has dispatched to each engine and not yet finished.",
    )


def router_rows() -> list[Row]:
    return [
        Row(
            "Traffic",
            [
                request_rate(),
                error_ratio(),
                Panel(
                    "Requests/s per engine",
                    # engine="" marks answers no engine gave (e.g. 503 with none available).
                    [Query(sum_rate(REQUESTS, "engine", ROUTER_SEL + ', engine!=""'), "{{engine}}")],
                    unit="reqps",
                    stack=True,
                    description="Where the router sent requests (kvstack_router_requests_total by engine): "
                    "a skew shows cache affinity winning over load balance.",
                ),
                in_flight(),
            ],
        ),
        Row(
            "Latency",
            [
                router_latency(
                    "Time to first token (router)",
                    TTFT,
                    "arrival at the router to the first token forwarded (streams only).",
                ),
                router_latency(
                    "Request duration (router)", E2E, "arrival at the router to the last byte sent."
                ),
                Panel(
                    "Routing decision time",
                    [
                        *(
                            Query(
                                quantile(q, DECISION, "policy", NS_SEL), f"p{round(q * 100)} {{{{policy}}}}"
                            )
                            for q in (0.5, 0.99)
                        ),
                        *(
                            Query(
                                quantile(q, TOKENIZE, "policy, source", NS_SEL),
                                f"p{round(q * 100)} tokenize {{{{policy}}}} {{{{source}}}}",
                            )
                            for q in (0.5, 0.99)
                        ),
                    ],
                    unit="s",
                    description="Time the policy spends choosing an engine "
                    "(kvstack_router_routing_decision_seconds), and before that getting the prompt's "
                    "tokens, by source: the built-in tokenizer or the engine's /tokenize "
                    "(kvstack_router_tokenize_seconds).",
                ),
                router_overhead(),
            ],
        ),
        Row(
            "Decisions and failures",
            [
                Panel(
                    "Routing decisions/s by reason",
                    [
                        Query(
                            sum_rate("kvstack_router_routing_decisions_total", "policy, reason", NS_SEL),
                            "{{policy}} {{reason}}",
                        )
                    ],
                    unit="short",
                    stack=True,
                    description="Why the policy picked its engine (kvstack_router_routing_decisions_total): "
                    "cache hits against load fallbacks.",
                ),
                Panel(
                    "Retries/s by reason",
                    [
                        Query(
                            sum_rate("kvstack_router_retries_total", "model_name, reason", ROUTER_SEL),
                            "{{model_name}} {{reason}}",
                        )
                    ],
                    unit="short",
                    description="Requests sent again to another engine (kvstack_router_retries_total).",
                ),
                Panel(
                    "Upstream errors/s per engine",
                    [
                        Query(
                            sum_rate("kvstack_router_upstream_errors_total", "engine, kind", NS_SEL),
                            "{{engine}} {{kind}}",
                        )
                    ],
                    unit="short",
                    description="Failed attempts to reach an engine (kvstack_router_upstream_errors_total).",
                ),
                Panel(
                    "Ejections/s per engine",
                    [
                        Query(
                            sum_rate("kvstack_router_engine_ejections_total", "engine", NS_SEL), "{{engine}}"
                        )
                    ],
                    unit="short",
                    description="Engines taken out of rotation after consecutive failures "
                    "(kvstack_router_engine_ejections_total).",
                ),
                Panel(
                    "Available engines",
                    [
                        Query(
                            f"sum by (engine) ({selector('kvstack_router_engine_available', NS_SEL)})",
                            "{{engine}}",
                        )
                    ],
                    unit="short",
                    max=1,
                    description="1 while the router considers the engine healthy, not ejected and serving "
                    "(kvstack_router_engine_available).",
                ),
                Panel(
                    "Consecutive failures per engine",
                    [
                        Query(
                            f"max by (engine) "
                            f"({selector('kvstack_router_engine_consecutive_failures', NS_SEL)})",
                            "{{engine}}",
                        )
                    ],
                    unit="short",
                    description="The passive-ejection input (kvstack_router_engine_consecutive_failures).",
                ),
            ],
        ),
        Row(
            "Clients and admission",
            [
                Panel(
                    "Client disconnects/s",
                    [
                        Query(
                            sum_rate("kvstack_router_client_disconnects_total", "model_name", ROUTER_SEL),
                            "{{model_name}}",
                        )
                    ],
                    unit="short",
                    description="Clients that went away before the response ended; the router aborts the "
                    "engine request (kvstack_router_client_disconnects_total).",
                ),
                Panel(
                    "Rejections/s by reason",
                    [Query(sum_rate("kvstack_router_rejections_total", "reason", NS_SEL), "{{reason}}")],
                    unit="short",
                    stack=True,
                    description="Requests the router refused itself: auth, rate limits, full or timed-out "
                    "admission queue, body too large (kvstack_router_rejections_total).",
                ),
                Panel(
                    "Queued requests (router)",
                    [
                        Query(
                            f"sum by (model_name) ({selector('kvstack_router_queued_requests', ROUTER_SEL)})",
                            "{{model_name}}",
                        )
                    ],
                    unit="short",
                    description="Requests the router holds: waiting in its admission queue, or for "
                    "the first engine of a model scaled to zero (kvstack_router_queued_requests).",
                ),
            ],
        ),
        cache_aware_row(),
        flow_control_row(),
    ]

"""The router dashboard's flow-control row (router/flow/): the router's queue by class and tenant,
its wait, what it shed with 429, and which streamed requests met their class's TTFT objective.
"""

from __future__ import annotations

from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import NS_SEL, ROUTER_SEL, quantile, selector, sum_rate

FLOW_QUEUE = "kvstack_router_flow_queue_length"
FLOW_WAIT = "kvstack_router_flow_queue_wait_seconds"
FLOW_SHED = "kvstack_router_flow_shed_total"
FLOW_GOOD = "kvstack_router_flow_goodput_total"
FLOW_MISSES = "kvstack_router_flow_objective_misses_total"
FLOW_TTFT_RATIO = "kvstack_router_flow_ttft_prediction_ratio"


def flow_control_row() -> Row:
    """Flow control (router/flow/): the router's queue, what it refused, what met its objective."""
    return Row(
        "Flow control",
        [
            Panel(
                "Flow queue by class and tenant",
                [
                    Query(
                        f"sum by (class, tenant) ({selector(FLOW_QUEUE, ROUTER_SEL)})",
                        "{{class}} {{tenant}}",
                    )
                ],
                unit="short",
                stack=True,
                description="Requests waiting in the router while every engine of their model is "
                "saturated, by priority class and tenant (kvstack_router_flow_queue_length).",
            ),
            Panel(
                "Flow queue wait p50 / p90 by class",
                [
                    Query(quantile(0.5, FLOW_WAIT, "class", ROUTER_SEL), "p50 {{class}}"),
                    Query(quantile(0.9, FLOW_WAIT, "class", ROUTER_SEL), "p90 {{class}}"),
                ],
                unit="s",
                description="Time a dispatched request waited in the flow queue, 0 when an engine had "
                "room (kvstack_router_flow_queue_wait_seconds); the operator's queueWaitP90 signal.",
            ),
            Panel(
                "Shed (429)/s by reason and class",
                [Query(sum_rate(FLOW_SHED, "reason, class", NS_SEL), "{{reason}} {{class}}")],
                unit="reqps",
                stack=True,
                description="Requests flow control refused with 429 + Retry-After: slo (predicted to "
                "miss the class's TTFT objective by the wait), slo_room (the same for a warm request "
                "with an engine free, while the model was overloaded lately), slo_prefill (its own "
                "prefill misses the "
                "objective even on an idle engine, refused only while others wait or the model is "
                "saturated), wait_bound (predicted to wait past the queue's bound), over_share, "
                "displaced, queue_full, queue_timeout (kvstack_router_flow_shed_total).",
            ),
            Panel(
                "Goodput and objective misses/s by class",
                [
                    Query(sum_rate(FLOW_GOOD, "class", ROUTER_SEL), "within objective {{class}}"),
                    Query(sum_rate(FLOW_MISSES, "class", ROUTER_SEL), "missed {{class}}"),
                ],
                unit="reqps",
                description="Streamed requests whose TTFT met (kvstack_router_flow_goodput_total) or "
                "missed (kvstack_router_flow_objective_misses_total) their class's objective.",
            ),
            Panel(
                "Actual / predicted TTFT p10 / p50 / p90 by class",
                [
                    Query(quantile(0.1, FLOW_TTFT_RATIO, "class", NS_SEL), "p10 {{class}}"),
                    Query(quantile(0.5, FLOW_TTFT_RATIO, "class", NS_SEL), "p50 {{class}}"),
                    Query(quantile(0.9, FLOW_TTFT_RATIO, "class", NS_SEL), "p90 {{class}}"),
                ],
                unit="short",
                description="Actual over predicted TTFT of streamed requests (1: exact; above: later "
                "than the admission decision predicted), kvstack_router_flow_ttft_prediction_ratio.",
            ),
        ],
    )

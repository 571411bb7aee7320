"""Autoscaler panels, on the ``kvstack_operator_*`` contract written down in ``CONTRACT.md``."""

from __future__ import annotations

from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import ENGINE_SEL, selector, sum_rate

DESIRED = "kvstack_operator_desired_replicas"
CURRENT = "kvstack_operator_current_replicas"
READY = "kvstack_operator_ready_replicas"
DECISIONS = "kvstack_operator_scaling_decisions_total"
LAST_EVAL = "kvstack_operator_last_evaluation_timestamp_seconds"
EVAL_ERRORS = "kvstack_operator_evaluation_errors_total"
SIGNAL = "kvstack_operator_scaling_signal"
PROM_UP = "kvstack_operator_prometheus_up"
# Operator series carry the model's namespace and model_name, like the engines' series.
OP_SEL = ENGINE_SEL
MODEL_LABELS = ("namespace", "model_name")

# The series the operator must export (name -> type, labels); CONTRACT.md documents each one.
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    DESIRED: ("gauge", MODEL_LABELS),
    CURRENT: ("gauge", MODEL_LABELS),
    READY: ("gauge", MODEL_LABELS),
    DECISIONS: ("counter", (*MODEL_LABELS, "direction", "reason")),
    LAST_EVAL: ("gauge", MODEL_LABELS),
    EVAL_ERRORS: ("counter", (*MODEL_LABELS, "stage")),
    SIGNAL: ("gauge", (*MODEL_LABELS, "signal")),
    PROM_UP: ("gauge", ()),
    # LoRA (dashboards/adapters.py): the operator's adapter loads and unloads
    "kvstack_operator_lora_operations_total": ("counter", (*MODEL_LABELS, "operation", "result")),
}


def replicas_panel() -> Panel:
    return Panel(
        "Desired vs ready replicas",
        [
            Query(f"max by (model_name) ({selector(DESIRED, OP_SEL)})", "desired {{model_name}}"),
            Query(f"max by (model_name) ({selector(CURRENT, OP_SEL)})", "current {{model_name}}"),
            Query(f"max by (model_name) ({selector(READY, OP_SEL)})", "ready {{model_name}}"),
        ],
        unit="short",
        description="What the autoscaler wants (kvstack_operator_desired_replicas), what the Deployment "
        "asks for and what is ready: a lasting gap between desired and ready is a stalled scale-up.",
    )


def autoscaler_rows() -> list[Row]:
    return [
        Row(
            "Replicas",
            [
                replicas_panel(),
                Panel(
                    "Scaling signal",
                    [
                        Query(
                            f"max by (model_name, signal) ({selector(SIGNAL, OP_SEL)})",
                            "{{model_name}} {{signal}}",
                        )
                    ],
                    unit="short",
                    description="The inputs the last evaluation used (kvstack_operator_scaling_signal), "
                    "e.g. waiting requests per replica and KV usage.",
                ),
            ],
        ),
        Row(
            "Decisions",
            [
                Panel(
                    "Scaling decisions/s by direction and reason",
                    [
                        Query(
                            sum_rate(DECISIONS, "model_name, direction, reason", OP_SEL),
                            "{{model_name}} {{direction}} {{reason}}",
                        )
                    ],
                    unit="short",
                    stack=True,
                    description="Every evaluation ends in one decision (kvstack_operator_scaling_decisions_"
                    "total): up, down or none, and why (queue, kv_usage, idle, bounds, cooldown, "
                    "metrics_unavailable).",
                ),
                Panel(
                    "Time since last evaluation",
                    [
                        Query(
                            f"time() - max by (model_name) ({selector(LAST_EVAL, OP_SEL)})", "{{model_name}}"
                        )
                    ],
                    unit="s",
                    thresholds=((300, "red"),),
                    description="Seconds since the autoscaler last evaluated each model "
                    "(kvstack_operator_last_evaluation_timestamp_seconds); it should stay near the interval.",
                ),
                Panel(
                    "Evaluation errors/s",
                    [Query(sum_rate(EVAL_ERRORS, "model_name, stage", OP_SEL), "{{model_name}} {{stage}}")],
                    unit="short",
                    description="Failed evaluations by stage: querying Prometheus or patching the "
                    "Deployment (kvstack_operator_evaluation_errors_total).",
                ),
                Panel(
                    "Prometheus reachable from the operator",
                    [Query(f"min({PROM_UP})", "prometheus up")],
                    unit="bool",
                    max=1,
                    kind="stat",
                    width=6,
                    thresholds=(),
                    description="1 when the operator's last Prometheus query succeeded "
                    "(kvstack_operator_prometheus_up); without it, decisions are held.",
                ),
            ],
        ),
    ]

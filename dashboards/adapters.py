"""LoRA adapter panels: traffic and TTFT per adapter, adapters active per engine, loads and unloads.

Adapters are models to the router (clients send ``model: <adapter>``), so its ``model_name`` series
carry adapter names as they are. ``vllm:lora_requests_info`` (vLLM 0.24, only with ``--enable-lora``)
has no ``model_name``: its value is the time of the engine's last update and its labels name the
adapters of the running and waiting requests; each new label set is a new series, so the panel keeps
each pod's newest and takes the model filter from the pod's own ``vllm:num_requests_running``.
"""

from __future__ import annotations

from kvstack.dashboards import router
from kvstack.dashboards.panels import Panel, Query, Row
from kvstack.dashboards.promql import ENGINE_SEL, NS_SEL, ROUTER_SEL, quantile, selector, sum_rate

LORA_OPS = "kvstack_operator_lora_operations_total"
LORA_INFO = "vllm:lora_requests_info"
# vLLM series without a model_name label (the dashboards' $model filter reaches them through the pod).
NO_MODEL_LABEL: frozenset[str] = frozenset({LORA_INFO})
# vLLM 0.24 series that exist only with --enable-lora, so the reference scrape (taken without it) lacks
# them: vllm/v1/metrics/loggers.py registers the gauge with max_lora, waiting_lora_adapters and
# running_lora_adapters as its only labels.
VLLM_LORA_SERIES: frozenset[str] = frozenset({LORA_INFO})


def _latest_lora_info() -> str:
    info = selector(LORA_INFO, NS_SEL)
    newest = f"{info} == on (namespace, pod) group_left () max by (namespace, pod) ({info})"
    of_model = selector("vllm:num_requests_running", ENGINE_SEL)
    return (
        f"max by (pod, running_lora_adapters, waiting_lora_adapters) "
        f"(({newest}) and on (namespace, pod) {of_model}) > bool 0"
    )


def adapters_row() -> Row:
    return Row(
        "LoRA adapters",
        [
            Panel(
                "Requests/s by model or adapter",
                [Query(sum_rate(router.REQUESTS, "model_name", ROUTER_SEL), "{{model_name}}")],
                unit="reqps",
                stack=True,
                description="Requests the router answered per model_name (kvstack_router_requests_total): "
                "an adapter is a model to clients, so each adapter has its own line. The operator "
                "places adapters on engines by this rate.",
            ),
            Panel(
                "Router TTFT p90 by model or adapter",
                [Query(quantile(0.9, router.TTFT, "model_name", ROUTER_SEL), "{{model_name}}")],
                unit="s",
                description="Time to first token at the router per model_name, p90 "
                "(kvstack_router_time_to_first_token_seconds): an adapter no engine holds waits for "
                "its load, and a swap beyond max_loras delays the step.",
            ),
            Panel(
                "Adapters running and waiting per engine",
                [
                    Query(
                        _latest_lora_info(),
                        "{{pod}} running: {{running_lora_adapters}} waiting: {{waiting_lora_adapters}}",
                    )
                ],
                unit="short",
                max=1,
                description="The adapters of each engine's running and waiting requests, from the newest "
                "vllm:lora_requests_info of each pod (exported with --enable-lora): a line per set.",
            ),
            Panel(
                "Adapter loads and unloads/s by result",
                [
                    Query(
                        sum_rate(LORA_OPS, "model_name, operation, result", ENGINE_SEL),
                        "{{model_name}} {{operation}} {{result}}",
                    )
                ],
                unit="short",
                stack=True,
                description="The operator's calls to the engines' runtime LoRA endpoints "
                "(kvstack_operator_lora_operations_total): loads and unloads as it places adapters, and "
                "failures (see the KvstackLoraAdapterLoadFailing alert and status.adapters[].lastError).",
            ),
        ],
    )

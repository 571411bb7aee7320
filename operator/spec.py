"""The ``KVStack`` custom resource's spec as typed models: the one source of the CRD schema.

Field names are camelCase in the resource (aliases) and snake_case in Python. ``crd.py`` turns
these models into the CRD's structural OpenAPI schema, defaults and CEL rules included, so the API
server rejects a bad resource before the operator sees it; the operator parses ``spec`` with
:func:`parse_spec`, which applies the same defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kvstack.common.config import build
from kvstack.common.lora import Adapter, LoraSpec, check_adapters

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Metric = Literal["waitingPerReplica", "kvCacheUsage", "ttftP90", "queueWaitP90"]
# What a target means per metric when the resource sets none: waiting requests per replica
# (production-stack and llm-d use 5), KV-cache usage 0..1 (llm-d's saturation threshold), seconds
# (TTFT p90; the router's flow-queue wait p90, queueWaitP90).
DEFAULT_TARGETS: dict[str, float] = {
    "waitingPerReplica": 5.0,
    "kvCacheUsage": 0.8,
    "ttftP90": 1.0,
    "queueWaitP90": 0.5,
}
# Kubernetes objects passed through untouched (resources, tolerations, env): the API server checks
# them where they land, in the Deployment.
K8S_OBJECT: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


def _rules(*rules: tuple[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class LMCache(_Spec):
    """The LMCache connector of one model's engines."""

    enabled: bool = True
    chunk_size: int = Field(256, gt=0, description="tokens per chunk; a multiple of blockSize")
    local_cpu: bool = True
    max_local_cpu_size_gb: float = Field(5.0, gt=0)
    pin_timeout_sec: int = Field(300, gt=0, description="seconds before LMCache unpins an unloaded chunk")
    share_remote: bool = Field(True, description="use the stack's shared cache (spec.cache)")


class Lora(LoraSpec):
    """A model's LoRA adapters and engine limits; the operator places and loads the adapters."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
                "lora.maxCpuLoras must be at least lora.maxLoras",
            ),
            (
                "self.adapters.all(a, !has(a.rank) || a.rank <= self.maxLoraRank)",
                "an adapter's rank is over lora.maxLoraRank",
            ),
        )
    )

    # A map-typed list: the API server itself rejects two adapters with one name.
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class Model(_Spec):
    """One served model: an engine Deployment, its ConfigMap and its Service."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
            (
                "!self.lmcache.enabled || self.lmcache.chunkSize % self.blockSize == 0",
                "lmcache.chunkSize must be a multiple of blockSize",
            ),
        )
    )

    name: str = Field(max_length=40, pattern=DNS_LABEL, description="short name; objects are <stack>-<name>")
    model: str = Field(min_length=1, description="HF model id or local path (vllm serve MODEL)")
    served_model_names: list[str] = Field(default_factory=list, description="default: [model]")
    image: str = "ghcr.io/kvstack/engine:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    args: list[str] = Field(default_factory=list, description="extra vllm serve flags")
    env: list[dict[str, Any]] = Field(
        default_factory=list, description="extra container env (Kubernetes EnvVar, secrets by valueFrom)"
    )
    vllm_env: dict[str, str] = Field(default_factory=dict, description="extra environment for vLLM")
    gpus: int = Field(1, ge=0, le=64, description="nvidia.com/gpu per pod")
    tensor_parallel_size: int | None = Field(None, ge=1, description="default: gpus (at least 1)")
    max_model_len: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    block_size: Literal[1, 8, 16, 32, 64, 128, 256] = 16
    lmcache: LMCache = Field(default_factory=LMCache)
    resources: dict[str, Any] = Field(default_factory=dict, json_schema_extra=K8S_OBJECT)
    replicas: int = Field(1, ge=0, le=1000, description="used when autoscaling is off")
    min_replicas: int = Field(1, ge=0, le=1000, description="0 allows scale to zero")
    max_replicas: int = Field(4, ge=1, le=1000)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    # An adapter named like a model is refused by parse_spec (the API server's CEL cost budget has no
    # room for comparing unbounded strings across two lists).
    lora: Lora | None = Field(None, description="LoRA: engine limits and the adapters to load")

    @property
    def served_names(self) -> list[str]:
        return self.served_model_names or [self.model]


# -- flow control (the router's flow_control config section, camelCase here) -----------------------
FlowName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class FlowClass(_Spec):
    """A priority class: higher ``priority`` is dispatched first; ``ttftObjectiveSeconds`` its promise."""

    name: FlowName
    priority: int = 0
    ttft_objective_seconds: float | None = Field(None, gt=0, description="none: never shed for a miss")


class FlowModel(_Spec):
    """Queueing of one served model (``*``: every model not named)."""

    model: str = Field("*", min_length=1)
    ordering: Literal["fcfs", "edf", "cheapest"] = "fcfs"
    max_queue: int = Field(1024, ge=0, description="requests waiting; 0: 429 at once when saturated")
    max_queue_tokens: int = Field(4_000_000, ge=0, description="their prompt tokens together")


class FlowTenant(_Spec):
    name: FlowName
    weight: float = Field(1.0, gt=0)
    default_class: str | None = None


class FlowSaturation(_Spec):
    """When an engine can take one more request."""

    prefill_tokens_per_second: float = Field(34_000.0, gt=0)
    prefill_target_seconds: float = Field(0.25, gt=0)
    max_kv_usage: float = Field(0.95, gt=0, le=1)
    max_waiting: int = Field(0, ge=0)
    learn_weight: float = Field(0.1, ge=0, le=1)
    lower_class_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="while a higher class was seen lately, the share of the engines (and of each "
        "engine's batch and prefill target) a lower class may fill; 1: no headroom",
    )
    headroom_window_seconds: float = Field(
        10.0, ge=0, description="how long after a higher class's last request its headroom is kept"
    )
    overload_memory_seconds: float = Field(
        2.0,
        ge=0,
        description="how long a model counts as overloaded after a request was queued or refused: "
        "meanwhile room refuses a warm request predicted late behind the prefill sent; 0: off",
    )


class FlowControl(_Spec):
    """The router's flow control: priority classes, per-model queueing, tenant shares, saturation."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "self.classes.exists(c, c.name == self.defaultClass)",
                "flowControl.defaultClass must name one of flowControl.classes",
            ),
            (
                "self.tenants.all(t, !has(t.defaultClass) || "
                "self.classes.exists(c, c.name == t.defaultClass))",
                "a tenant's defaultClass must name one of flowControl.classes",
            ),
        )
    )

    enabled: bool = True
    tenant_header: str = Field("x-kvstack-tenant", pattern=r"^[A-Za-z0-9_-]+$")
    priority_header: str = Field("x-kvstack-priority", pattern=r"^[A-Za-z0-9_-]+$")
    default_class: str = "default"
    classes: list[FlowClass] = Field(
        default_factory=lambda: [FlowClass(name="default")],
        min_length=1,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    models: list[FlowModel] = Field(
        default_factory=lambda: [FlowModel()],
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["model"]},
    )
    tenants: list[FlowTenant] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    saturation: FlowSaturation = Field(default_factory=FlowSaturation)

    def router_config(self) -> dict[str, Any]:
        """The router config's ``flow_control`` section (``kvstack.router.flow.config``)."""
        sat = self.saturation
        return {
            "enabled": self.enabled,
            "tenant_header": self.tenant_header,
            "priority_header": self.priority_header,
            "default_class": self.default_class,
            "classes": [
                {"name": c.name, "priority": c.priority, "ttft_objective_s": c.ttft_objective_seconds}
                for c in self.classes
            ],
            "models": [
                {
                    "model": m.model,
                    "ordering": m.ordering,
                    "max_queue": m.max_queue,
                    "max_queue_tokens": m.max_queue_tokens,
                }
                for m in self.models
            ],
            "tenants": [
                {"name": t.name, "weight": t.weight, "default_class": t.default_class} for t in self.tenants
            ],
            "saturation": {
                "prefill_tokens_per_s": sat.prefill_tokens_per_second,
                "prefill_target_s": sat.prefill_target_seconds,
                "max_kv_usage": sat.max_kv_usage,
                "max_waiting": sat.max_waiting,
                "learn_weight": sat.learn_weight,
                "lower_class_share": sat.lower_class_share,
                "headroom_window_s": sat.headroom_window_seconds,
                "overload_memory_s": sat.overload_memory_seconds,
            },
        }

    @model_validator(mode="after")
    def _router_accepts_it(self) -> FlowControl:
        # The router's own validation (duplicate names, unknown default classes, header clashes), so
        # the operator refuses what the router would; its message names the router's field path.
        from kvstack.router.flow.config import FlowControlConfig

        try:
            FlowControlConfig.model_validate(self.router_config())
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "flowControl"
            raise ValueError(f"{where}: {first['msg']}") from None
        return self


class Router(_Spec):
    """The cache-aware router Deployment and its Service. The scale subresource scales it."""

    enabled: bool = True
    replicas: int = Field(1, ge=0, le=100)
    image: str = "ghcr.io/kvstack/router:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    policy: Literal["cache_aware", "least_loaded", "round_robin", "session", "prefix_trie"] = "cache_aware"
    port: int = Field(8000, ge=1, le=65535)
    resources: dict[str, Any] = Field(default_factory=dict, json_schema_extra=K8S_OBJECT)
    flow_control: FlowControl = Field(default_factory=FlowControl)
    extra_config: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=K8S_OBJECT, description="more RouterSettings keys"
    )


class SecretKeyRef(_Spec):
    name: str = Field(min_length=1)
    key: str = Field("url", min_length=1)


class InternalCache(_Spec):
    image: str = "redis:7.4-alpine"
    max_memory: str = Field("1gb", pattern=r"^[0-9]+(b|kb|mb|gb)$", description="Redis maxmemory (LRU)")
    resources: dict[str, Any] = Field(default_factory=dict, json_schema_extra=K8S_OBJECT)


class Cache(_Spec):
    """The shared KV tier: an internal Redis, an external URL, or none."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "self.mode != 'external' || has(self.url) || has(self.urlSecretRef)",
                "cache.mode external needs url or urlSecretRef",
            ),
        )
    )

    mode: Literal["internal", "external", "none"] = "internal"
    url: str | None = Field(
        None, pattern=r"^(redis|rediss|redis-sentinel|valkey|lm|fs|s3)://", description="no password here"
    )
    url_secret_ref: SecretKeyRef | None = None
    internal: InternalCache = Field(default_factory=InternalCache)


class ScaleUp(_Spec):
    stabilization_seconds: int = Field(0, ge=0, le=3600)
    max_percent: int = Field(100, ge=1, le=1000, description="per evaluation")
    max_pods: int = Field(4, ge=1, le=1000, description="per evaluation; the larger of the two wins")


class ScaleDown(_Spec):
    stabilization_seconds: int = Field(300, ge=0, le=3600)
    max_pods: int = Field(1, ge=1, le=1000, description="per evaluation")


class ScaleToZero(_Spec):
    enabled: bool = False
    idle_seconds: int = Field(600, ge=30, le=86400, description="no request this long: scale to 0")


class Autoscaling(_Spec):
    """Engine autoscaling from Prometheus, the HPA algorithm on LLM signals."""

    enabled: bool = True
    metric: Metric = "waitingPerReplica"
    target: float | None = Field(
        None, gt=0, description="default: 5 waiting, 0.8 usage, 1.0 s TTFT, 0.5 s queue wait"
    )
    tolerance: float = Field(0.1, ge=0, le=1)
    prometheus_url: str | None = Field(None, pattern=r"^https?://", description="default: the operator's")
    interval_seconds: int = Field(15, ge=1, le=600)
    stale_after_seconds: int = Field(60, ge=1, le=3600, description="older samples count as missing")
    scale_up: ScaleUp = Field(default_factory=ScaleUp)
    scale_down: ScaleDown = Field(default_factory=ScaleDown)
    scale_to_zero: ScaleToZero = Field(default_factory=ScaleToZero)

    @property
    def effective_target(self) -> float:
        return self.target if self.target is not None else DEFAULT_TARGETS[self.metric]


class KVStackSpec(_Spec):
    # A map-typed list: the API server itself rejects two models with one name.
    models: list[Model] = Field(
        min_length=1,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    router: Router = Field(default_factory=Router)
    cache: Cache = Field(default_factory=Cache)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)

    @model_validator(mode="after")
    def _adapter_names_unique(self) -> KVStackSpec:
        # Clients pick an adapter by its name as the model: it must name one thing in the stack.
        taken = {name: f"a name of model {m.name!r}" for m in self.models for name in m.served_names}
        for i, model in enumerate(self.models):
            if model.lora is None:
                continue
            try:
                check_adapters(model.lora, model.served_names, taken)
            except ValueError as err:
                raise ValueError(f"models[{i}].lora.{err}") from None
            taken.update({a.name: f"an adapter of model {model.name!r}" for a in model.lora.adapters})
        return self


def parse_spec(spec: dict[str, Any], name: str = "KVStack") -> KVStackSpec:
    """The typed spec (defaults applied); raises ConfigError naming a bad field."""
    return build(KVStackSpec, f"{name} spec", **spec)

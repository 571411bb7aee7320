"""The ``flow_control`` block of the router's configuration.

On by default, with one class (``default``, no TTFT objective) and FCFS ordering: below saturation
that is exactly the router without flow control (a request goes to an engine at once), and above
it requests wait in the router in arrival order instead of piling into the engines' own FCFS
queues, so each is routed by the cache-aware decision when an engine has room, with the index as it
is then. Nothing is shed for an objective until a class declares one. ``enabled: false`` sends
every request on at once, whatever the engines' state (the router of before).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Ordering = Literal["fcfs", "edf", "cheapest"]
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
DEFAULT_CLASS = "default"


class PriorityClass(BaseModel):
    """A priority class: higher ``priority`` is dispatched first; ``ttft_objective_s`` is its promise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    priority: int = 0
    # None: no objective (never shed for a predicted miss, never counted toward goodput misses)
    ttft_objective_s: float | None = Field(None, gt=0)


class ModelFlow(BaseModel):
    """Queueing of one model (``*``: every model not named elsewhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("*", min_length=1)
    ordering: Ordering = "fcfs"
    max_queue: int = Field(1024, ge=0)  # requests waiting; 0: never wait (429 when saturated)
    max_queue_tokens: int = Field(4_000_000, ge=0)  # their prompt tokens together


class TenantConfig(BaseModel):
    """A tenant with a share (``weight``) and the class its requests get without a header."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    weight: float = Field(1.0, gt=0)
    default_class: str | None = None


class SaturationConfig(BaseModel):
    """When an engine can take one more request (see :mod:`kvstack.router.flow.saturation`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # an 8B model on one H200 prefills ~34K tokens/s cold (tests/reference: 16,384 in 0.475 s)
    prefill_tokens_per_s: float = Field(34_000.0, gt=0)
    # uncached prompt tokens sent and not yet prefilled may take at most this long to prefill
    prefill_target_s: float = Field(0.25, gt=0)
    max_kv_usage: float = Field(0.95, gt=0, le=1.0)  # beyond it the engine preempts or queues
    max_waiting: int = Field(0, ge=0)  # requests waiting inside the engine (scraped)
    # a decode step with a busy batch (tests/reference: 5.7 ms at batch 32): a first guess of a
    # request's time at an engine, max_tokens x this, until finished requests have measured it
    decode_step_s: float = Field(0.0057, gt=0)
    # headroom for higher classes: while a higher class was seen within ``headroom_window_s``, the
    # lower classes may have prefill outstanding on only this share of a model's engines (at least
    # one; the rest are kept clear) and fill only this share of each engine's batch and prefill target
    lower_class_share: float = Field(0.5, gt=0, le=1)
    headroom_window_s: float = Field(10.0, ge=0)
    # learn each engine's prefill rate from the TTFTs it delivers (an EWMA with this weight); 0: off
    learn_weight: float = Field(0.1, ge=0, le=1)
    # a model is overloaded for this long after a request of it was queued or refused (not by the rule
    # below, whose retries would keep it going): meanwhile a warm request (most of its prompt cached)
    # an engine has room for is refused when it is predicted to miss its class's objective behind the
    # prefill already sent (admission rule 1's exception, ``slo_room``); 0: never
    overload_memory_s: float = Field(2.0, ge=0)


class FlowControlConfig(BaseModel):
    """Priority classes, per-model ordering and bounds, tenant shares, saturation thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    tenant_header: str = "x-kvstack-tenant"  # absent: the API key's name, else "anonymous"
    priority_header: str = "x-kvstack-priority"  # a class name; absent: the tenant's default
    default_class: str = DEFAULT_CLASS
    classes: list[PriorityClass] = Field(default_factory=lambda: [PriorityClass(name=DEFAULT_CLASS)])
    models: list[ModelFlow] = Field(default_factory=lambda: [ModelFlow()])
    tenants: list[TenantConfig] = Field(default_factory=list)
    saturation: SaturationConfig = Field(default_factory=SaturationConfig)

    @field_validator("tenant_header", "priority_header")
    @classmethod
    def _header_name(cls, name: str) -> str:
        name = name.strip().lower()
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"not an HTTP header name: {name!r}")
        return name

    @model_validator(mode="after")
    def _names_agree(self) -> FlowControlConfig:
        for what, names in (
            ("classes", [c.name for c in self.classes]),
            ("tenants", [t.name for t in self.tenants]),
            ("models", [m.model for m in self.models]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: duplicate names {dup}")
        if not self.classes:
            raise ValueError("classes: at least one priority class is needed")
        known = {c.name for c in self.classes}
        if self.default_class not in known:
            raise ValueError(f"default_class: {self.default_class!r} is not one of classes {sorted(known)}")
        for i, tenant in enumerate(self.tenants):
            if tenant.default_class is not None and tenant.default_class not in known:
                raise ValueError(
                    f"tenants.{i}.default_class: {tenant.default_class!r} "
                    f"is not one of classes {sorted(known)}"
                )
        if self.tenant_header == self.priority_header:
            raise ValueError("tenant_header and priority_header must differ")
        return self

    def class_named(self, name: str) -> PriorityClass | None:
        return next((c for c in self.classes if c.name == name), None)

    def for_model(self, model: str) -> ModelFlow:
        """The model's own entry, else ``*``'s, else the defaults."""
        named = {m.model: m for m in self.models}
        return named.get(model) or named.get("*") or ModelFlow(model=model)

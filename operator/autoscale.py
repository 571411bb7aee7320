"""The autoscaling decision: the Kubernetes HPA algorithm, adapted to LLM-serving signals. Pure.

One evaluation turns an :class:`Observation` (what Prometheus and the Deployment said) and the
recommendation history into a :class:`Decision`:

1. scale from zero: a model at 0 replicas wakes when the router holds requests for it;
2. no data, stale data: hold (never scale on what we cannot see);
3. raw recommendation: ``ceil(current * value / target)``, no change within the tolerance; pods that
   did not report count as 0 when scaling up (loading pods are pending capacity) and forbid a
   scale down (partial data); the queue signal, with running counts known, sizes from demand:
   ``ceil((running + waiting) / (running_per_pod + target))`` up;
   the scale-down floor: with a saturated pod's capacity known (the most requests one pod ran
   while requests waited behind it), never below ``ceil(demand / (capacity * floor_utilization))``
   for any signal; without it, the queue signal keeps the demand size above as its floor;
4. bounds ``[min, max]`` (``0`` only after the scale-to-zero idle window);
5. stabilization: up to the *lowest* recommendation of the up window, down to the *highest* of the
   down window (so a brief dip never removes a pod);
6. rate limits per evaluation: up by ``max(up_max_percent %, up_max_pods)``, down by
   ``down_max_pods``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Signal = Literal["waiting", "kv_usage", "ttft", "queue_wait"]
Direction = Literal["up", "down", "none"]
Reason = Literal[
    "queue",  # waiting requests above target
    "kv_usage",  # KV-cache usage above target
    "ttft",  # TTFT p90 above the SLO
    "queue_wait",  # the router's flow-queue wait p90 above its target
    "idle",  # below target: fewer replicas do
    "wake",  # scale from zero: the router holds requests for the model
    "min_replicas",  # clamped to the lower bound
    "max_replicas",  # clamped to the upper bound
    "cooldown",  # a change was due but the stabilization window held it back
    "metrics_unavailable",  # no, stale or partial data: held
    "steady",  # within the tolerance of the target
]
DIRECTIONS: tuple[Direction, ...] = ("up", "down", "none")
REASONS: tuple[Reason, ...] = (
    "queue",
    "kv_usage",
    "ttft",
    "queue_wait",
    "idle",
    "wake",
    "min_replicas",
    "max_replicas",
    "cooldown",
    "metrics_unavailable",
    "steady",
)
_UP_REASON: dict[Signal, Reason] = {
    "waiting": "queue",
    "kv_usage": "kv_usage",
    "ttft": "ttft",
    "queue_wait": "queue_wait",
}

# (unix time, recommended replicas), oldest first.
History = tuple[tuple[float, int], ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """How one model scales. Periods are evaluations (the interval is the HPA's sync period)."""

    signal: Signal
    target: float
    min_replicas: int
    max_replicas: int
    tolerance: float = 0.1
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    up_max_percent: float = 100.0
    up_max_pods: int = 4
    down_max_pods: int = 1
    stale_after_s: float = 60.0
    scale_to_zero: bool = False  # needs min_replicas == 0
    # The scale-down floor plans each pod at this fraction of its saturated capacity: a pod at full
    # batch runs slower steps than at half, so demand measured on a larger fleet grows when it shrinks.
    floor_utilization: float = 0.8

    def __post_init__(self) -> None:
        if not self.target > 0:
            raise ValueError("target must be positive")
        if not 0 < self.floor_utilization <= 1:
            raise ValueError("floor_utilization must be in (0, 1]")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")


@dataclass(frozen=True, slots=True)
class Observation:
    """What one evaluation sees.

    ``value`` is the signal per replica, averaged over the ``reporting`` pods that had samples
    (for a model-wide signal such as TTFT, ``reporting`` is ``current``); ``None`` means no data.
    """

    now: float
    current: int  # spec.replicas of the engine Deployment
    value: float | None
    reporting: int = 0
    age_s: float = 0.0  # age of the oldest sample used
    pending: float | None = None  # requests the router holds for the model (scale from zero)
    idle: bool | None = None  # no request during the scale-to-zero window; None: unknown
    running: float | None = None  # running requests per reporting pod
    # Requests one pod ran while requests waited behind it (saturated), the most seen lately:
    # what a pod really holds, which the scale-down floor divides the demand by.
    capacity: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    direction: Direction
    reason: Reason
    message: str
    history: History

    @property
    def changed(self) -> bool:
        return self.direction != "none"


def _direction(current: int, desired: int) -> Direction:
    return "up" if desired > current else "down" if desired < current else "none"


def _raw(policy: Policy, obs: Observation) -> tuple[int, Reason, str] | None:
    """The unstabilized recommendation, or None when the data allow none."""
    current, value = obs.current, obs.value
    if current == 0:
        if obs.pending is not None and obs.pending > 0:
            return max(policy.min_replicas, 1), "wake", f"{obs.pending:g} requests pending at the router"
        if policy.min_replicas > 0:
            return policy.min_replicas, "min_replicas", "at 0 replicas, below minReplicas"
        return 0, "steady", "scaled to zero; nothing pending"
    if value is None or math.isnan(value) or obs.reporting <= 0:
        return None
    if obs.age_s > policy.stale_after_s:
        return None
    ratio = value / policy.target
    shown = f"{policy.signal} {value:.3g} per replica vs target {policy.target:g}"
    if abs(ratio - 1.0) <= policy.tolerance + 1e-9:
        return current, "steady", f"{shown}: within tolerance"
    # A queue is not proportional to 1/replicas (more pods turn waiting requests into running
    # ones, fewer pods the reverse), so with the running count known the queue signal sizes the
    # fleet from demand instead: enough pods that the requests in flight wait at most the target.
    demand_need: int | None = None
    if policy.signal == "waiting" and obs.running is not None:
        demand = obs.reporting * (obs.running + value)
        demand_need = math.ceil(demand / (obs.running + policy.target) - 1e-9)
    if ratio > 1.0:
        # Pods that did not report count as 0: a loading pod is capacity on its way.
        wanted = math.ceil(obs.reporting * value / policy.target - 1e-9)
        if demand_need is not None:
            wanted = demand_need
        if wanted <= current:
            return current, "steady", f"{shown}, {obs.reporting}/{current} pods reporting: capacity pending"
        return wanted, _UP_REASON[policy.signal], shown
    if obs.reporting < current:
        return None
    wanted = math.ceil(current * ratio - 1e-9)
    floor = _floor(policy, obs, demand_need)
    if floor is not None:
        # Below target, a floor under the HPA ratio, never a reason to grow.
        wanted = max(wanted, min(current, floor[0]))
        shown = f"{shown}; {floor[1]}"
    if wanted == 0 and policy.min_replicas == 0 and not (policy.scale_to_zero and obs.idle):
        wanted = 1  # 0 replicas only after the idle window
    return wanted, "idle", shown


def _floor(policy: Policy, obs: Observation, demand_need: int | None) -> tuple[int, str] | None:
    """The fewest pods that carry today's demand, when the data tell (scale down only).

    With a saturated pod's capacity known, a pod is planned at ``floor_utilization`` of it: unlike
    ``running + target`` per pod, this does not take a half-busy pod's running count for its limit,
    so a fleet that grew under a backlog steps down to what the load needs, not below it.
    """
    if obs.running is None:
        return None
    if obs.capacity is not None and obs.capacity > 0 and not math.isnan(obs.capacity):
        queued = obs.value if policy.signal == "waiting" and obs.value is not None else 0.0
        demand = obs.reporting * (obs.running + queued)
        per_pod = obs.capacity * policy.floor_utilization
        need = math.ceil(demand / per_pod - 1e-9)
        per = f"{obs.capacity:g} per saturated pod x {policy.floor_utilization:g}"
        return need, f"floor {need}: {demand:.3g} in flight / ({per})"
    if demand_need is not None:
        return demand_need, f"floor {demand_need}: demand / (running + target) per pod"
    return None


def _why_none(policy: Policy, obs: Observation) -> str:
    if obs.value is None or obs.reporting <= 0 or math.isnan(obs.value):
        return "no samples"
    if obs.age_s > policy.stale_after_s:
        return f"samples {obs.age_s:.0f}s old (stale after {policy.stale_after_s:g}s)"
    return f"partial data: {obs.reporting} of {obs.current} pods reporting; not scaling down"


def _clamp(policy: Policy, replicas: int) -> tuple[int, Reason | None]:
    if replicas > policy.max_replicas:
        return policy.max_replicas, "max_replicas"
    if replicas < policy.min_replicas:
        return policy.min_replicas, "min_replicas"
    return replicas, None


def decide(policy: Policy, obs: Observation, history: History = ()) -> Decision:
    """One evaluation. Returns the replicas to set and the new recommendation history."""
    current = obs.current
    keep = max(policy.up_window_s, policy.down_window_s)
    history = tuple((t, r) for t, r in history if t >= obs.now - keep)
    if not history and current > 0:
        # After a restart the history is gone: count the current size as a recommendation made
        # just before the up window, so a scale down still waits a whole window and a scale up not.
        history = ((obs.now - policy.up_window_s - 1e-3, current),)

    raw = _raw(policy, obs)
    if raw is None:
        held, bound = _clamp(policy, current)
        why = _why_none(policy, obs)
        if bound is not None:
            return Decision(held, _direction(current, held), bound, f"{why}; clamped to bounds", history)
        return Decision(current, "none", "metrics_unavailable", f"{why}; holding {current}", history)

    wanted, reason, message = raw
    wanted, bound = _clamp(policy, wanted)
    history = (*history, (obs.now, wanted))

    if reason == "wake":
        stabilized = wanted  # a request is waiting: no window applies
    else:
        up = min(r for t, r in history if t >= obs.now - policy.up_window_s)
        down = max(r for t, r in history if t >= obs.now - policy.down_window_s)
        stabilized = current
        if stabilized < up:
            stabilized = up
        if stabilized > down:
            stabilized = down

    desired = stabilized
    if desired > current:
        limit = max(math.ceil(current * (1 + policy.up_max_percent / 100)), current + policy.up_max_pods)
        desired = min(desired, limit)
    elif desired < current:
        desired = max(desired, current - policy.down_max_pods)
    # The bounds win over the rate limits: the user may have moved them below or above current.
    desired, late_bound = _clamp(policy, desired)
    bound = late_bound or bound

    if bound is not None and desired in (policy.min_replicas, policy.max_replicas) and desired != current:
        reason, message = bound, f"{message}; clamped to {desired}"
    elif bound is not None and desired == current == wanted:
        reason, message = bound, f"{message}; held at the bound {desired}"
    elif desired == current and wanted != current:
        window = policy.down_window_s if wanted < current else policy.up_window_s
        reason = "cooldown"
        message = f"{message}; wants {wanted}, held at {current} by the {window:g}s stabilization window"
    elif desired == current:
        reason = "steady" if reason == "idle" else reason
    elif desired != wanted:
        message = f"{message}; wants {wanted}, stepping to {desired}"
    return Decision(desired, _direction(current, desired), reason, message, history)

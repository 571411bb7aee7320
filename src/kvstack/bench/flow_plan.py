"""The flow-control benchmark's plan and arithmetic. Pure.

What a run is made of (the policies compared, the scenarios, the multi-round QA traces sized by a
rate and a duration rather than by the KV cache) and what its results mean: goodput (requests done
within the TTFT objective per second of arrivals), the 429 rate, the admitted requests' TTFT, and
the issue's goals as met / not met. Times are in *simulated* seconds: the simulators run at
``speed`` < 1 so that a saturated cluster needs only a few requests per wall second on a small
machine, and every wall-clock time is multiplied by ``speed`` before it is reported. The I/O lives
in :mod:`kvstack.bench.flow` and :mod:`kvstack.bench.flow_driver`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstack.bench import stats, workloads

OBJECTIVE_S = 1.0  # the goodput threshold: TTFT <= 1 s (simulated time)
RAMP = (0.5, 1.0, 1.5, 2.0)  # offered load, in multiples of the cluster's capacity
# fairness: tenant B's users at least (its arrival window is stretched to hold them): with 3 users B's
# refusals and p90 were one user's luck (bench-results/flow)
FAIRNESS_B_USERS = 8
DECISION_LOGGER = "kvstack.router.decision"  # the cache-aware policy's decision line (DEBUG)
NARROWED_MSG = "flow narrowed"  # flow control's line per narrowed decision (DEBUG, router/flow/room.py)


@dataclass(frozen=True, slots=True)
class Policy:
    """One router setup compared: a routing policy, with or without flow control."""

    name: str
    routing: str  # the router's --policy
    flow: bool  # flow control on (its config section) or off


# cache_aware with flow control: the policy every goal of the issue judges
FLOW = Policy("cache_aware+flow", "cache_aware", flow=True)
POLICIES = (
    Policy("round_robin", "round_robin", flow=False),
    Policy("cache_aware", "cache_aware", flow=False),
    FLOW,
)
# The SGLang router's cache_aware policy (`pip install sglang-router`), on real engines.
PEER = Policy("sglang_cache_aware", "sglang_cache_aware", flow=False)


@dataclass(frozen=True, slots=True)
class Shape:
    """One multi-round QA user (``workloads.multi_round_qa``'s shape, smaller for a quick run)."""

    rounds: int = 4
    system_tokens: int = 1000  # as the GPU runs' multi-round QA (workloads.multi_round_qa)
    user_tokens: int = 2000
    question_tokens: int = 100
    answer_tokens: int = 24  # short answers: fewer streamed chunks for a small machine to carry
    think_s: float = 0.5  # simulated seconds between an answer and the next question

    @property
    def mean_prompt_tokens(self) -> float:
        turn = self.question_tokens + self.answer_tokens + 2 * workloads.TEMPLATE_TOKENS
        return self.system_tokens + self.user_tokens + self.question_tokens + turn * (self.rounds - 1) / 2


@dataclass(frozen=True, slots=True)
class Stream:
    """Users of one tenant and class arriving at ``rate`` requests/s (simulated) for ``duration_s``."""

    tenant: str
    rate: float
    duration_s: float
    klass: str | None = None  # the priority header; None: the tenant's default


def fairness_window_s(b_rate: float, duration_s: float, shape: Shape) -> float:
    """The fairness cases' arrival window: ``duration_s``, or longer so B (at ``b_rate`` requests/s)
    has :data:`FAIRNESS_B_USERS` users."""
    return max(duration_s, FAIRNESS_B_USERS * shape.rounds / b_rate)


def narrowed_decisions(lines: Iterable[str], engines: int) -> dict[str, Any]:
    """Of the router's log ``lines``: the cache-aware policy's decisions, how many of them flow
    control narrowed (offered the policy fewer than the cluster's ``engines``), and why the engines
    left out had no room (their saturation reasons, from flow control's ``flow narrowed`` lines)."""
    decisions = narrowed = 0
    reasons: dict[str, int] = {}
    for line in lines:
        if DECISION_LOGGER not in line and NARROWED_MSG not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("logger") == DECISION_LOGGER:
            decisions += 1
            narrowed += len(rec.get("engines") or ()) < engines
        elif rec.get("msg") == NARROWED_MSG:
            for reason in (rec.get("saturated") or {}).values():
                reasons[reason] = reasons.get(reason, 0) + 1
    return {"decisions": decisions, "narrowed": narrowed, "saturated_by_reason": reasons}


def build_trace(streams: Sequence[Stream], shape: Shape, seed: int) -> list[tuple[Stream, workloads.Session]]:
    """Sessions of every stream, each user with the shared system prompt and a private context.

    A stream of ``rate`` requests/s over ``duration_s`` has ``rate * duration_s / rounds`` users
    arriving as a Poisson process (so its request rate is ``rate`` while users overlap). Times are
    simulated seconds; the driver divides them by the simulators' speed.
    """
    rng = random.Random(seed)
    system = workloads.words(rng, shape.system_tokens)
    out: list[tuple[Stream, workloads.Session]] = []
    for s_index, stream in enumerate(streams):
        users = max(1, round(stream.rate * stream.duration_s / shape.rounds))
        user_rate = users / stream.duration_s
        t = 0.0
        for u in range(users):
            t += rng.expovariate(user_rate)
            session = workloads.Session(
                session_id=f"{stream.tenant}-{s_index}-{u}",
                system=system + workloads.words(rng, shape.user_tokens),
                turns=[
                    workloads.Turn(workloads.words(rng, shape.question_tokens), shape.answer_tokens)
                    for _ in range(shape.rounds)
                ],
                start=t,
                think_time=shape.think_s,
            )
            out.append((stream, session))
    return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request got, in simulated seconds since the run started."""

    tenant: str
    klass: str
    sent_s: float
    status: int  # HTTP status; 0 when no response came (a lost request)
    ok: bool  # streamed to its last token
    ttft_s: float | None = None
    retry_after_s: float | None = None  # the 429's Retry-After header
    engine: str | None = None  # the engine that served it (the router's x-kvstack-engine header)
    admission: str | None = None  # how flow control admitted it (x-kvstack-admission): room, queued, ...
    predicted_ttft_s: float | None = None  # the TTFT it was admitted on (x-kvstack-predicted-ttft-ms)
    # With client retries (flow_driver), the fields above are the LAST attempt's (sent_s, status,
    # ttft_s: from that attempt's send), and these the request's as its user saw it:
    attempts: int = 1
    refusals: int = 0  # attempts answered 429
    first_sent_s: float | None = None  # the first attempt's send; None: sent_s (one attempt)
    user_ttft_s: float | None = None  # TTFT from the first attempt; None: ttft_s (one attempt)
    turn: int = 0  # the turn's place in its session
    cold: bool = False  # no earlier turn of its user was served: its document on no engine yet
    user: str | None = None  # its session

    @property
    def ttft_from_first_s(self) -> float | None:
        """The TTFT its user saw: from the first attempt's send, retry waits included."""
        return self.user_ttft_s if self.user_ttft_s is not None else self.ttft_s


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(stats.percentile(values, q), 4) if values else None


def summarize(
    outcomes: Sequence[Outcome], duration_s: float, objective_s: float = OBJECTIVE_S
) -> dict[str, Any]:
    """Goodput, refusal and error rates, and the completed requests' TTFT of one group of requests.

    A request is its user's turn with all its attempts (the client's retries). Goodput counts
    requests that completed with the TTFT their user saw (from the FIRST attempt, retry waits
    included) within the objective, per second of the arrival window (``duration_s``), so it
    compares across policies fed the same trace. ``shed`` are requests still refused (429) after
    the retries; ``ttft_p*_s`` are from the last attempt (what the router admitted, as before
    retries), ``ttft_first_attempt_p*_s`` from the first (what the user saw).
    """
    n = len(outcomes)
    ok = [o for o in outcomes if o.ok]
    shed = [o for o in outcomes if o.status == 429]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    user_ttfts = [t for o in ok if (t := o.ttft_from_first_s) is not None]
    good = [t for t in user_ttfts if t <= objective_s]
    # what goodput would be if the retry waits cost the user nothing: the refusals' share of a loss
    good_last = [t for t in ttfts if t <= objective_s]
    attempts = sum(o.attempts for o in outcomes)
    cold_shed = [o for o in shed if o.cold]
    waits = [o.sent_s - o.first_sent_s for o in outcomes if o.attempts > 1 and o.first_sent_s is not None]
    return {
        "requests": n,
        "completed": len(ok),
        "shed": len(shed),
        "shed_rate": round(len(shed) / n, 4) if n else 0.0,
        "attempts": attempts,
        "attempts_per_request": round(attempts / n, 4) if n else 0.0,
        "refusals": sum(o.refusals for o in outcomes),  # 429 answers, retried or final
        "served_after_retry": sum(1 for o in ok if o.attempts > 1),
        # first send to last send of the retried requests: the Retry-After waits (and refused tries)
        "retry_wait_p50_s": _pct(waits, 50),
        "retry_wait_max_s": round(max(waits), 4) if waits else None,
        "cold_shed": len(cold_shed),  # finally refused while its user's document was on no engine
        "cold_refusals": sum(o.refusals for o in outcomes if o.cold),  # 429 answers to such turns
        "users": len({o.user for o in outcomes if o.user is not None}),
        "users_never_served": _users_never_served(outcomes),
        "shed_with_retry_after": sum(1 for o in shed if o.retry_after_s is not None),
        # neither completed nor refused with 429: a failure (or, with status 0, a lost request)
        "errors": n - len(ok) - len(shed),
        "lost": sum(1 for o in outcomes if o.status == 0),
        "goodput_rps": round(len(good) / duration_s, 4) if duration_s > 0 else 0.0,
        "goodput_last_attempt_rps": round(len(good_last) / duration_s, 4) if duration_s > 0 else 0.0,
        "good_share": round(len(good) / n, 4) if n else 0.0,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p90_s": _pct(ttfts, 90),
        "ttft_p99_s": _pct(ttfts, 99),
        "ttft_first_attempt_p50_s": _pct(user_ttfts, 50),
        "ttft_first_attempt_p90_s": _pct(user_ttfts, 90),
        "ttft_first_attempt_p99_s": _pct(user_ttfts, 99),
        **first_touches(ok),
        "late_admitted": late_admitted(ok, objective_s),
    }


def late_admitted(completed: Sequence[Outcome], objective_s: float) -> dict[str, dict[str, Any]]:
    """The completed requests whose TTFT (from the admitted attempt) missed the objective, by how
    flow control admitted them (``-`` without flow control): how many, and the median predicted
    and actual TTFT, so a late tail shows whether a rule let it in or the prediction was wrong."""
    late: dict[str, list[Outcome]] = {}
    for o in completed:
        if o.ttft_s is not None and o.ttft_s > objective_s:
            late.setdefault(o.admission or "-", []).append(o)
    return {
        how: {
            "count": len(group),
            "predicted_p50_s": _pct([t for o in group if (t := o.predicted_ttft_s) is not None], 50),
            "ttft_p50_s": _pct([o.ttft_s for o in group if o.ttft_s is not None], 50),
            "cold": sum(1 for o in group if o.cold),
        }
        for how, group in sorted(late.items())
    }


def _users_never_served(outcomes: Sequence[Outcome]) -> int:
    """Users (sessions) none of whose turns was served; of the outcomes that name their user."""
    served: dict[str, bool] = {}
    for o in outcomes:
        if o.user is not None:
            served[o.user] = served.get(o.user, False) or o.ok
    return sum(1 for ok in served.values() if not ok)


def first_touches(completed: Sequence[Outcome]) -> dict[str, Any]:
    """The TTFT of each engine's first request of the case (the earliest sent that it served:
    every case has its own system prompt, so that request carries it to the engine cold: a floor
    no admission can lower), and the TTFT p99 of the others. Empty when no engine is known."""
    first: dict[str, Outcome] = {}
    for o in sorted(completed, key=lambda o: o.sent_s):
        if o.engine is not None and o.ttft_s is not None:
            first.setdefault(o.engine, o)
    if not first:
        return {}
    firsts = {id(o) for o in first.values()}
    rest = [o.ttft_s for o in completed if id(o) not in firsts and o.ttft_s is not None]
    return {
        "first_touch_ttft_s": sorted(round(o.ttft_s or 0.0, 4) for o in first.values()),
        "ttft_p99_after_first_touch_s": _pct(rest, 99),
    }


def by_group(outcomes: Sequence[Outcome], key: str, duration_s: float) -> dict[str, dict[str, Any]]:
    """:func:`summarize` per tenant (``key="tenant"``) or per class (``key="klass"``)."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(getattr(o, key), []).append(o)
    return {name: summarize(group, duration_s) for name, group in sorted(groups.items())}


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    met: bool | None  # None: not measured in this run
    detail: str


@dataclass(slots=True)
class Results:
    """Rows of one run: ``ramp`` (policy, load, summary), and the fairness and priority cases."""

    ramp: list[dict[str, Any]] = field(default_factory=list)
    fairness: list[dict[str, Any]] = field(default_factory=list)
    priority: list[dict[str, Any]] = field(default_factory=list)


def _row(rows: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to three places; None without both or with ``b`` 0."""
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def goals(results: Results) -> list[Goal]:
    """The issue's goals for the simulated benchmarks, from a run's rows."""
    out: list[Goal] = []
    flow = FLOW.name
    at1, at2 = _row(results.ramp, policy=flow, load=1.0), _row(results.ramp, policy=flow, load=2.0)
    if at1 and at2:
        r = ratio(at2["goodput_rps"], at1["goodput_rps"])
        out.append(
            Goal(
                "ramp: goodput at 2x >= 0.9x goodput at 1x (flow control)",
                r is not None and r >= 0.9,
                f"{r}x",
            )
        )
        p99 = at2["ttft_p99_s"]
        out.append(
            Goal(
                "ramp: admitted TTFT p99 <= 1 s at 2x (flow control)",
                p99 is not None and p99 <= 1.0,
                f"{p99} s",
            )
        )
    else:
        out.append(Goal("ramp: goodput and p99 at 2x with flow control", None, "flow control not run"))
    nf1, nf2 = (
        _row(results.ramp, policy="cache_aware", load=1.0),
        _row(results.ramp, policy="cache_aware", load=2.0),
    )
    if nf1 and nf2:
        r = ratio(nf2["goodput_rps"], nf1["goodput_rps"])
        out.append(
            Goal(
                "ramp: without flow control goodput falls at 2x (the problem shown)",
                r is not None and r < 0.9,
                f"{r}x",
            )
        )
    # what flow control costs where it should cost nothing: the p90 its users saw (from their first
    # attempt: a refusal's retry wait is theirs), beside the p90 of the last attempts (what it
    # admitted) and what it refused in the end (a p90 kept low by refusing the tail is not free).
    # Rows from before client retries have one attempt: their ttft_p90_s is both.
    for load, where in ((0.5, "below capacity"), (1.0, "at capacity (1x)")):
        with_flow, without = (
            _row(results.ramp, policy=flow, load=load),
            _row(results.ramp, policy="cache_aware", load=load),
        )
        if with_flow and without:
            first = "ttft_first_attempt_p90_s"
            r = ratio(
                with_flow.get(first, with_flow["ttft_p90_s"]), without.get(first, without["ttft_p90_s"])
            )
            last = ratio(with_flow["ttft_p90_s"], without["ttft_p90_s"])
            shed = f"{r}x ({last}x last attempt), 429 {with_flow.get('shed_rate', 0.0):.0%}"
            name = f"ramp: {where} TTFT p90 within 5% of cache_aware"
            out.append(Goal(name, r is not None and r <= 1.05, shed))
    alone = _row(results.fairness, case="B alone", policy=flow)
    together = _row(results.fairness, case="A 10x + B", policy=flow)
    if alone and together and "B" in together["tenants"]:
        b, a = together["tenants"]["B"], together["tenants"].get("A", {})
        r = ratio(b["ttft_p90_s"], alone["tenants"]["B"]["ttft_p90_s"])
        out.append(
            Goal("fairness: B's TTFT p90 within 1.25x of B alone", r is not None and r <= 1.25, f"{r}x")
        )
        # a tenant at a tenth of the other's rate is under its share: it should not be refused more
        fair = b["shed_rate"] <= a.get("shed_rate", 0.0)
        shed = f"429 B {b['shed_rate']:.0%}, A {a.get('shed_rate', 0.0):.0%}"
        out.append(Goal("fairness: B refused no more than A", fair, shed))
    else:
        out.append(Goal("fairness: B's TTFT p90 within 1.25x of B alone", None, "not run"))
    flood = _row(results.priority, case="interactive + batch flood", policy=flow)
    if flood and "interactive" in flood["classes"]:
        inter, batch = flood["classes"]["interactive"], flood["classes"].get("batch", {})
        p99 = inter["ttft_p99_s"]
        met = p99 is not None and p99 <= 1.0
        out.append(Goal("priority: interactive TTFT p99 <= 1 s under a batch flood", met, f"{p99} s"))
        served = 1 - inter["shed_rate"]
        out.append(
            Goal(
                "priority: interactive served (>= 90% admitted) under the flood",
                served >= 0.9,
                f"{served:.0%}",
            )
        )
        done = batch.get("completed", 0)
        out.append(
            Goal("priority: the batch class still progresses", done > 0, f"{done} batch requests completed")
        )
    else:
        out.append(Goal("priority: interactive TTFT p99 <= 1 s under a batch flood", None, "not run"))
    return out

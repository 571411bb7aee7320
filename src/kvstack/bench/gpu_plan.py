"""The plan of a ``kvstack bench gpu`` invocation (pure): its cases, their order and traces, and
how long they should take.

**Cases.** The product engine counts x workloads x loads x runs x policies. An engine count K
runs on the first K engines of the engines file, so one start of four engines serves the 2- and
the 4-engine cases. Order: engine count, workload, load, run; the policies last.

**Traces.** Case c replays ``sized_workload(c.workload, ..., seed=case_seed(c.workload,
c.trace_policy, c.salt))``. The salt is ``--trace`` plus one part per dimension the plan varies
(``e2``, ``load0.5``, ``run2``), so no case finds another (engines, load, run)'s prompts cached
anywhere: not even in LMCache's CPU tier, which the reset between cases cannot empty. With
``same_trace`` every policy of one (engines, workload, load, run) replays one trace
(``trace_policy`` is the shared name), so routers are compared on identical requests; without
it each policy draws its own (today's single-case behaviour, or ``--trace-as``).

**LMCache's leftovers.** vLLM 0.24's ``POST /reset_prefix_cache?reset_external=true`` empties
an engine's GPU prefix cache, but LMCache 0.5.3's ``LMCacheConnectorV1`` has no ``reset_cache``,
so its CPU tier keeps the chunks of every earlier case (only a restart empties it). On one trace
the second router of a run would load the first one's prompts from there: on two simulators that
cut a router's TTFT p90 by up to 6x against going first (``bench-results/gpu/sim-matrix/``). So
on a shared trace every policy's system prompts start with its own ``text_salt`` (a few tokens
inside the first KV block): the same arrivals, lengths and prefix sharing, in prompts no other
router's case cached (:func:`salted`). The policies also rotate by one per run (run 1 in the
given order, run 2 from the second policy on, ...), so none always runs on the engines first.

**Names.** A plan that varies nothing but workload and policy keeps today's file tags
(``WORKLOAD-POLICY``) and seeds, so the single-case command is unchanged.

**Estimate.** A case costs its router's start and settling (``CASE_OVERHEAD_S``), the arrival
span stretched past saturation (arrivals at ``load`` x capacity drain at capacity: ``duration x
max(1, load)``), and the last sessions' remaining turns (``SESSION_TAIL_S`` by workload).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from kvstack.bench import workloads

WORKLOADS: tuple[str, ...] = ("multi_round_qa", "shared_prefix")
SAME_TRACE = "same"  # the trace_policy of cases that share one trace across policies
# Per case: the router process starting and becoming ready, the KV-event subscriptions settling
# (2 s), the last events landing (1 s), the cache reset and the scrapes.
CASE_OVERHEAD_S = 8.0
# After the last session arrives: multi-round QA runs its remaining turns (5 rounds, 0.5 s think
# time, 100-token answers); a shared-prefix request is one turn.
SESSION_TAIL_S = {"multi_round_qa": 15.0, "shared_prefix": 4.0}


@dataclass(frozen=True, slots=True)
class Case:
    """One router over K engines replaying one workload at one load, in one run."""

    engines: int
    workload: str
    load: float
    policy: str
    run: int
    salt: str  # the trace salt: --trace plus the plan's varying dimensions
    trace_policy: str  # whose trace it replays: its own policy, --trace-as, or SAME_TRACE
    tag: str  # file names: LABEL-TAG.trace.jsonl
    text_salt: str = ""  # prefixed to every system prompt: "" or this policy's own on a shared trace

    @property
    def seed(self) -> int:
        return case_seed(self.workload, self.trace_policy, self.salt)

    @property
    def group(self) -> tuple[int, str, float]:
        """The (engines, workload, load) row of the verdict this case belongs to."""
        return (self.engines, self.workload, self.load)

    def labels(self) -> dict[str, object]:
        return {
            "engines": self.engines,
            "workload": self.workload,
            "load": self.load,
            "policy": self.policy,
            "run": self.run,
            "trace_salt": self.salt,
            "trace_policy": self.trace_policy,
            "text_salt": self.text_salt,
        }


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """What the command line asked for. ``engine_counts`` empty: every engine, not a dimension."""

    engines_available: int
    workloads: tuple[str, ...]
    loads: tuple[float, ...]
    policies: tuple[str, ...]
    runs: int = 1
    engine_counts: tuple[int, ...] = ()
    trace: str = ""
    trace_as: str | None = None
    same_trace: bool | None = None  # None: on for a matrix, off for a single case

    @property
    def is_matrix(self) -> bool:
        """Varies more than workload and policy: engines, loads or runs."""
        return bool(self.engine_counts) or len(self.loads) > 1 or self.runs > 1


class PlanError(ValueError):
    """A plan that cannot run; the message names the option."""


def case_seed(workload: str, policy: str, trace: str = "") -> int:
    """A seed per (workload, policy, trace): distinct prompts per case, the same trace on any machine."""
    return zlib.crc32(f"{workload}/{policy}{'/' + trace if trace else ''}".encode())


def validate(spec: PlanSpec) -> None:
    """Raise :class:`PlanError` naming the first bad option."""
    if not spec.workloads:
        raise PlanError("--workload: give at least one")
    if bad := [w for w in spec.workloads if w not in WORKLOADS]:
        raise PlanError(f"--workload: unknown {bad[0]!r}; choose {' or '.join(WORKLOADS)}")
    if not spec.policies or len(set(spec.policies)) != len(spec.policies):
        raise PlanError("--policy: give each policy once")
    if not spec.loads or any(not (load > 0 and math.isfinite(load)) for load in spec.loads):
        raise PlanError("--load: every load must be a finite number > 0")
    if len(set(spec.loads)) != len(spec.loads):
        raise PlanError("--load: give each load once")
    if spec.runs < 1:
        raise PlanError("--runs: must be >= 1")
    for k in spec.engine_counts:
        if not 1 <= k <= spec.engines_available:
            raise PlanError(
                f"--engines-subset: {k} is not between 1 and the {spec.engines_available} engines available"
            )
    if len(set(spec.engine_counts)) != len(spec.engine_counts):
        raise PlanError("--engines-subset: give each count once")


def plan(spec: PlanSpec) -> list[Case]:
    """Every case of ``spec``, in running order (see the module docstring)."""
    validate(spec)
    same = spec.is_matrix if spec.same_trace is None else spec.same_trace
    counts = spec.engine_counts or (spec.engines_available,)
    cases = []
    for k in counts:
        for workload in spec.workloads:
            for load in spec.loads:
                for run in range(1, spec.runs + 1):
                    salt = _salt(spec, k, load, run)
                    for policy in rotated(spec.policies, run):
                        trace_policy = spec.trace_as or (SAME_TRACE if same else policy)
                        tag = _tag(spec, k, workload, load, policy, run)
                        text = text_salt(policy) if trace_policy == SAME_TRACE else ""
                        cases.append(Case(k, workload, load, policy, run, salt, trace_policy, tag, text))
    return cases


def text_salt(policy: str) -> str:
    """A policy's prompt prefix on a shared trace: eight hex digits, so every router's prompts are
    the same length give or take a token."""
    return f"[{zlib.crc32(policy.encode()):08x}]"


def salted(workload: workloads.Workload, salt: str) -> workloads.Workload:
    """``workload`` with every system prompt starting with ``salt``: the same sessions, arrivals,
    turns and prefix sharing, in prompts whose first KV block no other salt shares."""
    if not salt:
        return workload
    sessions = [dataclasses.replace(s, system=f"{salt} {s.system}") for s in workload.sessions]
    return dataclasses.replace(workload, sessions=sessions)


def rotated(policies: Sequence[str], run: int) -> list[str]:
    """The policies in run ``run``'s order: the given order shifted left by ``run - 1``."""
    shift = (run - 1) % len(policies)
    return [*policies[shift:], *policies[:shift]]


def _salt(spec: PlanSpec, engines: int, load: float, run: int) -> str:
    parts = [spec.trace] if spec.trace else []
    if spec.engine_counts:
        parts.append(f"e{engines}")
    if len(spec.loads) > 1:
        parts.append(f"load{load:g}")
    if spec.runs > 1:
        parts.append(f"run{run}")
    return "/".join(parts)


def _tag(spec: PlanSpec, engines: int, workload: str, load: float, policy: str, run: int) -> str:
    parts = [f"e{engines}"] if spec.engine_counts else []
    parts += [workload]
    if len(spec.loads) > 1:
        parts.append(f"l{load:g}")
    parts.append(policy)
    if spec.runs > 1:
        parts.append(f"r{run}")
    return "-".join(parts)


def estimate_case_s(workload: str, load: float, duration_s: float) -> float:
    """Expected wall time of one case (see the module docstring)."""
    return CASE_OVERHEAD_S + duration_s * max(1.0, load) + SESSION_TAIL_S.get(workload, 15.0)


def estimate_s(cases: Sequence[Case], duration_s: float) -> float:
    """Expected wall time of the whole plan."""
    return sum(estimate_case_s(c.workload, c.load, duration_s) for c in cases)


def sized_workload(
    name: str, duration_s: float, load: float, prefill_tokens_per_s: float, seed: int
) -> workloads.Workload:
    """A workload whose sessions arrive over about ``duration_s`` at ``load`` x the cold prefill rate.

    The capacity handed to the builders is solved from their own rate formulas, so the arrival span,
    not the KV capacity, sets the run's length.
    """
    fill = workloads.REGIME_FILL["under"]
    if name == "multi_round_qa":
        rounds, system, user, turn = 5, 1000, 2000, 100 + 100 + 2 * workloads.TEMPLATE_TOKENS
        mean_prompt = system + user + 100 + turn * (rounds - 1) / 2
        rate = workloads.request_rate(load, prefill_tokens_per_s, mean_prompt)
        users = max(2, round(duration_s * rate / rounds))
        capacity = math.ceil((users * (user + rounds * turn) + system) / fill)
        return workloads.multi_round_qa(
            capacity, "under", prefill_tokens_per_s=prefill_tokens_per_s, load=load, seed=seed
        )
    if name == "shared_prefix":
        system, per_group = 4000, 16
        rate = workloads.request_rate(
            load, prefill_tokens_per_s, system + 128 + 2 * workloads.TEMPLATE_TOKENS
        )
        groups = max(2, round(duration_s * rate / per_group))
        return workloads.shared_prefix(
            math.ceil(groups * system / fill),
            "under",
            prefill_tokens_per_s=prefill_tokens_per_s,
            load=load,
            seed=seed,
        )
    raise ValueError(f"unknown workload {name!r}; choose multi_round_qa or shared_prefix")

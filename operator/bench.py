"""Autoscaling benchmark: the decision function driving a simulated fleet through a load step.

A fluid model of vLLM pods (``slots`` concurrent sequences each, ``service_s`` per request, a model
load of ``startup_s`` before a new pod serves) fed by a piecewise-constant arrival rate, evaluated
every ``interval_s`` with the real :func:`kvstack.operator.autoscale.decide`. Deterministic, so it
compares policies exactly: reaction time to the step, replica-minutes, time above the queue target,
and direction reversals (flapping). ``python -m kvstack.operator.bench --out DIR`` writes
``autoscale.json`` and ``autoscale.png``. This is the model mode of ``kvstack bench autoscale``;
``--cluster`` measures real (kwok) pods instead (:mod:`kvstack.bench.autoscale_cluster`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kvstack.operator.autoscale import History, Observation, Policy, decide


@dataclass(frozen=True)
class Fleet:
    slots: int = 16  # max-num-seqs a pod runs at once
    service_s: float = 10.0  # one request's time on a slot
    startup_s: float = 60.0  # model load before a new pod is Ready
    interval_s: float = 15.0
    # (start second, arrivals per second)
    trace: tuple[tuple[float, float], ...] = ((0, 2.0), (300, 10.0), (900, 2.0))
    duration_s: float = 1800.0


@dataclass
class Run:
    name: str
    times: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    waiting_per_pod: list[float] = field(default_factory=list)
    reaction_s: float | None = None  # load step -> first scale up
    capacity_s: float | None = None  # load step -> enough Ready pods for the load
    replica_minutes: float = 0.0
    above_target_s: float = 0.0
    reversals: int = 0


def _rate(trace: tuple[tuple[float, float], ...], t: float) -> float:
    return next(r for start, r in reversed(trace) if t >= start)


def simulate(
    name: str, fleet: Fleet, policy: Policy, demand_floor: bool = True, capacity_floor: bool = True
) -> Run:
    """Drive ``decide`` over the fleet's trace in 1-second steps.

    ``capacity_floor``: the observation carries a saturated pod's capacity (the most running
    requests per pod seen while requests waited), as the operator's capacity query reads it.
    """
    run = Run(name)
    in_flight, replicas = 0.0, policy.min_replicas
    starting: list[float] = []  # ready times of pods still loading
    ready = replicas
    history: History = ()
    step_at = fleet.trace[1][0]
    needed_after_step = math.ceil(fleet.trace[1][1] * fleet.service_s / fleet.slots)
    last_direction = "none"
    capacity: float | None = None
    for second in range(int(fleet.duration_s)):
        t = float(second)
        ready += sum(1 for r in starting if r <= t)
        starting = [r for r in starting if r > t]
        in_flight += _rate(fleet.trace, t)
        running = min(in_flight, ready * fleet.slots)
        in_flight -= running / fleet.service_s
        waiting = (in_flight - running) / max(ready, 1)
        if capacity_floor and waiting > 0 and ready:
            capacity = max(capacity or 0.0, running / ready)
        if second % int(fleet.interval_s) == 0:
            obs = Observation(
                now=t,
                current=replicas,
                value=max(waiting, 0.0),
                reporting=ready,
                running=running / max(ready, 1) if demand_floor else None,
                capacity=capacity,
            )
            d = decide(policy, obs, history)
            history = d.history
            if d.replicas > replicas:
                starting += [t + fleet.startup_s] * (d.replicas - replicas)
                if run.reaction_s is None and t >= step_at:
                    run.reaction_s = t - step_at
            elif d.replicas < replicas:
                drop = replicas - d.replicas
                gone = min(drop, len(starting))
                starting = starting[gone:]  # unready pods go first, as a ReplicaSet does
                ready -= drop - gone
            if d.direction != "none":
                if last_direction != "none" and d.direction != last_direction:
                    run.reversals += 1
                last_direction = d.direction
            replicas = d.replicas
        if run.capacity_s is None and t >= step_at and ready >= needed_after_step:
            run.capacity_s = t - step_at
        run.times.append(t)
        run.replicas.append(replicas)
        run.ready.append(ready)
        run.waiting_per_pod.append(max(waiting, 0.0))
        run.replica_minutes += replicas / 60.0
        run.above_target_s += 1.0 if waiting > policy.target * (1 + policy.tolerance) else 0.0
    return run


def variants(fleet: Fleet) -> list[Run]:
    """Our defaults, the plain HPA formula on the queue, and a cautious one-pod-per-minute scaler."""
    ours = Policy("waiting", target=5.0, min_replicas=1, max_replicas=20)
    cautious = replace(ours, up_max_pods=1, up_max_percent=1.0)
    slow = replace(fleet, interval_s=60.0)
    return [
        simulate("kvstack defaults", fleet, ours),
        simulate("running + target floor (before the capacity floor)", fleet, ours, capacity_floor=False),
        simulate("HPA formula only (no demand floor)", fleet, ours, demand_floor=False),
        simulate("one pod per minute (KEDA-operator style)", slow, cautious),
    ]


def summary(run: Run) -> dict[str, object]:
    keys = ("name", "reaction_s", "capacity_s", "replica_minutes", "above_target_s", "reversals")
    data = asdict(run)
    return {k: data[k] for k in keys}


def write(out: Path, fleet: Fleet | None = None) -> list[Run]:
    fleet = fleet or Fleet()
    runs = variants(fleet)
    out.mkdir(parents=True, exist_ok=True)
    report = {"fleet": asdict(fleet), "runs": [summary(r) for r in runs]}
    (out / "autoscale.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for run in runs:
        top.step([t / 60 for t in run.times], run.replicas, where="post", label=run.name)
        bottom.plot([t / 60 for t in run.times], run.waiting_per_pod, label=run.name)
    top.set_ylabel("replicas")
    top.legend(fontsize=8)
    bottom.set_ylabel("waiting per ready pod")
    bottom.set_xlabel("minutes (load steps at 5 and 15)")
    fig.tight_layout()
    fig.savefig(out / "autoscale.png", dpi=100)
    plt.close(fig)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results/autoscale"))
    args = parser.parse_args()
    for run in write(args.out):
        print(json.dumps(summary(run)))
    print(f"wrote {args.out}/autoscale.json and autoscale.png")


if __name__ == "__main__":
    main()

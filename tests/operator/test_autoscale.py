"""Decision tables for the pure autoscaling function (the HPA algorithm on LLM signals)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from kvstack.operator.autoscale import Decision, History, Observation, Policy, decide

NOW = 10_000.0
WAITING = Policy(signal="waiting", target=5.0, min_replicas=1, max_replicas=10)
ZERO = replace(WAITING, min_replicas=0, scale_to_zero=True)


def obs(current: int, value: float | None, reporting: int | None = None, **kw: object) -> Observation:
    return Observation(
        now=NOW,
        current=current,
        value=value,
        reporting=current if reporting is None else reporting,
        **kw,  # type: ignore[arg-type]
    )


def ago(*pairs: tuple[float, int]) -> History:
    return tuple((NOW - dt, r) for dt, r in pairs)


CASES = [
    # id, policy, observation, history, replicas, direction, reason
    ("steady at target", WAITING, obs(2, 5.0), (), 2, "none", "steady"),
    ("tolerance upper edge", WAITING, obs(2, 5.5), (), 2, "none", "steady"),
    ("tolerance lower edge", WAITING, obs(2, 4.5), (), 2, "none", "steady"),
    ("just above tolerance", WAITING, obs(2, 5.6), (), 3, "up", "queue"),
    ("queue doubles", WAITING, obs(2, 10.0), (), 4, "up", "queue"),
    ("queue sized by demand", WAITING, obs(2, 10.0, running=16.0), (), 3, "up", "queue"),
    ("demand: partial", WAITING, obs(4, 30.0, reporting=1, running=16.0), (), 4, "none", "steady"),
    ("up limited to +4 pods", WAITING, obs(1, 100.0), (), 5, "up", "queue"),
    ("up limited to +100%", replace(WAITING, max_replicas=100), obs(10, 15.0), (), 20, "up", "queue"),
    ("up clamped to max", WAITING, obs(8, 10.0), (), 10, "up", "max_replicas"),
    ("kv usage", Policy("kv_usage", 0.7, 1, 10), obs(2, 0.9), (), 3, "up", "kv_usage"),
    ("ttft slo", Policy("ttft", 1.0, 1, 10), obs(3, 2.0), (), 6, "up", "ttft"),
    # scale down: held by the window, then one pod per period
    ("down held after restart", WAITING, obs(4, 1.0), (), 4, "none", "cooldown"),
    ("down held by recent high", WAITING, obs(4, 1.0), ago((200, 4)), 4, "none", "cooldown"),
    ("down after window", WAITING, obs(4, 1.0), ago((400, 4), (200, 1), (100, 1)), 3, "down", "idle"),
    ("down two per period", replace(WAITING, down_max_pods=2), obs(4, 1.0), ago((200, 1)), 2, "down", "idle"),
    ("down window 0", replace(WAITING, down_window_s=0), obs(4, 1.0), (), 3, "down", "idle"),
    ("up window holds", replace(WAITING, up_window_s=60), obs(2, 10.0), ago((30, 3)), 3, "up", "queue"),
    # a queue is not proportional to 1/replicas: a scale down keeps what the demand needs
    ("queue floor holds", WAITING, obs(4, 2.0, running=10.0), ago((200, 1)), 4, "none", "steady"),
    ("queue floor steps", WAITING, obs(4, 2.0, running=4.0), ago((200, 1)), 3, "down", "idle"),
    ("queue floor at zero", WAITING, obs(4, 0.0, running=0.0), ago((200, 1)), 3, "down", "idle"),
    (
        "floor: kv ignores",
        Policy("kv_usage", 0.8, 1, 10),
        obs(4, 0.2, running=9.0),
        ago((200, 1)),
        3,
        "down",
        "idle",
    ),
    # the capacity floor: demand over a saturated pod's capacity (x 0.8), not running + target
    (
        "capacity floor steps to need",
        WAITING,
        obs(8, 0.0, running=2.2, capacity=4.0),
        ago((200, 1)),
        7,
        "down",
        "idle",
    ),
    (
        "capacity floor holds",
        WAITING,
        obs(6, 0.0, running=17.6 / 6, capacity=4.0),
        ago((200, 1)),
        6,
        "none",
        "steady",
    ),
    ("old floor goes below", WAITING, obs(6, 0.0, running=17.6 / 6), ago((200, 1)), 5, "down", "idle"),
    (
        "capacity floor half busy",
        WAITING,
        obs(4, 0.0, running=1.0, capacity=4.0),
        ago((200, 1)),
        3,
        "down",
        "idle",
    ),
    (
        "capacity counts the queue",
        WAITING,
        obs(4, 2.0, running=2.0, capacity=4.0),
        ago((200, 1)),
        4,
        "none",
        "steady",
    ),
    (
        "capacity 0 falls back",
        WAITING,
        obs(6, 0.0, running=17.6 / 6, capacity=0.0),
        ago((200, 1)),
        5,
        "down",
        "idle",
    ),
    (
        "capacity nan falls back",
        WAITING,
        obs(6, 0.0, running=17.6 / 6, capacity=float("nan")),
        ago((200, 1)),
        5,
        "down",
        "idle",
    ),
    (
        "capacity floor: kv",
        Policy("kv_usage", 0.8, 1, 10),
        obs(4, 0.2, running=3.0, capacity=4.0),
        ago((200, 1)),
        4,
        "none",
        "steady",
    ),
    (
        "capacity never grows",
        WAITING,
        obs(2, 0.0, running=4.0, capacity=4.0),
        ago((200, 1)),
        2,
        "none",
        "steady",
    ),
    # the router's flow-queue wait p90 against its target
    ("queue wait up", Policy("queue_wait", 0.5, 1, 10), obs(2, 1.0), (), 4, "up", "queue_wait"),
    ("queue wait steady", Policy("queue_wait", 0.5, 1, 10), obs(2, 0.52), (), 2, "none", "steady"),
    ("queue wait down", Policy("queue_wait", 0.5, 1, 10), obs(4, 0.0), ago((200, 1)), 3, "down", "idle"),
    (
        "queue wait floor",
        Policy("queue_wait", 0.5, 1, 10),
        obs(6, 0.0, running=3.0, capacity=4.0),
        ago((200, 1)),
        6,
        "none",
        "steady",
    ),
    # missing, stale, partial data never scale down
    ("no data holds", WAITING, obs(3, None), (), 3, "none", "metrics_unavailable"),
    ("nobody reported", WAITING, obs(3, 0.0, reporting=0), (), 3, "none", "metrics_unavailable"),
    ("nan holds", WAITING, obs(3, float("nan")), (), 3, "none", "metrics_unavailable"),
    ("stale holds", WAITING, obs(3, 0.0, age_s=120.0), (), 3, "none", "metrics_unavailable"),
    ("stale high holds", WAITING, obs(3, 50.0, age_s=120.0), (), 3, "none", "metrics_unavailable"),
    ("partial never down", WAITING, obs(4, 0.0, 3), ago((400, 1)), 4, "none", "metrics_unavailable"),
    ("partial may go up", WAITING, obs(4, 20.0, reporting=2), (), 8, "up", "queue"),
    ("partial: loading pods", WAITING, obs(4, 10.0, reporting=1), (), 4, "none", "steady"),
    # bounds win over data and rate limits
    ("no data above max", replace(WAITING, max_replicas=2), obs(5, None), (), 2, "down", "max_replicas"),
    ("below min", replace(WAITING, min_replicas=2), obs(1, 0.0), (), 2, "up", "min_replicas"),
    ("at min idle", WAITING, obs(1, 0.0), ago((400, 1)), 1, "none", "min_replicas"),
    ("max lowered", replace(WAITING, max_replicas=3), obs(6, 5.0), (), 3, "down", "max_replicas"),
    # scale from and to zero
    ("wake on pending", ZERO, obs(0, None, pending=3.0), (), 1, "up", "wake"),
    ("wake to min", replace(ZERO, min_replicas=2), obs(0, None, pending=1.0), (), 2, "up", "wake"),
    ("zero, nothing pending", ZERO, obs(0, None, pending=0.0), (), 0, "none", "steady"),
    ("zero, router unknown", ZERO, obs(0, None), (), 0, "none", "steady"),
    ("zero below new min", replace(ZERO, min_replicas=1), obs(0, None), (), 1, "up", "min_replicas"),
    ("to zero when idle", ZERO, obs(1, 0.0, idle=True), ago((400, 1), (250, 0)), 0, "down", "idle"),
    ("not zero before idle", ZERO, obs(1, 0.0, idle=False), ago((400, 1), (250, 0)), 1, "none", "steady"),
    ("not zero unknown idle", ZERO, obs(1, 0.0), ago((400, 1), (250, 0)), 1, "none", "steady"),
    (
        "not zero without opt-in",
        replace(ZERO, scale_to_zero=False),
        obs(1, 0.0, idle=True),
        ago((400, 1), (250, 0)),
        1,
        "none",
        "steady",
    ),
]


@pytest.mark.parametrize(
    ("policy", "observation", "history", "replicas", "direction", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_decision_table(
    policy: Policy,
    observation: Observation,
    history: History,
    replicas: int,
    direction: str,
    reason: str,
) -> None:
    decision = decide(policy, observation, history)
    assert (decision.replicas, decision.direction, decision.reason) == (replicas, direction, reason), (
        decision.message
    )
    assert decision.message


def test_history_keeps_only_the_window_and_records_this_evaluation() -> None:
    decision = decide(WAITING, obs(2, 10.0), ago((1000, 9), (100, 2)))
    assert decision.history == ((NOW - 100, 2), (NOW, 4))


def test_no_data_records_no_recommendation() -> None:
    decision = decide(WAITING, obs(2, None), ago((100, 2)))
    assert decision.history == ago((100, 2))


def test_policy_rejects_bounds_out_of_order() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        Policy("waiting", 5.0, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target"):
        Policy("waiting", 0.0, min_replicas=1, max_replicas=2)


def _run(policy: Policy, load: list[float], current: int, period: float = 15.0) -> list[Decision]:
    """Drive ``decide`` with a total queue ``load`` shared by the replicas, one step per period."""
    history: History = ()
    out = []
    for i, total in enumerate(load):
        o = Observation(now=i * period, current=current, value=total / current, reporting=current)
        d = decide(policy, o, history)
        history, current = d.history, d.replicas
        out.append(d)
    return out


def test_noisy_steady_load_does_not_flap() -> None:
    # Total waiting swings between 14 and 26 (target 5 per replica): the down window holds the
    # peak, so after reaching it the size never changes again.
    load = [14.0 if i % 2 else 26.0 for i in range(80)]  # 20 minutes at 15 s
    decisions = _run(WAITING, load, current=2)
    sizes = [d.replicas for d in decisions]
    settled = sizes.index(max(sizes))
    assert set(sizes[settled:]) == {max(sizes)}
    assert sum(d.direction == "down" for d in decisions) == 0


def test_load_step_up_is_immediate_and_down_waits_the_window() -> None:
    load = [50.0] * 4 + [0.0] * 60
    decisions = _run(WAITING, load, current=1)
    sizes = [d.replicas for d in decisions]
    assert sizes[0] == 5 and sizes[1] == 10  # +4 pods, then +100%
    first_down = next(i for i, d in enumerate(decisions) if d.direction == "down")
    # The load dropped at step 4 (t=60 s); the 300 s window ends at t=360 s, step 24.
    assert first_down * 15.0 - 4 * 15.0 >= 300.0
    assert all(b - a >= -1 for a, b in itertools.pairwise(sizes))  # one pod per period
    assert sizes[-1] == 1


def test_steady_queue_load_settles_without_reversal() -> None:
    # 8 requests in flight on 1-seq engines (target 2 waiting each): HPA's ratio alone would go
    # 1 -> 4 -> 2 -> 3; sized by demand it goes to 3 and stays.
    policy = replace(WAITING, target=2.0, down_window_s=30)
    history: History = ()
    current, sizes = 1, [1]
    for i in range(60):
        running = min(8, current) / current
        waiting = max(0, 8 - current) / current
        o = Observation(now=i * 15.0, current=current, value=waiting, reporting=current, running=running)
        d = decide(policy, o, history)
        history, current = d.history, d.replicas
        sizes.append(current)
    downs = [i for i, (a, b) in enumerate(itertools.pairwise(sizes)) if b < a]
    ups = [i for i, (a, b) in enumerate(itertools.pairwise(sizes)) if b > a]
    assert not downs or max(ups) < min(downs), sizes
    assert sizes[-1] == 3  # 8 in flight on 3 pods: 5 waiting, 1.7 each, below the target of 2


def test_partial_data_during_scale_up_does_not_overshoot() -> None:
    # 10 replicas wanted; only the 2 ready pods report the same backlog while 8 load: no new step.
    d = decide(WAITING, obs(10, 25.0, reporting=2), ago((15, 10)))
    assert (d.replicas, d.reason) == (10, "steady")


def test_floor_utilization_is_a_fraction() -> None:
    with pytest.raises(ValueError, match="floor_utilization"):
        Policy("waiting", 5.0, 1, 10, floor_utilization=0.0)
    with pytest.raises(ValueError, match="floor_utilization"):
        Policy("waiting", 5.0, 1, 10, floor_utilization=1.5)

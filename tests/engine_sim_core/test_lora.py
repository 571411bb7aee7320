"""The simulator's LoRA core (pure): config limits, the adapter registry's vLLM errors, GPU/CPU slots,
the scheduler's max_loras rule, per-adapter KV scoping, and the swap's cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvstack.common.kv_events import BlockStored
from kvstack.engine.sim.config import LatencyParams
from kvstack.engine.sim.kv_cache import KVCache
from kvstack.engine.sim.latency import StepWork, step_time
from kvstack.engine.sim.lora import (
    Activation,
    AdapterRegistry,
    AdapterSlots,
    LoRAConfig,
    LoRAError,
    LoRAModule,
    runtime_updating_from_env,
)
from kvstack.engine.sim.scheduler import Scheduler, SimSeq

BS = 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("0", False), ("1", True), ("true", True), (" TRUE ", True), ("yes", False)],
)
def test_runtime_updating_reads_the_env_as_vllm(value: str | None, expected: bool) -> None:
    env = {} if value is None else {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}
    assert runtime_updating_from_env(env) is expected


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"max_loras": 4, "max_cpu_loras": 2}, r"max_cpu_loras \(2\) must be >= max_loras \(4\)"),
        ({"modules": [{"name": "a", "path": "/a"}]}, "need enabled"),
        (
            {"enabled": True, "modules": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]},
            "duplicate",
        ),
        ({"max_lora_rank": 4}, "max_lora_rank"),
        ({"max_loras": 0}, "max_loras"),
    ],
)
def test_config_errors_name_the_field(values: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        LoRAConfig.model_validate(values)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sql=/adapters/sql", LoRAModule(name="sql", path="/adapters/sql")),
        ("a=b=c", LoRAModule(name="a", path="b=c")),
        (
            '{"name": "x", "path": "org/x", "base_model_name": "m"}',
            LoRAModule(name="x", path="org/x", base_model_name="m"),
        ),
    ],
)
def test_lora_modules_flag_forms(text: str, expected: LoRAModule) -> None:
    assert LoRAModule.parse(text) == expected


@pytest.mark.parametrize("text", ["sql", "=path", "name="])
def test_lora_modules_flag_rejects_half_entries(text: str) -> None:
    with pytest.raises(ValueError, match="name=path"):
        LoRAModule.parse(text)


def _adapter_dir(root: Path, name: str, rank: int) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
    return str(folder)


def test_registry_loads_lists_and_unloads_with_stable_ids() -> None:
    reg = AdapterRegistry(LoRAConfig(enabled=True), "base")
    a = reg.load("a", "/x/a")
    b = reg.load("b", "org/b")
    assert (a.lora_id, b.lora_id, a.parent, b.path) == (1, 2, "base", "org/b")
    again = reg.load("a", "/x/a2", load_inplace=True)  # in place keeps the id, takes the new path
    assert (again.lora_id, again.path) == (1, "/x/a2")
    assert [x.name for x in reg.all()] == ["a", "b"]
    assert reg.unload("a").lora_id == 1
    assert reg.get("a") is None
    assert reg.load("a", "/x/a").lora_id == 3  # a new load is a new adapter to the engine


@pytest.mark.parametrize(
    ("config", "action", "status", "err_type", "message"),
    [
        (
            {"enabled": True},
            ("load", "dup", "/p"),
            400,
            "InvalidUserInput",
            "The lora adapter 'dup' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True.",
        ),
        (
            {"enabled": True},
            ("load", "", "/p"),
            400,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.",
        ),
        (
            {},
            ("load", "x", "/p"),
            500,
            "InternalServerError",
            "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA.",
        ),
        (
            {"enabled": True, "check_paths": True},
            ("load", "x", "/no/such/folder"),
            404,
            "NotFoundError",
            "Loading lora x failed: No adapter found for /no/such/folder",
        ),
        (
            {"enabled": True},
            ("load", "big", "RANK64"),
            500,
            "InternalServerError",
            "Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16.",
        ),
        (
            {"enabled": True},
            ("unload", "ghost", ""),
            404,
            "NotFoundError",
            "The lora adapter 'ghost' cannot be found.",
        ),
        (
            {"enabled": True},
            ("unload", "", ""),
            400,
            "InvalidUserInput",
            "'lora_name' needs to be provided to unload a LoRA adapter.",
        ),
    ],
)
def test_registry_errors_are_vllms(
    tmp_path: Path,
    config: dict[str, object],
    action: tuple[str, str, str],
    status: int,
    err_type: str,
    message: str,
) -> None:
    reg = AdapterRegistry(LoRAConfig.model_validate(config), "base")
    verb, name, path = action
    if name == "dup":
        reg.load("dup", "/p")
    if path == "RANK64":
        path = _adapter_dir(tmp_path, "big", 64)
    with pytest.raises(LoRAError) as caught:
        if verb == "load":
            reg.load(name, path)
        else:
            reg.unload(name)
    err = caught.value
    assert err.body() == {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    assert err.status == status


def test_a_real_adapter_folder_within_the_rank_limit_loads(tmp_path: Path) -> None:
    reg = AdapterRegistry(LoRAConfig(enabled=True, check_paths=True, max_lora_rank=8), "base")
    assert reg.load("ok", _adapter_dir(tmp_path, "ok", 8)).lora_id == 1


@pytest.mark.parametrize(
    ("max_loras", "max_cpu", "steps", "expected"),
    [
        # one slot: every change of adapter is a swap; the CPU cache holds both, so no disk read
        (1, 2, [["a"], ["a"], ["b"], ["a"]], [(1, 0), (0, 0), (1, 0), (1, 0)]),
        # two slots hold both adapters: only the first use of each copies
        (2, 2, [["a"], ["b"], ["a", "b"], ["a"]], [(1, 0), (1, 0), (0, 0), (0, 0)]),
        # LRU: c (never loaded: read from disk) evicts a, the least recently used, so a swaps back in
        (2, 3, [["a"], ["b"], ["b"], ["c"], ["a"]], [(1, 0), (1, 0), (0, 0), (1, 1), (1, 0)]),
        # one CPU copy too few: an adapter the CPU cache dropped is read from disk again
        (1, 1, [["a"], ["b"], ["a"]], [(1, 0), (1, 1), (1, 1)]),
    ],
)
def test_slots_count_swaps_and_disk_reads(
    max_loras: int, max_cpu: int, steps: list[list[str]], expected: list[tuple[int, int]]
) -> None:
    slots = AdapterSlots(max_loras, max_cpu)
    slots.add("a")
    if max_cpu > 1:
        slots.add("b")
    got = [slots.activate(step) for step in steps]
    assert got == [Activation(s, d) for s, d in expected]
    assert slots.total_swaps == sum(s for s, _ in expected)


def test_slots_refuse_more_adapters_than_slots() -> None:
    with pytest.raises(ValueError, match="max_loras is 1"):
        AdapterSlots(1, 1).activate(["a", "b"])


def _seq(rid: str, lora: str | None, tokens: list[int] | None = None, lora_id: int | None = None) -> SimSeq:
    toks = tokens or [300 + (sum(map(ord, rid)) * 31 + i) % 5000 for i in range(8)]
    return SimSeq(
        request_id=rid,
        tokens=list(toks),
        num_prompt=len(toks),
        target_len=4,
        ends_with_stop=False,
        seed=1,
        root=9,
        lora_name=lora,
        lora_id=lora_id,
    )


@pytest.mark.parametrize(
    ("max_loras", "loras", "first_step", "deferred"),
    [
        (1, ["A", "B", "A", None], {"r0", "r2", "r3"}, 1),  # B waits; the base model is never limited
        (2, ["A", "B", "C", "A"], {"r0", "r1", "r3"}, 1),
        (4, ["A", "B", "C", "D"], {"r0", "r1", "r2", "r3"}, 0),
    ],
)
def test_a_step_holds_at_most_max_loras_adapters(
    max_loras: int, loras: list[str | None], first_step: set[str], deferred: int
) -> None:
    s = Scheduler(
        KVCache(64, BS), max_num_seqs=8, max_num_batched_tokens=256, lora_slots=AdapterSlots(max_loras, 8)
    )
    for i, lora in enumerate(loras):
        s.add(_seq(f"r{i}", lora))
    plan = s.schedule(0.0)
    assert {q.request_id for q, _ in plan.scheduled} == first_step
    assert plan.deferred == deferred
    assert plan.work.lora_swaps == len(plan.loras)  # each adapter copied into an empty slot once
    # the skipped request keeps its place at the head of the queue
    assert [q.request_id for q in s.waiting] == [
        f"r{i}" for i in range(len(loras)) if f"r{i}" not in first_step
    ]


def test_a_deferred_adapter_runs_once_the_slot_frees() -> None:
    s = Scheduler(KVCache(64, BS), max_num_seqs=8, max_num_batched_tokens=256, lora_slots=AdapterSlots(1, 2))
    s.add(_seq("a", "A"))
    s.add(_seq("b", "B"))
    swaps = []
    order = []
    while s.has_work:
        plan = s.schedule(0.0)
        swaps.append(plan.work.lora_swaps)
        order.extend(q.request_id for q, n in plan.scheduled if q.num_computed == 0)
        s.update(plan)
    assert order == ["a", "b"]
    assert sum(swaps) == 2  # A into the slot, then B in its place


def test_the_same_prompt_under_two_adapters_shares_no_blocks() -> None:
    kv = KVCache(64, BS)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256, lora_slots=AdapterSlots(2, 2))
    prompt = list(range(100, 117))  # 4 full blocks + 1
    hits = {}
    for rid, lora, lora_id in [("a1", "A", 1), ("b1", "B", 2), ("a2", "A", 1), ("base", None, None)]:
        s.add(_seq(rid, lora, prompt, lora_id))
        plan = s.schedule(0.0)
        hits[rid] = plan.admitted[0].local_hit
        while s.has_work:
            s.update(plan)
            plan = s.schedule(0.0)
    assert hits == {"a1": 0, "b1": 0, "a2": 16, "base": 0}
    stored = [e for e in kv.take_events() if isinstance(e, BlockStored)]
    scopes = {(e.lora_id, e.lora_name) for e in stored}
    assert scopes == {(1, "A"), (2, "B"), (None, None)}
    for e in stored:
        if e.lora_name:
            assert all(keys is not None and keys[0] == e.lora_name for keys in e.extra_keys or [])


def test_a_swap_costs_its_constant() -> None:
    p = LatencyParams()
    base = StepWork(prefill_tokens=64)
    swapped = StepWork(prefill_tokens=64, lora_swaps=2, lora_disk_loads=1)
    assert step_time(p, swapped) - step_time(p, base) == pytest.approx(2 * p.lora_swap_s + p.lora_disk_load_s)

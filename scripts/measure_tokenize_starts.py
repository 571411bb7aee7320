"""The router's local tokenizer on a multi-round chat trace, with and without shared starts.

Replays the requests of ``kvstack bench``'s multi-round QA workload (each user's system message is
the shared system prompt followed by the user's own document; each turn resends the history with
stand-in answers) through :class:`~kvstack.router.local_tokenizer.LocalTokenizers`, in the order the
benchmark sends them, with pieces cut after shared starts and without (alternating, ``--rounds``
times each), and prints the CPU each request cost and the characters it encoded, by first and
later turns. Every request's ids are compared between the two runs and with the whole chat's.

    .venv/bin/python scripts/measure_tokenize_starts.py --model-dir /tmp/model [--capacity 400000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kvstack.bench.workloads import build, words
from kvstack.common.token_cache import TokenCache
from kvstack.router.local_tokenizer import LocalTokenizers, ModelTokenizer
from kvstack.router.prompts import PromptWork, prompt_work
from kvstack.router.protocol import parse_request

MODEL = "model"


def trace(capacity_tokens: int, seed: int) -> list[tuple[int, list[dict[str, Any]]]]:
    """(turn, messages) of each request, in the order of their start times."""
    workload = build("multi_round_qa", capacity_tokens, "under")
    rng = random.Random(seed)
    timed = []
    for session in workload.sessions:
        messages: list[dict[str, Any]] = [{"role": "system", "content": session.system}]
        for k, turn in enumerate(session.turns):
            messages.append({"role": "user", "content": turn.user})
            timed.append((session.start + k * (1.0 + session.think_time), k, list(messages)))
            messages.append({"role": "assistant", "content": words(rng, turn.max_tokens)})
    return [(k, m) for _, k, m in sorted(timed, key=lambda t: t[0])]


def chat_work(messages: list[dict[str, Any]]) -> PromptWork:
    work = prompt_work(parse_request("chat", json.dumps({"model": MODEL, "messages": messages}).encode()))
    assert isinstance(work, PromptWork)
    return work


def replay(model_dir: Path, requests: list[tuple[int, list[dict[str, Any]]]], starts: bool) -> list[Any]:
    """(turn, CPU seconds, characters encoded, ids) of each request."""
    local = LocalTokenizers(model_dir, TokenCache())
    local.warm(MODEL)
    if not starts:
        local.for_model(MODEL).starts = None
    out = []
    for turn, messages in requests:
        work = chat_work(messages)
        t0 = time.process_time()
        plan = local.plan(MODEL, work)
        assert plan is not None
        chars = plan.chars_to_encode()
        ids = local.finish(MODEL, work, plan, local.encode(MODEL, plan))
        if plan.verify:
            ids = local.check(MODEL, work, plan, ids, local.whole(MODEL, plan))
        out.append((turn, time.process_time() - t0, chars, list(ids)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--capacity", type=int, default=400_000, help="KV tokens the workload fills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="replays of each, alternating")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args()
    requests = trace(args.capacity, args.seed)
    whole = ModelTokenizer(args.model_dir / MODEL if (args.model_dir / MODEL).is_dir() else args.model_dir)
    runs = {
        f"{name}{r + 1}": replay(args.model_dir, requests, on)
        for r in range(args.rounds)
        for name, on in (("on", True), ("off", False))
    }
    for (_, _, _, a), (_, _, _, b), (_, m) in zip(runs["off1"], runs["on1"], requests, strict=True):
        assert a == b == list(whole.chat(m)), "ids differ"
    summary: dict[str, Any] = {"requests": len(requests), "users": sum(1 for k, _ in requests if k == 0)}
    print(f"{len(requests)} requests, ids equal in both runs and to the whole chat's")
    print(f"{'starts':7} {'turns':6} {'n':>5} {'CPU ms mean':>12} {'p50':>7} {'chars encoded':>14}")
    for name, rows in runs.items():
        for label, keep in (("first", lambda k: k == 0), ("later", lambda k: k > 0), ("all", lambda k: True)):
            sel = [r for r in rows if keep(r[0])]
            cpu = [r[1] * 1e3 for r in sel]
            chars = statistics.fmean(r[2] for r in sel)
            mean, p50 = statistics.fmean(cpu), statistics.median(cpu)
            summary[f"{name}_{label}"] = {
                "n": len(sel),
                "cpu_ms_mean": mean,
                "cpu_ms_p50": p50,
                "chars_encoded_mean": chars,
            }
            print(f"{name:7} {label:6} {len(sel):5} {mean:12.3f} {p50:7.3f} {chars:14.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Per-request traces of a benchmark case, and what they say about the router's decisions (pure).

A trace row joins three views of one request by the router's ``x-request-id``:

* the client's (:class:`~kvstack.bench.driver.RequestResult`): arrival, TTFT, the engine's own
  ``usage.prompt_tokens_details.cached_tokens`` (GPU prefix hits plus tokens loaded from LMCache);
* the router's access line: the route reason and ``route_ms``, the time from arrival to dispatch
  (reading the body, tokenizing, the decision);
* the cache-aware policy's decision line (``kvstack.router.decision``, written at DEBUG): for every
  engine the predicted hit by tier (GPU, the engine's own LMCache CPU tier, the shared store), its
  queued prefill and load, and the estimated TTFT.

:func:`summarize` answers the two questions a slow run raises: which decisions gave up a GPU prefix
hit another engine held (and for what), and where the time to first token went (routing vs the
engine, by the tier the chosen engine was predicted to serve from).

``python -m kvstack.bench.trace TRACE.jsonl[.gz]`` prints the summary of a trace file.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvstack.bench.driver import RequestResult

DECISION_LOGGER = "kvstack.router.decision"
ACCESS_LOGGER = "kvstack.router.access"


def router_lines(lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The router's decision and access lines by request id (other lines are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        rid = rec.get("request_id")
        if not isinstance(rid, str):
            continue
        row = out.setdefault(rid, {})
        if rec.get("logger") == DECISION_LOGGER:
            # a retried request decides again: the last decision is the one that served it
            row["decision"] = rec
        elif rec.get("logger") == ACCESS_LOGGER:
            row["access"] = rec
    return out


def trace_row(result: RequestResult, router: Mapping[str, Any] | None) -> dict[str, Any]:
    """One request's row; router fields are None when the router logged nothing for it."""
    router = router or {}
    decision = router.get("decision") or {}
    access = router.get("access") or {}
    engines: list[dict[str, Any]] = decision.get("engines") or []
    chosen = next((e for e in engines if e.get("engine") == decision.get("chosen")), None)
    best_gpu = max((e.get("gpu_tokens", 0) for e in engines), default=None)
    route_ms = access.get("route_ms")
    return {
        "request_id": result.request_id,
        "session": result.session_id,
        "turn": result.turn,
        "arrival_s": result.sent_at,
        "ok": result.ok,
        "engine": result.engine or decision.get("chosen"),
        "route_reason": decision.get("route_reason") or access.get("route_reason"),
        "route_s": None if route_ms is None else route_ms / 1000.0,
        "ttft_s": result.ttft,
        "e2e_s": result.e2e,
        "prompt_tokens": result.prompt_tokens,
        "engine_cached_tokens": result.cached_tokens,
        "predicted": engines,
        "chosen_gpu_tokens": None if chosen is None else chosen.get("gpu_tokens", 0),
        "chosen_cpu_tokens": None if chosen is None else chosen.get("cpu_tokens", 0),
        "chosen_shared_tokens": None if chosen is None else chosen.get("shared_tokens", 0),
        "best_gpu_tokens": best_gpu,
    }


def trace_rows(
    results: Sequence[RequestResult], router: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Rows in arrival order."""
    rows = [trace_row(r, router.get(r.request_id)) for r in results]
    return sorted(rows, key=lambda row: row["arrival_s"])


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A trace file's rows (``.jsonl``, or ``.jsonl.gz`` as committed under bench-results)."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def chosen_tier(row: Mapping[str, Any]) -> str:
    """The deepest tier the chosen engine was predicted to serve this prompt from."""
    if row.get("chosen_gpu_tokens") is None:
        return "untraced"
    if row.get("chosen_shared_tokens"):
        return "shared"
    if row.get("chosen_cpu_tokens"):
        return "cpu"
    if row.get("chosen_gpu_tokens"):
        return "gpu"
    return "none"


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _p90(xs: Sequence[float]) -> float | None:
    if not xs:
        return None
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def moved_turns(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The successful turns sent to another engine than their session's previous successful turn.

    Such a turn finds its session's prefix only where the previous turns ran: with LMCache and a
    shared Redis the new engine loads it from there, slower than computing it (on the H200 such
    turns took 2-3 s to their first token; bench-results/lmcache/README.md, section 11)."""
    last: dict[str, Any] = {}
    moved = []
    for r in sorted(rows, key=lambda row: row["arrival_s"]):
        session, engine = r.get("session"), r.get("engine")
        if not r.get("ok") or session is None or engine is None:
            continue
        if session in last and last[session] != engine:
            moved.append(r)
        last[session] = engine
    return moved


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Lost GPU hits and where the TTFT went, over the traced, successful requests."""
    done = [r for r in rows if r.get("ok") and r.get("ttft_s") is not None]
    traced = [r for r in done if r.get("chosen_gpu_tokens") is not None]
    lost = [r for r in traced if (r["best_gpu_tokens"] or 0) > r["chosen_gpu_tokens"]]
    prompt = sum(r.get("prompt_tokens") or 0 for r in done)
    by_tier: dict[str, dict[str, Any]] = {}
    for tier in ("gpu", "cpu", "shared", "none", "untraced"):
        group = [r for r in done if chosen_tier(r) == tier]
        if not group:
            continue
        ttft = [r["ttft_s"] for r in group]
        by_tier[tier] = {
            "requests": len(group),
            "ttft_p50_s": _median(ttft),
            "ttft_p90_s": _p90(ttft),
            "engine_cached_share": _share(group, "engine_cached_tokens"),
        }
    moved = [r["ttft_s"] for r in moved_turns(done)]
    routes = [r["route_s"] for r in done if r.get("route_s") is not None]
    engine_part = [r["ttft_s"] - r["route_s"] for r in done if r.get("route_s") is not None]
    return {
        "requests": len(rows),
        "ok": len(done),
        "traced": len(traced),
        "prompt_tokens": prompt,
        "engine_cached_tokens": sum(r.get("engine_cached_tokens") or 0 for r in done),
        "predicted_gpu_tokens": sum(r["chosen_gpu_tokens"] for r in traced),
        "lost_gpu_decisions": len(lost),
        "lost_gpu_tokens": sum(r["best_gpu_tokens"] - r["chosen_gpu_tokens"] for r in lost),
        "lost_gpu_by_reason": dict(Counter(r.get("route_reason") or "?" for r in lost)),
        "lost_gpu_by_chosen_tier": dict(Counter(chosen_tier(r) for r in lost)),
        "reasons": dict(Counter(r.get("route_reason") or "?" for r in done)),
        "ttft_p50_s": _median([r["ttft_s"] for r in done]),
        "ttft_p90_s": _p90([r["ttft_s"] for r in done]),
        "route_p50_s": _median(routes),
        "route_p90_s": _p90(routes),
        "engine_ttft_p50_s": _median(engine_part),
        "moved_turns": len(moved),
        "moved_ttft_p50_s": _median(moved),
        "by_chosen_tier": by_tier,
    }


def _share(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows)
    return sum(r.get(key) or 0 for r in rows) / prompt if prompt else None


def main(argv: Sequence[str] | None = None) -> None:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        raise SystemExit("usage: python -m kvstack.bench.trace TRACE.jsonl [...]")
    for path in paths:
        print(f"{path}: {json.dumps(summarize(read_jsonl(Path(path))), indent=2)}")


if __name__ == "__main__":
    main()

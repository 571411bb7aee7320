"""How long one engine step takes on the reference H200 (pure).

The model, per step::

    t = step_overhead + max(weights_read, per_token * tokens)          # memory- vs compute-bound
        + attention * sum(n_new * (ctx_start + n_new / 2))             # prefill attention
        + per_decode_seq * decodes + decode_ctx * sum(decode context)  # decode attention, sampling
        + LMCache load (per tier) and store terms

and a request's TTFT adds a front-end delay ``frontend + frontend_per_token * prompt_tokens``
(API server processing and prompt hashing) before it can be scheduled.

How the defaults were fitted: ``decode_ctx`` is physical (128 KiB of KV per token read at
~4.8 TB/s). The other seven single-engine constants were fitted together to the 12 TTFT points
(cold / full hit / 90% hit at 256-16384 tokens, simulated with 8192-token chunked prefill and
vLLM's hit cap of ``prompt_len - 1``) and the 5 decode ITL points (batch 1-128, context ~64),
by weighted linear least squares on relative error over a grid of ``weights_read``; the worst
point is 5.7% off. The LMCache constants were then fitted by least squares to the Redis rows:
store terms to the first engine's cold TTFT with the connector (83/261/577 ms), remote load terms
to the second engine's remote-hit TTFT (38/38/56 ms); the CPU tier is taken as 0.6x the remote
cost (not measured: LMCache's local tier skips the network hop).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstack.engine.sim.config import LatencyParams


@dataclass(slots=True)
class StepWork:
    """What one step computes, summed over its requests."""

    prefill_tokens: int = 0
    prefill_attention: float = 0.0  # sum of n_new * (ctx_start + n_new / 2)
    decodes: int = 0
    decode_context: int = 0  # sum of the context lengths of the decoding requests
    cpu_load_tokens: int = 0
    remote_load_tokens: int = 0
    store_tokens: int = 0

    def add_prefill(self, num_new: int, ctx_start: int) -> None:
        self.prefill_tokens += num_new
        self.prefill_attention += num_new * (ctx_start + num_new * 0.5)

    def add_decode(self, context: int) -> None:
        self.decodes += 1
        self.decode_context += context


def step_time(p: LatencyParams, w: StepWork) -> float:
    """Simulated seconds of one step (0 when the step schedules nothing)."""
    tokens = w.prefill_tokens + w.decodes
    if tokens == 0:
        return 0.0
    t = p.step_overhead_s + max(p.weights_read_s, p.per_token_s * tokens)
    t += p.attention_s * w.prefill_attention
    t += p.per_decode_seq_s * w.decodes + p.decode_ctx_s * w.decode_context
    if w.cpu_load_tokens:
        t += p.lmcache_cpu_load_s + p.lmcache_cpu_load_per_token_s * w.cpu_load_tokens
    if w.remote_load_tokens:
        t += p.lmcache_remote_load_s + p.lmcache_remote_load_per_token_s * w.remote_load_tokens
    if w.store_tokens:
        t += p.lmcache_store_s + p.lmcache_store_per_token_s * w.store_tokens
    return t


def frontend_delay(p: LatencyParams, prompt_tokens: int) -> float:
    """Simulated seconds between a request's arrival and the moment the scheduler can see it."""
    return p.frontend_s + p.frontend_per_token_s * prompt_tokens

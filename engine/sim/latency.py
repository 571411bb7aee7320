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

Deployments other than the reference (:func:`engine_step_time`, :func:`engine_frontend_delay`) add
three things, each 1 / 0 by default so the reference fit is untouched:

- ``token_cost_scale``: prompt work is charged as ``s`` model tokens per simulated token (new tokens
  and loads x s, prefill attention x s^2, decode context x s; a decode is still one token). The
  built-in tokenizer makes 2.05-2.16x fewer tokens of the H200 run's prompts than its model's BPE.
- ``gpu_share``: the step lasts ``t / gpu_share``. Engines sharing one GPU without MPS time-slice
  it, so a busy neighbour stretches every step; an engine cannot see its neighbour, so the factor
  is fixed (the busy case). Two engines at utilization 0.3 on one H200 measured ITL p50 22.7 and
  24.7 ms (cache-aware, load 0.35) where the unshared simulator gave 5.25 ms on the same traces
  (about 6 ms with the 2.1x token scale's longer decode contexts): a share of about 0.25, not the
  0.5 of ideal time-slicing. The rest is context switching and the LMCache connector's per-step
  hooks, which the run cannot separate. 0.26 was set before the check run, which then gave ITL p50
  22.4 / 23.1 ms. A fixed factor overstates steps when the neighbour idles (at load 0.12 the GPU
  measured ITL p50 15 ms, a share of about 0.4). ``shared_gpu`` lifts that: engines of one
  simulated GPU count the busy ones among them and take each step's share from a table by that
  count (:mod:`kvstack.engine.sim.gpu_peers`); ``share`` is then passed per step.
- LMCache's synchronous offload (``lmcache.store_us_per_request`` + ``store_us_per_token`` x the
  prompt tokens a request computed), charged to the step that finishes the prefill and not divided
  by the share: the logged ``offload_time`` was measured on the shared GPU. Theil-Sen over the 1,384
  ``Stored N ... offload_time`` lines of bench-results/gpu/h200-{r2,long}-engine*.log.gz gives
  0.79 ms + 4.49 us/token (256 tokens: 1.9 ms median, 8,960: 45 ms);
  :func:`kvstack.engine.sim.fit.offload_fit` redoes it. It adds to the ``lmcache_store_*`` terms above,
  which charge the connector's whole cold-TTFT overhead when the simulated tiers are on.
- LMCache's synchronous loads (``lmcache.cpu_load_us_per_token`` and ``remote_load_us_per_token``
  x the tokens loaded, a remote load counting every token asked for even when it fails), charged to
  the step that loads and, like the store, not divided by the share. From the 90 ``Retrieved N out
  of M required tokens ... cost`` lines of the same logs (:func:`kvstack.engine.sim.fit.retrieve_fit`):
  the CPU tier copies at 10-40 GB/s, a median 4.0 us/token (8 loads); Redis at 0-0.5 GB/s, a median
  330 us per token asked for (82 loads), 5x the shared GPU's ~70 us to compute a token, and 43% of
  the remote tokens asked for never came back: LMCache stops at the first chunk it cannot read, a
  chance of 0.061 per 256-token chunk (``lmcache.remote_load_failure``). Set with the
  ``latency.lmcache_*_load_*`` terms at 0, these replace the reference fit's load terms (a 38 ms
  remote-hit TTFT on an idle, unshared engine).


LoRA adapters (``latency.lora_*``): a step that needs an adapter not in a GPU slot first copies it
in (``lora_swap_s`` each: vLLM 0.24's ``activate_adapter`` calls ``set_lora`` on every LoRA-wrapped
module; 12.7 ms measured on the H200 for rank-8 q/v adapters of the 8B shape, where launch overhead
alone had suggested ~3.5 ms), and one the CPU cache (``max_cpu_loras``)
had dropped is read from disk before that (``lora_disk_load_s``: ~7 MB of rank-8 q/v safetensors
plus PEFT's checks, 30 ms assumed). Both are charged to the step and divided by ``gpu_share``.
The Punica kernels' per-step cost with adapters active is not modelled. ``scripts/gpu/lora_proof.py``
measures the swap on the H200 (TTFT of alternating adapters at ``--max-loras 1`` against one adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstack.engine.sim.config import LatencyParams, SimConfig


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
    offloads: int = 0  # requests whose prefill finished in this step (LMCache's synchronous store)
    offload_tokens: int = 0  # prompt tokens those requests computed
    lora_swaps: int = 0  # adapters copied into a GPU slot before this step (AdapterSlots.activate)
    lora_disk_loads: int = 0  # of those, adapters read back from disk first (CPU cache miss)

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
    t += _load_terms(p, w) + _store_terms(p, w)
    t += p.lora_swap_s * w.lora_swaps + p.lora_disk_load_s * w.lora_disk_loads
    return t


def _load_terms(p: LatencyParams, w: StepWork) -> float:
    t = 0.0
    if w.cpu_load_tokens:
        t += p.lmcache_cpu_load_s + p.lmcache_cpu_load_per_token_s * w.cpu_load_tokens
    if w.remote_load_tokens:
        t += p.lmcache_remote_load_s + p.lmcache_remote_load_per_token_s * w.remote_load_tokens
    return t


def _store_terms(p: LatencyParams, w: StepWork) -> float:
    if not w.store_tokens:
        return 0.0
    return p.lmcache_store_s + p.lmcache_store_per_token_s * w.store_tokens


def frontend_delay(p: LatencyParams, prompt_tokens: int) -> float:
    """Simulated seconds between a request's arrival and the moment the scheduler can see it."""
    return p.frontend_s + p.frontend_per_token_s * prompt_tokens


def scale_work(w: StepWork, s: float) -> StepWork:
    """``w`` in model tokens, when each simulated token stands for ``s`` of them (decodes stay one)."""
    if s == 1.0:
        return w
    return StepWork(
        prefill_tokens=round(w.prefill_tokens * s),
        prefill_attention=w.prefill_attention * s * s,
        decodes=w.decodes,
        decode_context=round(w.decode_context * s),
        cpu_load_tokens=round(w.cpu_load_tokens * s),
        remote_load_tokens=round(w.remote_load_tokens * s),
        store_tokens=round(w.store_tokens * s),
        offloads=w.offloads,
        offload_tokens=round(w.offload_tokens * s),
        lora_swaps=w.lora_swaps,
        lora_disk_loads=w.lora_disk_loads,
    )


def offload_time(store_us_per_request: float, store_us_per_token: float, w: StepWork) -> float:
    """Seconds of LMCache's synchronous store of the prefills that finished in this step."""
    if not w.offloads:
        return 0.0
    return 1e-6 * (store_us_per_request * w.offloads + store_us_per_token * w.offload_tokens)


def load_time(cpu_us_per_token: float, remote_us_per_token: float, w: StepWork) -> float:
    """Seconds of LMCache's synchronous loads in this step (remote: every token asked for)."""
    return 1e-6 * (cpu_us_per_token * w.cpu_load_tokens + remote_us_per_token * w.remote_load_tokens)


def gpu_share(cfg: SimConfig, share: float | None) -> float:
    """The GPU share of a step: ``share`` when it varies with the busy engines (``shared_gpu``),
    else the configured fixed ``cfg.gpu_share``."""
    return cfg.gpu_share if share is None else share


def engine_step_time(cfg: SimConfig, w: StepWork, share: float | None = None) -> float:
    """Simulated seconds of one step of an engine configured by ``cfg`` (see the module docstring);
    ``share``: the GPU share of this step when it varies (``shared_gpu``), else ``cfg.gpu_share``."""
    w = scale_work(w, cfg.token_cost_scale)
    t = step_time(cfg.latency, w)
    if t == 0.0:
        return 0.0
    lm = cfg.lmcache
    return (
        t / gpu_share(cfg, share)
        + offload_time(lm.store_us_per_request, lm.store_us_per_token, w)
        + load_time(lm.cpu_load_us_per_token, lm.remote_load_us_per_token, w)
    )


def engine_frontend_delay(cfg: SimConfig, prompt_tokens: int) -> float:
    """:func:`frontend_delay` of a prompt of ``prompt_tokens`` simulated tokens (the API server's CPU
    work: not slowed by a shared GPU)."""
    return frontend_delay(cfg.latency, round(prompt_tokens * cfg.token_cost_scale))


def retrieve_time(
    cfg: SimConfig, cpu_tokens: int, remote_load_tokens: int, share: float | None = None
) -> float:
    """Simulated seconds of LMCache's load of one request (``lmcache:time_to_retrieve``): the load
    terms :func:`engine_step_time` charges for these tokens, alone in their step."""
    w = scale_work(
        StepWork(cpu_load_tokens=cpu_tokens, remote_load_tokens=remote_load_tokens), cfg.token_cost_scale
    )
    lm = cfg.lmcache
    return _load_terms(cfg.latency, w) / gpu_share(cfg, share) + load_time(
        lm.cpu_load_us_per_token, lm.remote_load_us_per_token, w
    )


def store_time(cfg: SimConfig, stored_tokens: int, share: float | None = None) -> float:
    """Simulated seconds of LMCache's store of one run of freshly computed chunks
    (``lmcache:time_to_store``): the store terms :func:`engine_step_time` charges, with the run taken
    as one synchronous offload of its tokens."""
    w = StepWork(store_tokens=stored_tokens, offloads=1, offload_tokens=stored_tokens)
    w = scale_work(w, cfg.token_cost_scale)
    lm = cfg.lmcache
    return _store_terms(cfg.latency, w) / gpu_share(cfg, share) + offload_time(
        lm.store_us_per_request, lm.store_us_per_token, w
    )

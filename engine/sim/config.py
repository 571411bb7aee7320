"""Configuration of one simulated vLLM 0.24 pod (``kvstack engine sim``).

Every field mirrors a vLLM / LMCache knob where one exists. The latency defaults are fitted to
``tests/reference/h200-measurements.json`` (see :mod:`kvstack.engine.sim.latency`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvstack.engine.sim.lora import LoRAConfig

# An 8B Llama-3-shaped model: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes per token.
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2

# vLLM 0.24 on the reference H200 reported num_gpu_blocks=34604 at gpu-memory-utilization 0.6,
# i.e. 69,208 MiB of KV out of 86,263 MiB (0.6 x 143,771 MiB): 17,055 MiB went to weights and
# activations. At the default utilization 0.9 the same arithmetic leaves 112,339 MiB of KV, which
# is 56,169 blocks of 16 tokens x 128 KiB.
DEFAULT_NUM_GPU_BLOCKS = 56169

_MAX_SEED = 2**32 - 1


def python_hash_seed(environ: dict[str, str] | None = None) -> int | None:
    """``PYTHONHASHSEED`` as an int, or None when unset or ``random`` (as CPython reads it)."""
    raw = (os.environ if environ is None else environ).get("PYTHONHASHSEED", "").strip()
    if raw in ("", "random"):
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 0 <= value <= _MAX_SEED else None


def _default_hash_seed() -> int:
    # Unset PYTHONHASHSEED means a random seed per process, exactly what makes LMCache sharing
    # across real pods fail; the simulator reproduces that on purpose.
    seed = python_hash_seed()
    return secrets.randbelow(_MAX_SEED + 1) if seed is None else seed


# What the simulated model does, as vLLM's supported tasks: each brings its routes (engine/sim/task_routes.py)
Task = Literal["generate", "transcription", "embed", "classify", "score"]

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class LatencyParams(BaseModel):
    """Constants of the step-time model (seconds); defaults are the H200 fit, see ``latency.py``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_overhead_s: NonNegFloat = Field(
        0.003099, description="Fixed cost of every engine step (scheduling, launch, sampling)."
    )
    weights_read_s: NonNegFloat = Field(
        0.00185, description="Time to stream the weights once: the floor of a memory-bound step."
    )
    per_token_s: NonNegFloat = Field(
        1.765e-5, description="Compute per scheduled token when the step is compute-bound."
    )
    attention_s: NonNegFloat = Field(
        1.296e-9, description="Prefill attention per (new token x context position)."
    )
    per_decode_seq_s: NonNegFloat = Field(1.786e-5, description="Extra cost per decoding sequence.")
    decode_ctx_s: NonNegFloat = Field(
        2.7e-8, description="Decode attention per context token (KV bytes / HBM bandwidth)."
    )
    frontend_s: NonNegFloat = Field(
        0.005361, description="Per-request front-end delay before scheduling (processing, first output)."
    )
    frontend_per_token_s: NonNegFloat = Field(
        8.572e-7, description="Front-end delay per prompt token (tokenizing, hashing the prompt)."
    )
    lmcache_remote_load_s: NonNegFloat = Field(
        0.02332, description="Fixed cost of loading chunks from the shared store (Redis) in a step."
    )
    lmcache_remote_load_per_token_s: NonNegFloat = Field(
        2.417e-7, description="Cost per token loaded from the shared store."
    )
    lmcache_cpu_load_s: NonNegFloat = Field(
        0.01399, description="Fixed cost of loading chunks from the local CPU tier in a step."
    )
    lmcache_cpu_load_per_token_s: NonNegFloat = Field(
        1.450e-7, description="Cost per token loaded from the local CPU tier."
    )
    lmcache_store_s: NonNegFloat = Field(
        0.02821, description="Fixed cost of offloading freshly computed prompt KV in a step."
    )
    lmcache_store_per_token_s: NonNegFloat = Field(
        2.882e-6, description="Offload cost per freshly computed prompt token."
    )
    # LoRA: the swap was measured on the H200 (bench-results/lora/h200/); the disk load is assumed
    lora_swap_s: NonNegFloat = Field(
        0.0127,
        description="Copying one adapter from CPU into a GPU slot when a step needs it and it is not "
        "resident (measured by scripts/gpu/lora_proof.py on real vLLM 0.24, H200, rank-8 q/v adapters "
        "of the 8B shape: TTFT p50 28.4 ms cycling three adapters over two slots vs 15.7 ms for one).",
    )
    lora_disk_load_s: NonNegFloat = Field(
        0.03,
        description="Reading an adapter the CPU cache (max_cpu_loras) had dropped back from disk before "
        "the swap (assumed: a rank-8 q/v adapter is ~7 MB of safetensors plus PEFT checks).",
    )


class LMCacheConfig(BaseModel):
    """The LMCache connector (LMCacheConnectorV1): a local CPU tier and a shared Redis tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Attach the simulated LMCache connector.")
    chunk_size: int = Field(256, gt=0, description="Tokens per LMCache chunk (LMCACHE_CHUNK_SIZE).")
    local_cpu_gb: NonNegFloat = Field(
        5.0, description="Local CPU tier size in GB (LMCACHE_MAX_LOCAL_CPU_SIZE); 0 disables it."
    )
    remote_url: str | None = Field(
        None, description="Shared store, ``redis://host:port[/db]`` (LMCACHE_REMOTE_URL); None: none."
    )
    key_prefix: str = Field("kvstack:lmcache:", description="Prefix of every chunk key in Redis.")
    remote_ttl_s: int = Field(
        3600, gt=0, description="Expiry of chunk markers in Redis (Redis maxmemory LRU also evicts)."
    )
    remote_timeout_s: PositiveFloat = Field(
        0.25, description="Give up on a Redis lookup after this long (wall-clock) and recompute."
    )
    remote_retry_s: PositiveFloat = Field(
        2.0, description="After a Redis failure, wait this long (wall-clock) before trying again."
    )

    store_us_per_token: NonNegFloat = Field(
        0.0,
        description="Synchronous offload per prompt token a request computed, charged to the step that "
        "finishes its prefill (LMCache 0.5.3's 'Stored N tokens ... offload_time'); applies whether or "
        "not the simulated tiers are enabled; 0: none (4.49 fits the H200 run's logs, see latency.py).",
    )
    store_us_per_request: NonNegFloat = Field(
        0.0,
        description="Fixed part of that offload, per request (790 fits the H200 run's logs).",
    )

    cpu_load_us_per_token: NonNegFloat = Field(
        0.0,
        description="Synchronous load from the local CPU tier per token, charged to the step that loads "
        "(not divided by gpu_share: measured on the shared GPU); adds to the latency.lmcache_cpu_load_* "
        "terms; 0: none (4.0 fits the H200 run's 'Retrieved N ... cost' lines, see fit.retrieve_fit).",
    )
    remote_load_us_per_token: NonNegFloat = Field(
        0.0,
        description="The same per token asked of the shared store (Redis), whether or not it came back "
        "(330 fits the H200 run: LMCache fetches one 32 MB chunk per Redis round trip).",
    )
    remote_load_failure: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Chance that a remote chunk a lookup found cannot be read back (Redis evicted the "
        "value and kept the key: LMCache's 'Key exists but KV cache does not exist'). The engine pays "
        "the whole load, then recomputes from the first failed chunk (kv_load_failure_policy: "
        "recompute). Drawn per chunk from its hash: the same chunks fail on every engine, every time "
        "(LMCache skips storing a chunk whose key exists). 0.061 per 256-token chunk fits the H200 "
        "run (fit.retrieve_fit).",
    )

    kv_events: bool = Field(
        False,
        description="Publish chunks the CPU tier stores as BlockStored(medium='cpu') on the engine's "
        "KV-event stream (LMCACHE_ENABLE_KV_EVENTS; off by default, as in LMCache 0.5.3).",
    )
    kv_events_removed: bool = Field(
        False,
        description="Also publish BlockRemoved(medium='cpu') when the CPU tier evicts a chunk; "
        "LMCache 0.5.3 never does (its events cover stores only).",
    )

    @model_validator(mode="after")
    def _removed_needs_events(self) -> Self:
        if self.kv_events_removed and not self.kv_events:
            raise ValueError("kv_events_removed needs kv_events")
        return self

    @field_validator("remote_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value


class SharedGpu(BaseModel):
    """Engines time-slicing one simulated GPU (:mod:`kvstack.engine.sim.gpu_peers`): each step's
    share follows how many of them are busy, instead of the fixed ``gpu_share``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peers_dir: Path | None = Field(
        None,
        description="A folder every engine on the simulated GPU shares: each keeps a marker there while "
        "it steps (--gpu-peers-dir). None: gpu_share, fixed.",
    )
    share_by_busy: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list,
        description="The share of a step with 1, 2, ... engines busy (this one included); past the "
        "list, its last entry. Used with peers_dir.",
    )

    @model_validator(mode="after")
    def _table_with_folder(self) -> Self:
        if self.peers_dir is not None and not self.share_by_busy:
            raise ValueError("shared_gpu.peers_dir needs shared_gpu.share_by_busy (the share per busy count)")
        return self


class SimConfig(BaseModel):
    """One simulated vLLM 0.24 V1 pod."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("kvstack/sim-8b", min_length=1, description="Model name (--model).")
    served_model_names: list[str] = Field(
        default_factory=list, description="Names the pod answers to (--served-model-name); empty: model."
    )
    tasks: list[Task] = Field(
        default_factory=lambda: list[Task](["generate"]),
        min_length=1,
        description="What the model does (vLLM's supported tasks; --runner/--convert there): generate "
        "(completions, chat, responses), transcription (audio), embed (embeddings, pooling), classify "
        "(classify, pooling), score (score, rerank). Routes of other tasks answer 404, as in vLLM.",
    )
    max_model_len: int = Field(32768, gt=0, description="Prompt + output token limit (--max-model-len).")
    block_size: int = Field(16, gt=0, description="Tokens per KV block (--block-size).")
    num_gpu_blocks: int = Field(
        DEFAULT_NUM_GPU_BLOCKS,
        gt=0,
        description="KV blocks on the GPU; the default is an 8B model on an H200 at utilization 0.9.",
    )
    max_num_seqs: int = Field(256, gt=0, description="Most requests running at once (--max-num-seqs).")
    max_num_batched_tokens: int = Field(
        8192, gt=0, description="Token budget of one step; longer prompts are prefilled in chunks."
    )
    # Not scaled by token_cost_scale here, like max_num_batched_tokens: both are step budgets in
    # simulated tokens, so a config for a scaled tokenizer divides both by it (sim-h200-*.yaml).
    long_prefill_token_threshold: int = Field(
        0,
        ge=0,
        description="Most tokens one request computes in a step (--long-prefill-token-threshold): a long "
        "prefill advances this much per step, leaving the rest of the budget to others. 0: off, as vLLM; "
        "at or above max_num_batched_tokens it has no effect (vLLM accepts it).",
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV of identical full blocks.")
    speed: PositiveFloat = Field(1.0, description="Simulated seconds per wall-clock second; 1.0 = real time.")
    mean_output_tokens: PositiveFloat | None = Field(
        None,
        description="Mean output length when ignore_eos is false (EOS sampled); None: run to max_tokens.",
    )
    latency: LatencyParams = Field(default_factory=LatencyParams, description="Step-time model.")
    gpu_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of one GPU's step throughput this engine gets: every step lasts "
        "step_time / gpu_share. 1: a whole GPU (the reference calibration); engines time-slicing one GPU "
        "get less (0.26 fits two busy engines on the H200 run, see latency.py).",
    )
    shared_gpu: SharedGpu = Field(
        default_factory=SharedGpu, description="The share when engines time-slice one GPU."
    )
    token_cost_scale: float = Field(
        1.0,
        gt=0,
        description="Model tokens per simulated token in the cost model: prompt and context work is "
        "charged this many times over (the H200 run's BPE tokenizer made 2.05-2.16x the built-in "
        "tokenizer's tokens). Capacity and budgets stay in simulated tokens: divide num_gpu_blocks, "
        "max_num_batched_tokens and long_prefill_token_threshold by it to keep the real ones.",
    )
    lmcache: LMCacheConfig = Field(default_factory=LMCacheConfig, description="LMCache connector.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapters (--enable-lora ...).")
    hash_seed: int = Field(
        default_factory=_default_hash_seed,
        ge=0,
        le=_MAX_SEED,
        description="LMCache chunk-hash seed: PYTHONHASHSEED when set, else random per process.",
    )
    block_hash_seed: int = Field(
        default_factory=_default_hash_seed,
        ge=0,
        le=_MAX_SEED,
        description="Seed of vLLM's own block-hash chain (NONE_HASH): PYTHONHASHSEED, else random.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.lmcache.chunk_size % self.block_size:
            raise ValueError("lmcache.chunk_size must be a multiple of block_size")
        capacity = self.num_gpu_blocks * self.block_size
        if self.max_model_len > capacity:
            # vLLM refuses to start when one max-length request cannot fit in the KV cache.
            raise ValueError(
                f"max_model_len ({self.max_model_len}) needs more KV cache than num_gpu_blocks holds "
                f"({capacity} tokens); decrease max_model_len or increase num_gpu_blocks"
            )
        return self

    @property
    def served_names(self) -> list[str]:
        """The names the pod answers to."""
        return list(self.served_model_names) or [self.model]

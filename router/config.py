"""The router's typed configuration: defaults < ``--config FILE`` < ``KVSTACK_ROUTER_*`` env < CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    SettingsConfigDict,
)

from kvstack.common.config import build_layered, read_config_file, split_comma_list
from kvstack.common.otlp import sdk_missing, traces_url
from kvstack.router.adapters import DeclaredAdapter, check_declared
from kvstack.router.discovery.kubernetes import KubernetesConfig
from kvstack.router.flow.config import FlowControlConfig
from kvstack.router.monitor import MonitorConfig
from kvstack.router.policies.cache_aware import CacheAwareConfig
from kvstack.router.policies.prefix_trie import PrefixTrieSettings
from kvstack.router.sticky import StickyResponsesConfig

PositiveSeconds = Annotated[float, Field(gt=0)]
# where prompt tokens come from (RouterSettings.tokenizer)
TokenizerKind = Literal["builtin", "engine", "local"]


# ---- tracing (router/tracing.py, docs/tracing.md)
class TracingConfig(BaseModel):
    """OTLP tracing of proxied requests: off by default, and then nothing of it runs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # an OTLP/HTTP receiver: a collector's base URL gets /v1/traces appended, a URL with a path is kept
    endpoint: str = "http://localhost:4318"
    service_name: str = Field("kvstack-router", min_length=1)
    # the share of the traces the router starts that are recorded; a client's traceparent decides
    # for its own traces (its sampled flag), as in every OpenTelemetry SDK
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every export (a vendor's API key)

    @field_validator("endpoint")
    @classmethod
    def _otlp_url(cls, endpoint: str) -> str:
        traces_url(endpoint)  # raises ValueError naming what is wrong
        return endpoint

    @field_validator("enabled")
    @classmethod
    def _sdk_installed(cls, enabled: bool) -> bool:
        if enabled and (missing := sdk_missing()) is not None:
            raise ValueError(missing)
        return enabled


# ---- end tracing


class RouterSettings(BaseSettings):
    """Everything the router reads at start. A bad value fails at start, naming the field."""

    model_config = SettingsConfigDict(
        env_prefix="KVSTACK_ROUTER_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # router processes serving `port` together (SO_REUSEPORT) under a supervisor (router/workers.py);
    # 0 or "auto": one per core this process may use (CPU affinity, cut to the cgroup quota)
    workers: int = Field(1, ge=0, le=512)

    # engines (static discovery): base URLs, and the models they serve when known up front
    engines: Annotated[list[str], NoDecode] = Field(default_factory=list)
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    engines_file: Path | None = None  # YAML/JSON list of engines, re-read when it changes
    discovery: Literal["static", "kubernetes"] = "static"
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    # active /health probes, /metrics scrapes and model discovery (KVSTACK_ROUTER_MONITOR__PROBE_INTERVAL=1)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    # routing
    policy: str = "least_loaded"
    # where prompt tokens come from: kvstack's tokenizer (simulators), the engine's /tokenize, or
    # local: the model's own tokenizer.json and chat template read from tokenizer_path (real vLLM's
    # ids without a round trip; router/local_tokenizer.py), the engine's /tokenize as the fallback
    tokenizer: TokenizerKind = "builtin"
    # tokenizer: local: a model folder, folders per model name, or an HF Hub cache (models--org--name)
    tokenizer_path: Path | None = None
    session_header: str = "x-session-id"
    # built-in tokenizer: prompts this long (characters; ~5K tokens) are tokenized in a worker
    # process, so the event loop keeps relaying streams meanwhile (router/offload.py); 0: never
    tokenize_offload_min_chars: int = Field(16_000, ge=0)
    # built-in tokenizer: a chat whose messages from the first unrendered one on are at most this
    # long (characters) is routed on the messages before them, and the new ones are tokenized after
    # the request is sent (router/prompts.py, known_prefix); 0: always tokenize before routing
    tokenize_defer_max_chars: int = Field(2048, ge=0)
    # memory budgets in bytes (router/README.md, "Memory over time"): whole prompts' tokens (and
    # twice this for rendered chat messages), and, apart, an engine's /tokenize answers
    token_cache_bytes: int = Field(10 * 2**20, ge=64 * 1024)
    engine_token_cache_bytes: int = Field(16 * 2**20, ge=64 * 1024)
    # per-policy settings (KVSTACK_ROUTER_CACHE_AWARE__DECISION__LOAD_FACTOR=1.5); read by that policy only
    cache_aware: CacheAwareConfig = CacheAwareConfig()
    prefix_trie: PrefixTrieSettings = PrefixTrieSettings()

    # upstream client, one shared pool: "aiohttp", or plain "httpx" as the reference (router/upstream.py)
    upstream_backend: Literal["aiohttp", "httpx"] = "aiohttp"
    # a streamed answer, once its first token is sent, goes from the engine to the client through
    # the compiled relay (router/native) where it is built: no Python per event. The stream's
    # [DONE] is held back and written with its end, so a client that closes on [DONE] cannot close
    # before the answer is whole (router/README.md). false: every event through Python (upstream.py)
    native_relay: bool = True
    max_connections: int = Field(2048, ge=1)
    # below vLLM's uvicorn keep-alive (5 s) so the pool never reuses a socket the engine closed
    keepalive_expiry_s: PositiveSeconds = 4.0
    connect_timeout_s: PositiveSeconds = 3.0
    # until the response headers arrive (a non-streaming response's headers come with its body)
    first_byte_timeout_s: PositiveSeconds = 600.0
    # between two chunks of a response body; covers queueing before the first token of a stream
    idle_timeout_s: PositiveSeconds = 300.0
    max_attempts: int = Field(3, ge=1, le=10)
    # /ready waits, at most this long after start, for the available engines' KV-event history to be
    # replayed into the index (router/readiness.py); 0: ready as soon as an engine is available
    ready_sync_timeout_s: float = Field(30.0, ge=0.0)

    # the cyclic GC's young-generation pass runs once this many tracked objects survived (Python's
    # default: 700, a stall every dozen requests on a busy router; higher: more garbage held, up to
    # this many objects and all they reference; router/gc_tuning.py); 0 keeps Python's defaults
    gc_gen0_threshold: int = Field(7_000, ge=0)

    # outlier detection (router/ejection.py): this many consecutive failed requests, or a failure
    # rate of eject_failure_rate over at least eject_min_requests in a window of eject_interval_s,
    # take an engine out for eject_duration_s x its ejections in a row (at most eject_max_duration_s);
    # never more than max_ejected_percent of the engines (but always one)
    eject_after_failures: int = Field(3, ge=1)
    eject_duration_s: PositiveSeconds = 30.0
    eject_max_duration_s: PositiveSeconds = 300.0
    eject_failure_rate: float = Field(0.5, gt=0.0, le=1.0)
    eject_min_requests: int = Field(10, ge=1)
    eject_interval_s: PositiveSeconds = 10.0
    max_ejected_percent: float = Field(50.0, ge=0.0, le=100.0)

    # protection
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    engine_api_key: SecretStr | None = None
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # a client must deliver its whole request body within this; a stalled upload would otherwise
    # hold its task, socket and per-key concurrency slot forever (answered 408)
    body_timeout_s: PositiveSeconds = 30.0
    # the client-facing edge (router/server.py enforces these on the socket, before any request work)
    # request line + header block, in bytes; beyond it: 431 and the connection is closed
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    # header fields in one request; beyond it: 431
    max_header_count: int = Field(100, ge=8, le=10_000)
    # from a request's first byte to its last header byte; a client slower than this gets a 408
    header_timeout_s: PositiveSeconds = 15.0
    # a connection with no request in progress (new, or between keep-alive requests) is closed after
    client_idle_timeout_s: PositiveSeconds = 75.0
    # open client connections (every port); beyond it a new one gets a 503 + Retry-After and is closed
    max_client_connections: int = Field(4096, ge=1)
    # request bodies all in-flight requests may hold in memory together (each one is kept until its
    # response ends, for retries); beyond it: 503 + Retry-After. Bounds the router's memory
    max_buffered_body_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    # an engine's non-streamed response, and one SSE event of a stream; beyond it: 502
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=64 * 1024)
    # serve /metrics on this port only (not the API port an Ingress exposes); None: on the API port,
    # behind the API keys when they are on
    metrics_port: int | None = Field(None, ge=1, le=65535)
    rate_limit_rps: float | None = Field(None, gt=0)
    rate_limit_burst: int | None = Field(None, ge=1)
    max_concurrency_per_key: int | None = Field(None, ge=1)
    # admission (router/flow/): an optional hard ceiling of requests per engine in flight, on top of
    # flow control's measured saturation; a request waits in its model's flow queue at most this long
    max_in_flight_per_engine: int | None = Field(None, ge=1)
    queue_timeout_s: PositiveSeconds = 30.0
    # flow control: priority classes, per-model ordering and queue bounds, tenant shares (router/flow/)
    flow_control: FlowControlConfig = Field(default_factory=FlowControlConfig)
    # scale from zero: requests for these models wait while no engine serves them ("*": any model
    # an engine has served), shown as kvstack_router_queued_requests, which wakes the autoscaler
    hold_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hold_timeout_s: PositiveSeconds = 600.0  # at least a cold start: pod scheduled, model loaded
    max_held_per_model: int = Field(1024, ge=0)  # beyond it: 429

    # LoRA (router/adapters.py): declared adapters [{name, model, source}]; a request for one that no
    # engine holds is held while the router loads it on the least-loaded engine of its model
    adapters: list[DeclaredAdapter] = Field(default_factory=list)
    load_adapters: bool = True  # False: only the operator loads them; held requests wait for it

    # stored responses (router/sticky.py): response id -> engine, so GET/cancel of /v1/responses/{id}
    # and previous_response_id reach the engine that stored it (bounded: LRU by count, with a TTL)
    sticky_responses: StickyResponsesConfig = Field(default_factory=StickyResponsesConfig)

    # operations
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # answer with `x-kvstack-engine: <engine name>` (benchmarks and debugging; reveals topology)
    expose_engine_header: bool = False
    # OTLP spans of each proxied request (KVSTACK_ROUTER_TRACING__ENDPOINT=http://collector:4318)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    _split = field_validator("engines", "models", "api_keys", "hold_models", mode="before")(split_comma_list)

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return 0
        return value

    @field_validator("engines")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL must start with http:// or https:// (got {url!r})")
        return [url.rstrip("/") for url in urls]

    @field_validator("session_header")
    @classmethod
    def _lower(cls, name: str) -> str:
        return name.lower()

    @field_validator("api_keys_file", "engines_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path

    @model_validator(mode="after")
    def _ejection_cap_covers_its_base(self) -> RouterSettings:
        if self.eject_max_duration_s < self.eject_duration_s:
            raise ValueError("eject_max_duration_s must be at least eject_duration_s")
        return self

    @model_validator(mode="after")
    def _local_tokenizer_files(self) -> RouterSettings:
        if self.tokenizer != "local":
            return self
        if self.tokenizer_path is None or not self.tokenizer_path.is_dir():
            raise ValueError(
                f"tokenizer_path must be a folder of model files for tokenizer: local "
                f"(got {self.tokenizer_path})"
            )
        from kvstack.router.local_tokenizer import LocalTokenizerError, find_model_dir

        for model in self.models:  # models known up front must have their files now, not at a request
            try:
                find_model_dir(self.tokenizer_path, model)
            except LocalTokenizerError as err:
                raise ValueError(f"tokenizer_path: {err}") from None
        return self

    @model_validator(mode="after")
    def _adapters_are_distinct(self) -> RouterSettings:
        check_declared(self.adapters)
        return self

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> RouterSettings:
        if self.rate_limit_burst is not None and self.rate_limit_rps is None:
            raise ValueError("rate_limit_burst needs rate_limit_rps")
        return self

    @model_validator(mode="after")
    def _edge_limits_agree(self) -> RouterSettings:
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_body_bytes ({self.max_buffered_body_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}), or no request of the largest size is ever admitted"
            )
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port ({self.port})")
        return self


def load_settings(config_file: Path | None = None, **overrides: Any) -> RouterSettings:
    """Settings from defaults, an optional YAML/JSON file, the environment and ``overrides`` (flags)."""
    file_values = read_config_file(config_file) if config_file is not None else {}
    return build_layered(RouterSettings, "router configuration", file_values=file_values, flags=overrides)

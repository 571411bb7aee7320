"""The operator process's own settings: ``KVSTACK_OPERATOR_*`` variables, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kvstack.common.config import build_layered, split_comma_list


class OperatorSettings(BaseSettings):
    """Where the operator watches, which Prometheus it asks by default, and where it serves."""

    model_config = SettingsConfigDict(env_prefix="KVSTACK_OPERATOR_", extra="forbid", frozen=True)

    # One namespace (the Helm chart sets KVSTACK_OPERATOR_NAMESPACE), several, or every namespace.
    namespace: str | None = None
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    all_namespaces: bool = False
    # Used when a KVStack's spec.autoscaling.prometheusUrl is unset.
    prometheus_url: str = Field("http://127.0.0.1:9090", pattern=r"^https?://")
    prometheus_timeout_s: float = Field(5.0, gt=0)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9102, ge=0, le=65535, description="0: no /metrics server")
    liveness_host: str = "0.0.0.0"
    liveness_port: int = Field(8080, ge=0, le=65535, description="0: no /healthz endpoint")
    # Re-apply every owned object this often (corrects drift: a hand-edited Deployment).
    resync_seconds: float = Field(60.0, gt=0)
    # How often the per-stack timer wakes; autoscaling evaluations follow spec.autoscaling.intervalSeconds.
    tick_seconds: float = Field(1.0, gt=0, le=60)
    kubeconfig: Path | None = None
    context: str | None = None
    # The Helm chart passes the release name; the operator serves KVStack resources of any release.
    release: str | None = None

    _split = field_validator("namespaces", mode="before")(split_comma_list)

    def watched_namespaces(self) -> list[str]:
        """Namespaces to watch; empty means every namespace."""
        if self.all_namespaces:
            return []
        found = [*self.namespaces, *([self.namespace] if self.namespace else [])]
        return sorted(set(found))


def load_settings(**overrides: Any) -> OperatorSettings:
    """Environment, then the non-None ``overrides`` (CLI flags); raises ConfigError naming a field."""
    return build_layered(OperatorSettings, "operator settings", file_values={}, flags=overrides)

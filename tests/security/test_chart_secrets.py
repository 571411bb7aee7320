"""Secrets in Helm values: a key put where the chart would write it in plain text is refused.

The chart takes credentials only from Secrets (generated or existing; tests/helm/test_render.py
checks both). ``router.extraConfig`` is merged into the router's ConfigMap as is, so the router
settings that hold secrets must not be accepted there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.helm.conftest import HelmChart, chart, helm_bin

__all__ = ["chart", "helm_bin"]

SECRET = "sk-plain-values-secret-5f4e3d2c1b"


@pytest.mark.parametrize("field", ["api_keys", "engine_api_key"])
def test_a_secret_in_extra_config_is_refused_or_kept_in_a_secret(
    chart: HelmChart, tmp_path: Path, field: str
) -> None:
    """Either helm refuses the values naming the field, or the value appears only inside Secrets."""
    values = tmp_path / "values.yaml"
    value: object = [SECRET] if field == "api_keys" else SECRET
    values.write_text(yaml.safe_dump({"router": {"extraConfig": {field: value}}}))
    proc = chart.run(*chart.template_args([values]))
    if proc.returncode != 0:
        assert field in proc.stderr and SECRET not in proc.stderr
        return
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] != "Secret"]
    assert SECRET not in yaml.safe_dump_all(docs)

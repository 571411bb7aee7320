"""The local Prometheus config: jobs and labels as on Kubernetes, accepted by promtool."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvstack.observability.prometheus import (
    Target,
    packaged_rules_file,
    prometheus_process,
    render_config,
)

from .conftest import run_promtool

TARGETS = [
    Target("kvstack-engine", "http://127.0.0.1:8001", "engine-0"),
    Target("kvstack-engine", "http://127.0.0.1:8002", "engine-1"),
    Target("kvstack-router", "http://127.0.0.1:8000", "router"),
    Target("kvstack-operator", "http://localhost:9100/", "operator", {"component": "operator"}),
]


def test_render_groups_targets_by_job_with_pod_and_namespace() -> None:
    cfg = render_config(TARGETS, [Path("/r.yaml")], scrape_interval="1s")
    assert cfg["global"] == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    assert cfg["rule_files"] == ["/r.yaml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert list(jobs) == ["kvstack-engine", "kvstack-operator", "kvstack-router"]
    assert jobs["kvstack-engine"]["static_configs"] == [
        {
            "targets": ["127.0.0.1:8001"],
            "labels": {"pod": "engine-0", "namespace": "local", "kvstack_component": "engine"},
        },
        {
            "targets": ["127.0.0.1:8002"],
            "labels": {"pod": "engine-1", "namespace": "local", "kvstack_component": "engine"},
        },
    ]
    assert jobs["kvstack-operator"]["static_configs"][0] == {
        "targets": ["localhost:9100"],
        "labels": {
            "pod": "operator",
            "namespace": "local",
            "kvstack_component": "operator",
            "component": "operator",
        },
    }
    # The operator's series carry the model's namespace: honour it (CONTRACT.md).
    assert jobs["kvstack-operator"]["honor_labels"] is True
    assert "honor_labels" not in jobs["kvstack-engine"]


@pytest.mark.parametrize("url", ["http://127.0.0.1", "not a url", "http://:80"])
def test_targets_need_host_and_port(url: str) -> None:
    with pytest.raises(ValueError, match="host and a port"):
        _ = Target("kvstack-engine", url, "p").address


def test_promtool_accepts_the_config_with_the_packaged_rules(promtool: str, tmp_path: Path) -> None:
    proc = prometheus_process(tmp_path, TARGETS, port=9999)
    config = tmp_path / "prometheus.yml"
    assert yaml.safe_load(config.read_text())["rule_files"] == [str(packaged_rules_file())]
    assert packaged_rules_file().is_file()
    result = run_promtool(promtool, "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--web.listen-address=127.0.0.1:9999" in proc.argv
    assert proc.ready_url == "http://127.0.0.1:9999/-/ready"

"""pytest fixtures for a session-wide test cluster: ``cluster``, ``namespace``, ``cluster_tools``;
and a real OpenTelemetry Collector per test module: ``otel_collector``.

Enable with ``pytest_plugins = ["kvstack_testing.pytest_plugin"]`` in the root ``conftest.py``.
Missing binaries are built right after collection (outside any test's timeout), and only when a
selected test is marked ``cluster`` (the control plane) or uses ``otel_collector`` (the collector).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstack_testing.cluster import Cluster
from kvstack_testing.otelcol import OtelCollector, collector_process
from kvstack_testing.tools import Toolchain, ensure_cluster_tools, ensure_otelcol

# Export headers the collector fixture copies onto spans: those an OTLP endpoint's auth reads.
RECORDED_HEADERS = ("authorization", "x-api-key")


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def echo(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)

    if any(i.get_closest_marker("cluster") for i in session.items):
        ensure_cluster_tools(echo=echo)
    if any("otel_collector" in getattr(i, "fixturenames", ()) for i in session.items):
        ensure_otelcol(echo=echo)


@pytest.fixture(scope="session")
def cluster_tools() -> Toolchain:
    """Paths of kubectl, helm, kubeconform, ... (built if missing)."""
    return ensure_cluster_tools()


@pytest.fixture(scope="session")
def cluster(cluster_tools: Toolchain) -> Iterator[Cluster]:
    """A running cluster: 2 fake GPU nodes x 8 nvidia.com/gpu, pod IPs in ``cluster.pod_cidr`` (127.X/16)."""
    with Cluster(tools=cluster_tools) as running:
        yield running


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) after the test."""
    with cluster.temporary_namespace("t-") as name:
        yield name


@pytest.fixture(scope="module")
def otel_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtelCollector]:
    """A real OpenTelemetry Collector (OTLP/HTTP ``.url``, gRPC ``.grpc_endpoint``) for the module;
    ``.spans()`` is what it exported. It records RECORDED_HEADERS of each export as span attributes."""
    ensure_otelcol()
    with collector_process(tmp_path_factory.mktemp("otelcol"), RECORDED_HEADERS) as running:
        yield running

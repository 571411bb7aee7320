"""Metrics: clients cannot grow them, and cannot read them through the API port.

3,000 requests with random 1 KB model names used to grow ``/metrics`` from 16.5 KB to 6.6 MB (6,000
series, never dropped), and ``/metrics`` answered without a key even with keys on. Now a model name
is a label only when configured or served by an engine (else ``model_name="other"``), and
``/metrics`` is on ``metrics_port`` (nothing else there) or behind the API keys.
"""

from __future__ import annotations

import random
import string

import httpx
from tests.conftest import free_port
from tests.router.conftest import MODEL, Sim
from tests.security.conftest import EdgeFactory, assert_openai_error

from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.exchange import Exchange, account
from kvstack.router.metrics import OTHER_MODEL, RouterMetrics


def _model_labels(text: str) -> set[str]:
    labels = set()
    for line in text.splitlines():
        if line.startswith("kvstack_router_") and 'model_name="' in line:
            labels.add(line.split('model_name="', 1)[1].split('"', 1)[0])
    return labels


def test_random_model_names_do_not_grow_the_metrics(sims: list[Sim], edge: EdgeFactory) -> None:
    """300 requests naming random 1 KB models: each is a 404 counted under "other", and /metrics
    stays the size it was, while the real model keeps its own label."""
    r = edge(engines=[sims[0].url])
    assert (
        httpx.post(
            f"{r.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}
        ).status_code
        == 200
    )
    before = httpx.get(f"{r.url}/metrics").text
    rng = random.Random(7)
    with httpx.Client(base_url=r.url, timeout=30) as client:
        for _ in range(300):
            name = "".join(rng.choices(string.ascii_letters, k=1024))
            assert_openai_error(client.post("/v1/completions", json={"model": name, "prompt": "x"}), 404)
    after = httpx.get(f"{r.url}/metrics").text
    assert _model_labels(after) <= {MODEL, OTHER_MODEL, ""}
    assert len(after) < len(before) + 4096
    assert r.metric("kvstack_router_requests_total", model_name=OTHER_MODEL, engine="", status="404") == 300


def test_metrics_port_serves_metrics_only_and_the_api_port_none(sims: list[Sim], edge: EdgeFactory) -> None:
    port = free_port()
    r = edge(engines=[sims[0].url], metrics_port=port, api_keys=["sk-m"])
    assert_openai_error(httpx.get(f"{r.url}/metrics", headers={"authorization": "Bearer sk-m"}), 404)
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics")  # the scraper needs no key
    assert scraped.status_code == 200 and "kvstack_router_requests_total" in scraped.text
    for path in ("/v1/models", "/health"):
        assert_openai_error(httpx.get(f"http://127.0.0.1:{port}{path}"), 404)
    assert_openai_error(httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={}), 404)
    assert httpx.get(f"{r.url}/health").status_code == 200


def test_model_label_is_configured_or_served() -> None:
    registry = EngineRegistry()
    metrics = RouterMetrics(registry, lambda: 0.0, ["configured", "*"])
    assert [metrics.model_label(m) for m in ("configured", "served", "*", "")] == [
        "configured",
        OTHER_MODEL,
        OTHER_MODEL,
        "",  # no model read (refused before the body): one bounded value already
    ]
    registry.sync([Endpoint(url="http://e", name="e", models=frozenset({"served"}))])
    assert metrics.model_label("served") == "served"
    registry.sync([])  # a model once served keeps its label (its series exist already)
    assert metrics.model_label("served") == "served"


def test_a_request_whose_handler_failed_is_counted_as_the_500_it_was_answered() -> None:
    """No response is counted with status "0": a handler that raised (answered 500) counts as 500."""
    metrics = RouterMetrics(EngineRegistry(), lambda: 0.0, [MODEL])
    account(metrics, Exchange(request_id="r", start=0.0, model=MODEL), "/v1/completions", log_it=False)
    assert (
        metrics.registry.get_sample_value(
            "kvstack_router_requests_total", {"model_name": MODEL, "engine": "", "status": "500"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "kvstack_router_requests_total", {"model_name": MODEL, "engine": "", "status": "0"}
        )
        is None
    )

"""The fresh cache before each ``kvstack bench gpu`` case (gpu_reset), against two simulators running
the LMCache connector on a real Redis: the GPU prefix cache is emptied, Redis flushed, and LMCache's
CPU tier survives, as with vLLM 0.24 + LMCache 0.5.3."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from tests.conftest import free_port
from tests.redis_server import RedisServer

from kvstack.bench import promtext
from kvstack.bench.flow import before_case
from kvstack.bench.flow_stack import FlowSetup
from kvstack.bench.gpu_procs import sim_procs
from kvstack.bench.gpu_reset import (
    IN_FLIGHT,
    KV_USAGE,
    ResetError,
    clear_lmcache_cpu,
    flush_redis,
    fresh_cache,
    idle,
    in_flight,
    reset_prefix_cache,
)
from kvstack.bench.gpu_summary import ENGINE_COUNTERS
from kvstack.common.procs import running
from kvstack.common.waits import wait_until

MODEL = "kvstack-8b"
DOCUMENT = " ".join(f"clause {i} of the shared contract binds party {i % 7}." for i in range(300))


def ask(url: str, max_tokens: int = 2) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "Summarize."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text


def hits(url: str) -> tuple[float, float]:
    """The engine's (GPU prefix, LMCache external) hit counters."""
    s = promtext.scrape(f"{url}/metrics")
    return (
        promtext.total(s, ENGINE_COUNTERS["prefix_hits"]),
        promtext.total(s, ENGINE_COUNTERS["external_hits"]),
    )


def test_fresh_cache_empties_gpu_and_redis_and_lmcache_cpu_survives(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    procs, entries = sim_procs(2, MODEL, None, tmp_path, None, redis_server.url)
    urls = [e["url"] for e in entries]
    client = redis.Redis.from_url(redis_server.url)
    try:
        with running(procs, timeout=60):
            ask(urls[0])
            wait_until(lambda: client.dbsize() > 0, "sim0's chunks in Redis", 10.0)
            gpu0, _ = hits(urls[0])
            ask(urls[0])
            gpu1, _ = hits(urls[0])
            assert gpu1 > gpu0  # warm: the second ask hits the GPU prefix cache

            fresh_cache(urls, redis_server.url)

            assert client.dbsize() == 0  # the shared tier is empty
            ask(urls[0])
            gpu2, ext2 = hits(urls[0])
            assert gpu2 == gpu1  # the GPU prefix cache was emptied: no GPU hit
            # LMCache's CPU tier kept the prompt (vLLM 0.24's reset_external does not reach
            # LMCache 0.5.3): the reason the matrix rotates the routers per run
            assert ext2 > 0
    finally:
        client.close()


def test_fresh_cache_through_the_lmcache_api_empties_the_cpu_tier_too(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    procs, entries = sim_procs(1, MODEL, None, tmp_path, None, redis_server.url)
    url = entries[0]["url"]
    with running(procs, timeout=60):
        ask(url)  # the prompt now in the GPU cache, the CPU tier and Redis
        gpu0, ext0 = hits(url)
        fresh_cache([url], redis_server.url, lmcache_apis=[url])
        ask(url)
        gpu1, ext1 = hits(url)
        # nowhere to be found: no GPU hit, and LMCache (CPU tier, Redis) found nothing, where
        # without --lmcache-api its CPU tier serves it (the test above)
        assert (gpu1, ext1) == (gpu0, ext0)


def test_lmcache_api_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ResetError, match="LMCACHE_INTERNAL_API_SERVER_ENABLED"):
        clear_lmcache_cpu(f"http://127.0.0.1:{free_port()}")
    procs, entries = sim_procs(1, MODEL, None, tmp_path)  # no LMCache: the route answers 404
    with running(procs, timeout=60), pytest.raises(ResetError, match="404"):
        clear_lmcache_cpu(entries[0]["url"])


def test_reset_waits_for_the_engines_to_be_idle(tmp_path: Path) -> None:
    procs, entries = sim_procs(1, MODEL, None, tmp_path)
    url = entries[0]["url"]
    with running(procs, timeout=60):
        worker = threading.Thread(target=ask, args=(url, 400))
        worker.start()
        try:
            wait_until(lambda: in_flight(url) > 0, "a request in flight", 30.0)
            # the simulator refuses a reset while a request runs, as vLLM's scheduler does
            with pytest.raises(ResetError, match="500"):
                reset_prefix_cache(url)
            assert not idle(url)
            fresh_cache([url], None)  # waits for idle, then resets
            assert idle(url) and in_flight(url) == 0
        finally:
            worker.join(timeout=120)


class _NoDevMode(http.server.BaseHTTPRequestHandler):
    """An HTTP server without the development routes: vLLM's answer when dev mode is off (and an
    idle engine's metrics, so the reset is what fails)."""

    def do_GET(self) -> None:
        body = b"vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\nvllm:kv_cache_usage_perc 0.0\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b'{"detail":"Not Found"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def no_dev_mode() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoDevMode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_engine_without_dev_mode_is_named_with_the_fix(no_dev_mode: str) -> None:
    with pytest.raises(ResetError, match=r"dev_mode: true.*VLLM_SERVER_DEV_MODE=1") as err:
        reset_prefix_cache(no_dev_mode)
    assert no_dev_mode in str(err.value)


def test_a_matrix_stops_before_its_first_case_without_dev_mode(no_dev_mode: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kvstack.cli import app

    engines = tmp_path / "engines.yaml"
    engines.write_text(f"- {{url: {no_dev_mode}, name: e0, models: [m]}}\n")
    args = ["bench", "gpu", "--engines-file", str(engines), "--runs", "2", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--policy", "round_robin", "--duration-s", "2"])
    assert result.exit_code == 1
    assert "cannot start multi_round_qa-round_robin-r1 on a fresh cache" in result.output
    assert "does not serve POST /reset_prefix_cache" in result.output
    assert not (tmp_path / "out" / "h200.json").exists()  # no case ran


def test_a_matrix_refuses_the_lmcache_api_without_a_fresh_cache(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kvstack.cli import app

    engines = tmp_path / "engines.yaml"
    engines.write_text(f"- {{url: http://127.0.0.1:{free_port()}, name: e0, models: [m]}}\n")
    args = ["bench", "gpu", "--engines-file", str(engines), "--keep-cache", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(
        app, [*args, "--lmcache-api", "http://127.0.0.1:7001"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "--lmcache-api" in result.output and "needs --fresh-cache" in result.output


def test_an_unreachable_redis_is_named() -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(ResetError, match="FLUSHALL failed"):
        flush_redis(url)


def test_the_idle_signals_exist_in_vllm_024s_metrics(reference_dir: Path) -> None:
    names = {name for name, _ in promtext.parse((reference_dir / "vllm-0.24-metrics.txt").read_text())}
    assert {*IN_FLIGHT, KV_USAGE} <= names


def test_bench_flow_on_real_engines_starts_every_case_with_a_cold_gpu_cache(tmp_path: Path) -> None:
    """``bench flow`` replays the same traces for every policy: over running engines each case
    resets them first; over its own simulators (no engines file) it leaves them alone."""
    procs, entries = sim_procs(1, MODEL, None, tmp_path)
    url = entries[0]["url"]
    engines_file = tmp_path / "engines.yaml"
    engines_file.write_text(yaml.safe_dump(entries))
    with running(procs, timeout=60):
        ask(url)
        ask(url)
        warm, _ = hits(url)
        assert warm > 0

        before_case(FlowSetup(log_dir=tmp_path), [url])  # simulators of its own: nothing to do
        ask(url)
        kept, _ = hits(url)
        assert kept > warm

        before_case(FlowSetup(engines_file=engines_file, speed=1.0, log_dir=tmp_path), [url])
        ask(url)
        assert hits(url)[0] == kept  # emptied: the same prompt found nothing on the GPU

        before_case(FlowSetup(engines_file=engines_file, fresh_cache=False, log_dir=tmp_path), [url])
        ask(url)
        assert hits(url)[0] > kept  # --keep-cache: the last ask's blocks still there

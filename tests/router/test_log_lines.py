"""The router process's log: JSON lines only, and no per-request line from uvicorn (the router writes
its own access line when ``access_log`` is on; uvicorn's plain one cost ~5% of the CPU per request)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
from tests.conftest import free_port
from tests.reliability.conftest import router_process
from tests.router.conftest import MODEL, run_sims

from kvstack.common.procs import running


def _lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_the_router_logs_json_lines_and_one_access_line_per_request(tmp_path: Path) -> None:
    with run_sims(tmp_path, 1) as (sim,):
        port = free_port()
        env = {"KVSTACK_ROUTER_ACCESS_LOG": "true"}
        proc = router_process(tmp_path, port, [sim.url], "--log-level", "info", env=env)
        with running([proc]):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            for _ in range(3):
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
        lines = _lines(proc.log_path)  # every line parses: no plain-text line from uvicorn
    access = [r for r in lines if r.get("logger") == "kvstack.router.access"]
    assert [r["path"] for r in access] == ["/v1/chat/completions"] * 3
    assert not [r for r in lines if r.get("logger") == "uvicorn.access"]

"""Record what a real vLLM 0.24 server answers on each OpenAI-compatible route (GPU machine).

    python3 routes_probe.py URL MODEL OUT.json

Sends one request per route (the Responses and Messages APIs whole and streamed, rerank, score,
classify, pooling, embeddings, the audio routes with a generated WAV) and writes, per route, the
status, the content type and the body (JSON, or the stream's first and last frames). Routes the
model's tasks do not include show what vLLM answers for them (a plain FastAPI 404 when it does not
mount the route). The simulator's shapes (engine/sim/{responses,messages,pooling,audio}.py) are
compared against this file.
Standard library only, plus httpx (a dependency of vLLM's openai package).
"""

from __future__ import annotations

import io
import json
import sys
import wave
from typing import Any

import httpx


def wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(b"\x00\x00" * int(seconds * 16_000))
    return buf.getvalue()


def record(resp: httpx.Response) -> dict[str, Any]:
    kind = resp.headers.get("content-type", "")
    out: dict[str, Any] = {"status": resp.status_code, "content_type": kind}
    if kind.startswith("text/event-stream"):
        frames = [f for f in resp.text.split("\n\n") if f.strip()]
        out["frames"] = len(frames)
        out["first_frames"] = frames[:5]
        out["last_frames"] = frames[-4:]
    else:
        try:
            out["body"] = resp.json()
        except ValueError:
            out["body_text"] = resp.text[:2000]
    return out


def main(url: str, model: str, path_out: str) -> None:
    chat = [{"role": "user", "content": "hi"}]
    rerank = {
        "model": model,
        "query": "capital of france",
        "documents": ["the cat sat", "paris is the capital"],
    }
    probes: list[tuple[str, str, dict[str, Any]]] = [
        ("responses", "/v1/responses", {"json": {"model": model, "input": "hi", "max_output_tokens": 8}}),
        (
            "responses_stream",
            "/v1/responses",
            {"json": {"model": model, "input": "hi", "max_output_tokens": 8, "stream": True}},
        ),
        (
            "responses_unknown_previous",
            "/v1/responses",
            {"json": {"model": model, "input": "hi", "previous_response_id": "resp_x"}},
        ),
        ("messages", "/v1/messages", {"json": {"model": model, "messages": chat, "max_tokens": 8}}),
        (
            "messages_stream",
            "/v1/messages",
            {"json": {"model": model, "messages": chat, "max_tokens": 8, "stream": True}},
        ),
        ("rerank", "/rerank", {"json": {**rerank, "top_n": 1}}),
        ("v1_rerank", "/v1/rerank", {"json": rerank}),
        ("v2_rerank", "/v2/rerank", {"json": rerank}),
        ("score", "/score", {"json": {"model": model, "text_1": "a", "text_2": ["a", "b"]}}),
        ("v1_score", "/v1/score", {"json": {"model": model, "text_1": "a", "text_2": "b"}}),
        ("classify", "/classify", {"json": {"model": model, "input": ["good", "bad"]}}),
        ("pooling", "/pooling", {"json": {"model": model, "input": "one"}}),
        ("embeddings", "/v1/embeddings", {"json": {"model": model, "input": ["one", "two"]}}),
        (
            "transcription",
            "/v1/audio/transcriptions",
            {"data": {"model": model}, "files": {"file": ("a.wav", wav(2.0), "audio/wav")}},
        ),
        (
            "translation",
            "/v1/audio/translations",
            {"data": {"model": model}, "files": {"file": ("a.wav", wav(2.0), "audio/wav")}},
        ),
        ("transcription_not_multipart", "/v1/audio/transcriptions", {"json": {"model": model}}),
        ("unknown_model_responses", "/v1/responses", {"json": {"model": "nope", "input": "hi"}}),
        ("bad_rerank", "/rerank", {"json": {"model": model, "documents": ["a"]}}),
    ]
    results: dict[str, Any] = {"url": url, "model": model}
    with httpx.Client(base_url=url, timeout=120) as http:
        results["version"] = http.get("/version").json()
        for name, path, kwargs in probes:
            try:
                results[name] = {"path": path, **record(http.post(path, **kwargs))}
            except httpx.HTTPError as err:
                results[name] = {"path": path, "error": f"{type(err).__name__}: {err}"}
            print(name, results[name].get("status"), flush=True)
    with open(path_out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])

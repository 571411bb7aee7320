"""The pooling routes of a simulated vLLM 0.24 pod: embeddings, pooling, classify, score, rerank.

Each input is prefilled by the engine core (a pooling model runs one step per request), concurrently
as vLLM submits them, and the answer is in vLLM's response shapes (``EmbeddingResponse``,
``PoolingResponse``, ``ClassificationResponse``, ``ScoreResponse``, ``RerankResponse``). The numbers
are deterministic functions of the text: a score is mostly the share of the query's words found in
the document (so a reranker ranks the documents that answer the query first), an embedding a unit
vector drawn from the text's digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.errors import OpenAIError
from kvstack.common.tokenizer import encode
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.asgi import Receive, Scope, Send, read_body, send_json
from kvstack.engine.sim.task_routes import Guard, prefill, request_id, usage_info

if TYPE_CHECKING:
    from kvstack.engine.sim.server import SimServer

EMBEDDING_DIM = 64  # small, so answers stay small; real embedding models have 384-4096
LABELS = ("negative", "positive")  # the simulated classifier's id2label
_WORD = re.compile(r"\w+")

Prompt = str | list[int] | list[str] | list[list[int]]


class _PoolingBase(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None


class InputRequest(_PoolingBase):
    """/v1/embeddings, /pooling, /classify: the completion form (``input``) or the chat form."""

    input: Prompt | None = None
    messages: list[p.ChatMessage] | None = None
    dimensions: int | None = Field(default=None, ge=1)


class ScoreRequest(_PoolingBase):
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None


class RerankRequest(_PoolingBase):
    query: str
    documents: str | list[str]
    top_n: int = Field(default=0, ge=0)


def _digest_units(text: str, count: int) -> list[float]:
    """``count`` numbers in [0, 1) drawn from the text's digest."""
    out: list[float] = []
    block = 0
    while len(out) < count:
        raw = hashlib.blake2b(f"{block}:{text}".encode(), digest_size=64).digest()
        out.extend(int.from_bytes(raw[i : i + 4], "little") / 2**32 for i in range(0, 64, 4))
        block += 1
    return out[:count]


def embedding(text: str, dimensions: int = EMBEDDING_DIM) -> list[float]:
    """A unit vector drawn from ``text``."""
    vec = [u - 0.5 for u in _digest_units(text, dimensions)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def relevance(query: str, document: str) -> float:
    """In (0, 1): 0.9 x the share of the query's words found in the document, plus a little noise."""
    words = {w.lower() for w in _WORD.findall(query)}
    found = {w.lower() for w in _WORD.findall(document)}
    share = len(words & found) / len(words) if words else 0.0
    return 0.9 * share + 0.1 * _digest_units(query + "\x00" + document, 1)[0]


def class_probs(text: str) -> list[float]:
    """A softmax over :data:`LABELS` drawn from ``text``."""
    logits = [4 * u - 2 for u in _digest_units(text, len(LABELS))]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def _texts(value: Prompt | None, field: str) -> list[tuple[str, list[int]]]:
    """Each input of a batch: its text (token ids decoded to their ids' text) and its ids."""
    if value is None:
        raise OpenAIError(400, f"'{field}' is required", param=field)
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif value and isinstance(value[0], int):
        items = [value]
    else:
        items = list(value)  # type: ignore[arg-type]
    if not items:
        raise OpenAIError(400, f"'{field}' must not be empty", param=field)
    out: list[tuple[str, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            ids = encode(item)
            out.append((item, ids))
        else:
            ids = p.check_token_ids(item)
            out.append((" ".join(map(str, ids)), ids))
        if not ids:
            raise OpenAIError(400, "The input cannot be empty", param=field)
    return out


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class PoolingRoutes:
    """The pooling handlers of one simulated pod."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def _run(self, receive: Receive, send: Send, model: str, ids: list[list[int]], render: Any) -> None:
        """Prefill every input at once, then answer ``render(cached)`` as JSON."""
        limit = self.server.config.max_model_len
        for one in ids:
            p.check_length(len(one), 0, limit, is_text=False)  # a pooling request generates nothing
        guard = Guard(receive)

        async def work() -> None:
            try:
                async with asyncio.TaskGroup() as group:  # one failing cancels (aborts) the others
                    for i, one in enumerate(ids):
                        group.create_task(prefill(self.server, one, request_id(f"pool-{i}-")))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None  # the engine's OpenAIError, answered as such
            guard.finishing()
            await send_json(send, 200, render(model))

        await guard.run(work)

    def _inputs(self, req: InputRequest) -> list[tuple[str, list[int]]]:
        if req.messages is not None:
            ids = p.chat_prompt_ids(req.messages)
            return [("\n".join(p.message_text(m.content) for m in req.messages), ids)]
        return _texts(req.input, "input")

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooled(receive, send, "embd-", "embedding", "embedding")

    async def pooling(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooled(receive, send, "pool-", "pooling", "data")

    async def _pooled(self, receive: Receive, send: Send, prefix: str, obj: str, key: str) -> None:
        req = p.parse(InputRequest, await read_body(receive))
        model = self.server._model(req.model)
        inputs = self._inputs(req)
        dims = req.dimensions or EMBEDDING_DIM

        def render(model: str) -> dict[str, Any]:
            data = [
                {"index": i, "object": obj, key: embedding(text, dims)} for i, (text, _) in enumerate(inputs)
            ]
            return _listing(prefix, model, data, sum(len(ids) for _, ids in inputs))

        await self._run(receive, send, model, [ids for _, ids in inputs], render)

    async def classify(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(InputRequest, await read_body(receive))
        model = self.server._model(req.model)
        inputs = self._inputs(req)

        def render(model: str) -> dict[str, Any]:
            data = []
            for i, (text, _) in enumerate(inputs):
                probs = class_probs(text)
                label = LABELS[probs.index(max(probs))]
                data.append({"index": i, "label": label, "probs": probs, "num_classes": len(LABELS)})
            return _listing("classify-", model, data, sum(len(ids) for _, ids in inputs))

        await self._run(receive, send, model, [ids for _, ids in inputs], render)

    async def score(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(ScoreRequest, await read_body(receive))
        model = self.server._model(req.model)
        pairs = _pairs(req)
        ids = [encode(a) + encode(b) for a, b in pairs]  # a cross-encoder reads the pair as one prompt

        def render(model: str) -> dict[str, Any]:
            data = [
                {"index": i, "object": "score", "score": relevance(a, b)} for i, (a, b) in enumerate(pairs)
            ]
            return _listing("score-", model, data, sum(map(len, ids)))

        await self._run(receive, send, model, ids, render)

    async def rerank(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(RerankRequest, await read_body(receive))
        model = self.server._model(req.model)
        documents = _as_list(req.documents)
        if not documents:
            raise OpenAIError(400, "'documents' must not be empty", param="documents")
        ids = [encode(req.query) + encode(doc) for doc in documents]
        tokens = sum(map(len, ids))

        def render(model: str) -> dict[str, Any]:
            results = [
                {
                    "index": i,
                    "document": {"text": doc, "multi_modal": None},
                    "relevance_score": relevance(req.query, doc),
                }
                for i, doc in enumerate(documents)
            ]
            results.sort(key=lambda r: -r["relevance_score"])  # type: ignore[operator]
            if req.top_n:
                results = results[: req.top_n]
            return {
                "id": request_id("rerank-"),
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": results,
            }

        await self._run(receive, send, model, ids, render)


def _pairs(req: ScoreRequest) -> list[tuple[str, str]]:
    """The (query, document) pairs of a score request: 1:1, 1:N or N:N, as vLLM pairs them."""
    for first, second in (
        ("text_1", "text_2"),
        ("queries", "documents"),
        ("queries", "items"),
        ("data_1", "data_2"),
    ):
        a, b = getattr(req, first), getattr(req, second)
        if a is not None and b is not None:
            left, right = _as_list(a), _as_list(b)
            break
    else:
        raise OpenAIError(400, "'text_1' and 'text_2' are required", param="text_1")
    if not left or not right:
        raise OpenAIError(400, f"'{first}' and '{second}' must not be empty", param=first)
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise OpenAIError(400, "Input lengths must be either 1:1, 1:N or N:N", param=first)
    return list(zip(left, right, strict=True))


def _listing(prefix: str, model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    return {
        "id": request_id(prefix),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage_info(tokens),
    }

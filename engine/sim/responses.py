"""``POST /v1/responses`` of a simulated vLLM 0.24 pod (a model without reasoning or tool parsers).

The input becomes chat messages (:func:`kvstack.common.prompt_messages.responses_messages`, the router
keys the same ones) prefilled under the chat template. The answer is vLLM's ``ResponsesResponse``; a
stream is vLLM's simple event sequence, each frame ``event: <type>`` + ``data: <json>``: created,
in_progress, the message item and its text part added, the text deltas, then text done, part done,
item done and completed (no ``[DONE]``).

With ``VLLM_ENABLE_RESPONSES_API_STORE`` on (vLLM's switch; off, ``store`` is ignored), a response
asked with ``store`` (the default) is kept once complete, in memory, the newest
:data:`MAX_STORED`: ``GET /v1/responses/{id}`` returns it, ``POST /v1/responses/{id}/cancel`` refuses
(400: only a background response can be cancelled, and the simulator runs none), and a new
request's ``previous_response_id`` continues its conversation. An unknown id is vLLM's 404.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.errors import OpenAIError
from kvstack.common.prompt_messages import check_responses_input, responses_messages
from kvstack.common.tokenizer import apply_chat_template
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.answer import Answer
from kvstack.engine.sim.asgi import SSE_START, Receive, Scope, Send, read_body, send_json
from kvstack.engine.sim.task_routes import Guard, outputs, request_id
from kvstack.engine.sim.types import SimRequest

if TYPE_CHECKING:
    from kvstack.engine.sim.server import SimServer


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    store: bool = True
    user: str | None = None
    ignore_eos: bool = False
    cache_salt: str | None = None


def usage(prompt: int, output: int, cached: int) -> dict[str, Any]:
    """vLLM's ``ResponseUsage``."""
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": cached,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": output,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt + output,
    }


def message_item(item_id: str, text: str | None) -> dict[str, Any]:
    """The assistant's output message; ``text`` None: just added, no content yet."""
    content: list[dict[str, Any]] = (
        [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]
    )
    status = "in_progress" if text is None else "completed"
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def response_body(
    req: ResponsesRequest,
    *,
    rid: str,
    model: str,
    created: int,
    max_tokens: int,
    status: str,
    output: list[dict[str, Any]],
    usage_: dict[str, Any] | None,
) -> dict[str, Any]:
    """``ResponsesResponse.from_request`` as vLLM fills it."""
    return {
        "id": rid,
        "created_at": created,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "metadata": req.metadata,
        "model": model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": True,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "background": False,
        "max_output_tokens": max_tokens,
        "max_tool_calls": None,
        "previous_response_id": req.previous_response_id,
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": status,
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": usage_,
        "user": req.user,
        "input_messages": None,
        "output_messages": None,
    }


class _Events:
    """Numbered SSE frames of one streamed response."""

    def __init__(self) -> None:
        self.sequence = 0

    def frame(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return (
            b"event: " + kind.encode() + b"\ndata: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
        )


MAX_STORED = 4096  # vLLM keeps every stored response (and warns of the leak); the simulator is bounded
STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"


def store_enabled(environ: dict[str, str] | None = None) -> bool:
    """``VLLM_ENABLE_RESPONSES_API_STORE`` as vLLM 0.24 reads it (an integer, "1" on)."""
    raw = (os.environ if environ is None else environ).get(STORE_ENV, "0").strip()
    return raw.isdigit() and int(raw) != 0


def not_found(response_id: str) -> OpenAIError:
    return OpenAIError(404, f"Response with id '{response_id}' not found.")


@dataclass(frozen=True, slots=True)
class _Turn:
    """One accepted ``create``: the request, its engine request, the model it names, the conversation
    its prompt was made of, and when it was created (``created_at``)."""

    req: ResponsesRequest
    sim: SimRequest
    model: str
    conversation: list[tuple[str, str]]
    created: int

    def body(
        self, status: str, output: list[dict[str, Any]], usage_: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The response to this turn, as it stands."""
        return response_body(
            self.req,
            rid=self.sim.request_id,
            model=self.model,
            created=self.created,
            max_tokens=self.sim.max_tokens,
            status=status,
            output=output,
            usage_=usage_,
        )


@dataclass(slots=True)
class Stored:
    """A finished response kept for retrieval, and its conversation for a follow-up."""

    body: dict[str, Any]
    messages: list[tuple[str, str]]  # the prompt's messages and the answer, as the chat template takes


class ResponsesRoutes:
    """The Responses API handler of one simulated pod."""

    def __init__(self, server: SimServer, environ: dict[str, str] | None = None) -> None:
        self.server = server
        self.store_on = store_enabled(environ)
        self.stored: OrderedDict[str, Stored] = OrderedDict()

    def _keep(self, req: ResponsesRequest, body: dict[str, Any], messages: list[tuple[str, str]]) -> None:
        if not (self.store_on and req.store):
            return
        self.stored[body["id"]] = Stored(body, messages)
        while len(self.stored) > MAX_STORED:
            self.stored.popitem(last=False)

    def _lookup(self, response_id: str) -> Stored:
        if not response_id.startswith("resp_"):  # vLLM checks the prefix first (its message says 'resp')
            raise OpenAIError(
                400, f"Invalid 'response_id': '{response_id}'. Expected an ID that begins with 'resp'."
            )
        found = self.stored.get(response_id)
        if found is None:
            raise not_found(response_id)
        return found

    async def retrieve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/responses/{response_id}``."""
        await send_json(send, 200, self._lookup(_path_id(scope["path"])).body)

    async def cancel(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/responses/{response_id}/cancel``: only a queued or running background response
        can be cancelled; a stored one is finished."""
        found = self._lookup(_path_id(scope["path"].removesuffix("/cancel")))
        if found.body["status"] not in ("queued", "in_progress"):
            raise OpenAIError(400, "Cannot cancel a synchronous response.")
        found.body["status"] = "cancelled"
        await send_json(send, 200, found.body)

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(ResponsesRequest, await read_body(receive))
        model = self.server._model(req.model)
        history: list[tuple[str, str]] = []
        if req.previous_response_id is not None:
            # never stored, evicted, or the store is off: vLLM's 404 (a malformed id: its 400)
            history = self._lookup(req.previous_response_id).messages
        check_responses_input(req.input)
        messages = responses_messages(req.input, req.instructions)
        if messages is None:
            raise OpenAIError(400, "the simulator takes input messages of text only", param="input")
        conversation = [*history, *((m["role"], m["content"]) for m in messages)]
        ids = apply_chat_template(conversation)
        limit = self.server.config.max_model_len
        room = p.check_length(len(ids), None, limit, is_text=True)  # 400 when the prompt fills the context
        max_tokens = min(req.max_output_tokens or room, room)  # vLLM clamps max_output_tokens to the room
        sim = SimRequest(
            request_id=request_id("resp_"),
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            cache_salt=req.cache_salt,
            arrival_time=time.monotonic(),
        )
        turn = _Turn(req, sim, model, conversation, created=int(time.time()))
        guard = Guard(receive)
        respond = self._stream if req.stream else self._whole
        await guard.run(lambda: respond(send, guard, turn))

    def _finish(self, turn: _Turn, answer: Answer, text: str, item_id: str) -> dict[str, Any]:
        """The finished response, the answer its one message item; kept when storing is on."""
        status = "incomplete" if answer.finish == "length" else "completed"
        counts = usage(len(turn.sim.prompt_token_ids), answer.generated, answer.cached)
        body = turn.body(status, [message_item(item_id, text)], counts)
        self._keep(turn.req, body, [*turn.conversation, ("assistant", text)])
        return body

    async def _whole(self, send: Send, guard: Guard, turn: _Turn) -> None:
        answer = Answer()
        pieces = [answer.take(out) async for out in outputs(self.server, turn.sim)]
        body = self._finish(turn, answer, "".join(pieces), request_id("msg_"))
        guard.finishing()
        await send_json(send, 200, body)

    async def _stream(self, send: Send, guard: Guard, turn: _Turn) -> None:
        events, item_id = _Events(), request_id("msg_")
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        await send(SSE_START)
        head = [
            events.frame("response.created", response=turn.body("in_progress", [], None)),
            events.frame("response.in_progress", response=turn.body("in_progress", [], None)),
            events.frame("response.output_item.added", output_index=0, item=message_item(item_id, None)),
            events.frame(
                "response.content_part.added",
                **where,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]
        await send({"type": "http.response.body", "body": b"".join(head), "more_body": True})
        answer = Answer()
        pieces: list[str] = []
        async for out in outputs(self.server, turn.sim):
            text = answer.take(out)
            if text:
                pieces.append(text)
                frame = events.frame("response.output_text.delta", **where, delta=text, logprobs=[])
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        text = "".join(pieces)
        final = self._finish(turn, answer, text, item_id)
        item = final["output"][0]
        tail = [
            events.frame("response.output_text.done", **where, text=text, logprobs=[]),
            events.frame(
                "response.content_part.done",
                **where,
                part={"type": "output_text", "text": text, "annotations": []},
            ),
            events.frame("response.output_item.done", output_index=0, item=item),
            events.frame("response.completed", response=final),
        ]
        guard.finishing()
        await send({"type": "http.response.body", "body": b"".join(tail), "more_body": False})


def _path_id(path: str) -> str:
    """The ``{response_id}`` of ``/v1/responses/{response_id}``."""
    return path.removeprefix("/v1/responses/")

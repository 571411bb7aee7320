"""``POST /v1/messages`` (Anthropic's Messages API) of a simulated vLLM 0.24 pod.

The system prompt and messages become chat messages (:func:`kvstack.common.prompt_messages.
anthropic_messages`, the router keys the same ones) prefilled under the chat template. The answer is
vLLM's ``AnthropicMessagesResponse``; a stream is its event sequence, each frame ``event: <type>`` +
``data: <json>``: message_start, content_block_start, the text deltas, content_block_stop,
message_delta (the stop reason and output tokens) and message_stop.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.errors import OpenAIError
from kvstack.common.prompt_messages import anthropic_messages, check_anthropic_messages
from kvstack.common.tokenizer import apply_chat_template
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.answer import Answer
from kvstack.engine.sim.asgi import SSE_START, Receive, Scope, Send, read_body, send_json
from kvstack.engine.sim.task_routes import Guard, outputs, request_id
from kvstack.engine.sim.types import SimRequest

if TYPE_CHECKING:
    from kvstack.engine.sim.server import SimServer

_STOP = {"length": "max_tokens", "stop": "end_turn", "abort": "end_turn"}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int = Field(gt=0)
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    ignore_eos: bool = False


def _frame(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False)
    return b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"


class MessagesRoutes:
    """The Messages API handler of one simulated pod."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def create(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = p.parse(MessagesRequest, await read_body(receive))
        model = self.server._model(req.model)
        check_anthropic_messages(req.messages, req.system)
        messages = anthropic_messages(req.messages, req.system)
        if messages is None:
            raise OpenAIError(400, "the simulator takes text content blocks only", param="messages")
        ids = apply_chat_template([(m["role"], m["content"]) for m in messages])
        limit = self.server.config.max_model_len
        max_tokens = p.check_length(len(ids), req.max_tokens, limit, is_text=True)
        sim = SimRequest(
            request_id=request_id("msg_"),
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            arrival_time=time.monotonic(),
        )
        guard = Guard(receive)
        answer = self._stream if req.stream else self._whole
        await guard.run(lambda: answer(send, guard, sim, model))

    async def _whole(self, send: Send, guard: Guard, sim: SimRequest, model: str) -> None:
        answer = Answer()
        pieces = [answer.take(out) async for out in outputs(self.server, sim)]
        body = {
            "id": sim.request_id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "".join(pieces)}],
            "model": model,
            "stop_reason": _STOP[answer.finish],
            "stop_sequence": None,
            "usage": {"input_tokens": len(sim.prompt_token_ids), "output_tokens": answer.generated},
        }
        guard.finishing()
        await send_json(send, 200, body)

    async def _stream(self, send: Send, guard: Guard, sim: SimRequest, model: str) -> None:
        start: dict[str, Any] = {
            "id": sim.request_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": len(sim.prompt_token_ids), "output_tokens": 0},
        }
        await send(SSE_START)
        head = _frame("message_start", message=start) + _frame(
            "content_block_start", index=0, content_block={"type": "text", "text": ""}
        )
        await send({"type": "http.response.body", "body": head, "more_body": True})
        answer = Answer()
        async for out in outputs(self.server, sim):
            text = answer.take(out)
            if text:
                frame = _frame("content_block_delta", index=0, delta={"type": "text_delta", "text": text})
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        tail = (
            _frame("content_block_stop", index=0)
            + _frame(
                "message_delta",
                delta={"stop_reason": _STOP[answer.finish], "stop_sequence": None},
                usage={"input_tokens": len(sim.prompt_token_ids), "output_tokens": answer.generated},
            )
            + _frame("message_stop")
        )
        guard.finishing()
        await send({"type": "http.response.body", "body": tail, "more_body": False})

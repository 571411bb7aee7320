"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` of a simulated vLLM 0.24 pod.

The form (multipart/form-data: ``file``, ``model``, ``prompt``, ``response_format``, ``stream``,
``max_completion_tokens``, ...) is parsed with :mod:`kvstack.common.multipart`, the router's parser.
The audio becomes encoder tokens as Whisper's do (50 per second of audio; the ids drawn from the
file's bytes, so the same file is a prefix-cache hit), and the transcript is generated text, about
four tokens per second of audio. Answers are vLLM's ``TranscriptionResponse`` (``text`` and a
``duration`` usage) or ``TranslationResponse`` (``text``), ``text/plain`` for ``response_format=text``,
or a stream of ``transcription.chunk`` / ``translation.chunk`` events ending with ``[DONE]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import wave
from typing import TYPE_CHECKING, Any

from kvstack.common import multipart
from kvstack.common.errors import OpenAIError
from kvstack.common.tokenizer import VOCAB_SIZE, encode
from kvstack.engine.sim import protocol as p
from kvstack.engine.sim.answer import Answer
from kvstack.engine.sim.asgi import SSE_START, Receive, Scope, Send, read_body, send_bytes, send_json
from kvstack.engine.sim.task_routes import Guard, outputs, request_id
from kvstack.engine.sim.types import SimRequest

if TYPE_CHECKING:
    from kvstack.engine.sim.server import SimServer

AUDIO_TOKENS_PER_S = 50  # Whisper: 1500 encoder positions per 30 s window
TEXT_TOKENS_PER_S = 4  # a speaker's words, in tokens
MAX_TRANSCRIPT_TOKENS = 448  # Whisper's decoder context
RAW_BYTES_PER_S = 32_000  # audio that is not WAV: counted as 16 kHz 16-bit mono
_TRUE = frozenset({"true", "1", "yes", "on"})
_FORMATS = frozenset({"json", "text"})


def duration_s(data: bytes | memoryview) -> float:
    """Seconds of audio in ``data``: from the WAV header, else by size; 400 for a broken WAV."""
    if data[:4] == b"RIFF":
        try:
            with wave.open(io.BytesIO(data)) as wav:
                frames: int = wav.getnframes()
                return frames / float(wav.getframerate())
        except (wave.Error, EOFError, ZeroDivisionError):
            raise OpenAIError(400, "Invalid or unsupported audio file.", param="file") from None
    return len(data) / RAW_BYTES_PER_S


def audio_ids(data: bytes | memoryview, seconds: float) -> list[int]:
    """Encoder tokens of the audio: ``AUDIO_TOKENS_PER_S`` a second, drawn from its bytes."""
    count = max(1, math.ceil(seconds * AUDIO_TOKENS_PER_S))
    seed = hashlib.blake2b(data, digest_size=16).digest()
    ids: list[int] = []
    block = 0
    while len(ids) < count:
        raw = hashlib.blake2b(seed + block.to_bytes(4, "little"), digest_size=64).digest()
        ids.extend(
            256 + int.from_bytes(raw[i : i + 4], "little") % (VOCAB_SIZE - 512) for i in range(0, 64, 4)
        )
        block += 1
    return ids[:count]


class AudioRoutes:
    """The speech-to-text handlers of one simulated pod."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def transcribe(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(scope, receive, send, "transcription", "trsc-")

    async def translate(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(scope, receive, send, "translation", "trsl-")

    async def _serve(self, scope: Scope, receive: Receive, send: Send, kind: str, prefix: str) -> None:
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
        body = await read_body(receive)
        try:
            parts = multipart.parse(body, multipart.boundary_of(content_type))
            fields = multipart.text_fields(
                parts, ("model", "prompt", "response_format", "stream", "max_completion_tokens")
            )
        except multipart.MultipartError as err:
            raise OpenAIError(400, f"invalid multipart/form-data body: {err}") from None
        audio = next((part for part in parts if part.name == "file"), None)
        if audio is None or audio.filename is None:
            raise OpenAIError(400, "file: Field required", param="file")
        model = self.server._model(fields.get("model") or None)
        response_format = fields.get("response_format", "json")
        if response_format not in _FORMATS:
            raise OpenAIError(
                400,
                f"response_format {response_format!r} is not supported by the simulator",
                param="response_format",
            )
        seconds = duration_s(audio.data)
        ids = audio_ids(audio.data, seconds) + encode(fields.get("prompt", ""))
        max_tokens = max(1, min(MAX_TRANSCRIPT_TOKENS, round(seconds * TEXT_TOKENS_PER_S)))
        if "max_completion_tokens" in fields:
            try:
                max_tokens = int(fields["max_completion_tokens"])
            except ValueError:
                raise OpenAIError(
                    400, "max_completion_tokens must be an integer", param="max_completion_tokens"
                ) from None
        max_tokens = p.check_length(len(ids), max_tokens, self.server.config.max_model_len, is_text=False)
        sim = SimRequest(
            request_id=request_id(prefix), prompt_token_ids=ids, max_tokens=max_tokens, ignore_eos=True
        )
        guard = Guard(receive)
        if fields.get("stream", "").strip().lower() in _TRUE:
            await guard.run(lambda: self._stream(send, guard, sim, model, kind))
            return

        async def whole() -> None:
            generation = Answer()
            text = "".join([generation.take(out) async for out in outputs(self.server, sim)])
            guard.finishing()
            if response_format == "text":
                await send_bytes(send, 200, text.encode(), [(b"content-type", b"text/plain; charset=utf-8")])
                return
            answer: dict[str, Any] = {"text": text}
            if kind == "transcription":
                answer["usage"] = {"type": "duration", "seconds": math.ceil(seconds)}
            await send_json(send, 200, answer)

        await guard.run(whole)

    async def _stream(self, send: Send, guard: Guard, sim: SimRequest, model: str, kind: str) -> None:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            data = {
                "id": sim.request_id,
                "object": f"{kind}.chunk",
                "created": created,
                "model": model,
                "choices": [{"delta": delta, "finish_reason": finish, "stop_reason": None}],
            }
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        await send(SSE_START)
        answer = Answer()
        async for out in outputs(self.server, sim):
            text = answer.take(out)
            if text:
                frame = chunk({"content": text}, None)
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        guard.finishing()
        tail = chunk({}, answer.finish) + p.DONE_FRAME
        await send({"type": "http.response.body", "body": tail, "more_body": False})

"""OpenAI-compatible routes on the chat server: /v1/models and /v1/chat/completions.

Retrieval is on by default (``"retrieval": false`` turns it off); the retrieved passages
come back in an extra ``sources`` field. ``"stream": true`` answers as server-sent events.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from pipeline.errors import UserError
from service.engine import Engine, GenerationSettings

log = logging.getLogger("service.api")


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str = "base"
    messages: list[ChatMessage]
    stream: bool = False
    temperature: float = 0.0
    top_p: float = 0.9
    max_tokens: int = 160
    retrieval: bool = True


def split_conversation(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The last user message is the question; earlier user/assistant pairs are history."""
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise UserError("the last message must come from the user")
    history, pending = [], None
    for message in turns[:-1]:
        if message.role == "user":
            pending = message.content
        elif pending is not None:
            history.append((pending, message.content))
            pending = None
    return turns[-1].content, history


def _sources(passages) -> list[dict]:
    return [dict(asdict(p), number=i) for i, p in enumerate(passages, 1)]


def build_router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    def models():
        return {"object": "list", "data": [
            {"id": v, "object": "model", "created": 0, "owned_by": "alignrag"} for v in engine.variants()]}

    @router.post("/chat/completions")
    def chat(request: ChatRequest):
        try:
            question, history = split_conversation(request.messages)
            settings = GenerationSettings(request.temperature, request.top_p, request.max_tokens)
            replies = engine.stream(question, history=history, variant=request.model,
                                    use_retrieval=request.retrieval, settings=settings)
            first = next(replies)
        except UserError as err:
            return JSONResponse({"error": {"message": str(err), "type": "invalid_request_error"}}, 400)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if request.stream:
            return StreamingResponse(_events(completion_id, request.model, first, replies),
                                     media_type="text/event-stream")
        reply = first
        for reply in replies:
            pass
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply.text}}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
            "sources": _sources(reply.passages),
        }

    return router


def _events(completion_id: str, model: str, first, replies):
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, sources=_sources(first.passages))
    sent = 0
    try:
        for reply in [first, *replies] if first.text else replies:
            if len(reply.text) > sent and reply.text.startswith(reply.text[:sent]):
                yield chunk({"content": reply.text[sent:]})
                sent = len(reply.text)
    except Exception as err:  # the stream is already open: report the failure in-band
        log.exception("generation failed")
        yield chunk({}, "error", error={"message": str(err)})
    yield chunk({}, "stop")
    yield "data: [DONE]\n\n"

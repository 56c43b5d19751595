"""OpenAI-compatible routes on the chat server: /v1/models and /v1/chat/completions.

Retrieval is on by default (``"retrieval": false`` turns it off); the retrieved passages
come back in an extra ``sources`` field. ``"stream": true`` answers as server-sent events.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict

from typing import Literal

from fastapi import APIRouter, Depends, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from pipeline.errors import UserError
from service.engine import Engine, GenerationSettings, ServerBusy

log = logging.getLogger("service.api")


MAX_TOKENS_LIMIT = 512  # the most new tokens one request may ask for
MAX_CONVERSATION_CHARS = 16_000  # all messages together, checked before any tokenising
MAX_TURNS = 64  # messages in one request


class TextPart(BaseModel):
    """One content part as OpenAI clients send it: {"type": "text", "text": "..."}."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model: str | None = None  # None: the variant the server serves by default
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_TURNS)
    stream: bool = False
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(160, ge=1, le=MAX_TOKENS_LIMIT)
    retrieval: bool = True

    @field_validator("messages")
    @classmethod
    def bounded(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in messages)
        if total > MAX_CONVERSATION_CHARS:
            raise ValueError(f"the conversation has {total} characters; the limit is {MAX_CONVERSATION_CHARS}")
        return messages


def openai_error(status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """An error in the shape OpenAI clients parse: {"error": {"message", "type", "param"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status, headers=headers)


def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a malformed body, answered as OpenAI does: 400 naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return openai_error(400, "the request body is not valid JSON")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return openai_error(400, f"{param}: {message}" if param else message, param)


def split_conversation(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The last user message is the question; earlier user/assistant pairs are history."""
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise UserError("the last message must come from the user")
    history, pending = [], None
    for message in turns[:-1]:
        if message.role == "user":
            pending = message.text
        elif pending is not None:
            history.append((pending, message.text))
            pending = None
    return turns[-1].text, history


def _sources(passages) -> list[dict]:
    return [dict(asdict(p), number=i) for i, p in enumerate(passages, 1)]


class Unauthorized(Exception):
    """A /v1 request without the server's bearer key."""


def unauthorized(request, exc: Unauthorized) -> JSONResponse:
    return openai_error(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                        kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})


def bearer_check(api_key: str | None):
    """A FastAPI dependency that refuses requests whose bearer token is not ``api_key``."""
    def check(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized()

    return check


def install_error_handlers(app) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Unauthorized, unauthorized)


def build_router(engine: Engine, api_key: str | None = None, default_variant: str = "base") -> APIRouter:
    """The /v1 routes; with ``api_key`` every one needs ``Authorization: Bearer <api_key>``.
    A request that names no model gets ``default_variant``."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(bearer_check(api_key))])

    @router.get("/models")
    def models():
        return {"object": "list", "data": [
            {"id": v, "object": "model", "created": 0, "owned_by": "alignrag"} for v in engine.variants()]}

    @router.post("/chat/completions")
    def chat(request: ChatRequest):
        request.model = request.model or default_variant
        try:
            question, history = split_conversation(request.messages)
            settings = GenerationSettings(request.temperature, request.top_p, request.max_tokens)
            replies = engine.stream(question, history=history, variant=request.model,
                                    use_retrieval=request.retrieval, settings=settings)
            first = next(replies)
        except UserError as err:
            return openai_error(400, str(err))
        except ServerBusy as err:
            return openai_error(429, str(err), kind="rate_limit_error",
                                headers={"Retry-After": str(err.retry_after_seconds)})
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if request.stream:
            return StreamingResponse(_events(completion_id, request.model, first, replies, request.max_tokens),
                                     media_type="text/event-stream")
        reply = first
        for reply in replies:
            pass
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "finish_reason": finish_reason(reply, request.max_tokens),
                         "message": {"role": "assistant", "content": reply.text}}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
            "sources": _sources(reply.passages),
        }

    return router


def finish_reason(reply, max_tokens: int) -> str:
    """"length" when the answer used every token it was allowed, else "stop"."""
    return "length" if reply.completion_tokens >= max_tokens else "stop"


def _events(completion_id: str, model: str, first, replies, max_tokens: int):
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, sources=_sources(first.passages))
    sent, reply = 0, first
    try:
        for reply in [first, *replies] if first.text else replies:
            if len(reply.text) > sent and reply.text.startswith(reply.text[:sent]):
                yield chunk({"content": reply.text[sent:]})
                sent = len(reply.text)
    except Exception as err:  # the stream is already open: report the failure in-band, then end
        log.exception("generation failed")
        yield chunk({}, "error", error={"message": str(err), "type": "server_error"})
    else:
        yield chunk({}, finish_reason(reply, max_tokens))
    finally:
        replies.close()  # a client that hung up stops the generation (Engine.stream's finally)
    yield "data: [DONE]\n\n"

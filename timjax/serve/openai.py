"""OpenAI Chat Completions (``POST /v1/chat/completions``) and ``GET /v1/models``, close enough to the
public reference that the ``openai`` client works unchanged. With a TIM model the content is the answer of
the reasoning tree (``message.reasoning`` holds the tree); ``response_format`` json_schema constrains it."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from timjax.serve import generation as gen
from timjax.serve.auth import require_key
from timjax.serve.backend import Delta
from timjax.serve.errors import ApiError
from timjax.serve.sse import event, stream

router = APIRouter(dependencies=[Depends(require_key)])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JsonSchemaFormat(BaseModel):
    name: str = "answer"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None


def _answer_schema(body: ChatRequest) -> dict | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "object"}
    if rf.json_schema is None:
        raise ApiError(400, "response_format.json_schema is required with type json_schema", param="response_format")
    return rf.json_schema.schema_


def build(request: Request, body: ChatRequest):
    state = request.app.state
    gen.check_model(request, body.model)
    system = "\n".join(m.text() for m in body.messages if m.role in ("system", "developer")) or None
    turns = [{"role": m.role, "content": m.text()} for m in body.messages if m.role not in ("system", "developer")]
    if not turns:
        raise ApiError(400, "messages: at least one user message is needed", param="messages")
    common = dict(
        system=system,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 1.0,
        seed=body.seed or 0,
    )
    if state.config.tim:
        return gen.tim_request(state, turns, answer_schema=_answer_schema(body), **common)
    if _answer_schema(body) is not None:
        raise ApiError(400, "response_format: structured answers need a TIM model (serve with --tim)",
                       param="response_format")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return gen.plain_request(state, turns, stop=stop, **common)


def _finish_reason(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result) -> dict:
    p, c = result.stats.prompt_tokens, result.stats.generated_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _failure(result) -> None:
    if result.finish_reason == "error":
        raise ApiError(500, f"generation failed: {result.error}", code="generation_failed")


@router.get("/v1/models")
async def models(request: Request):
    mid = request.app.state.config.model_id()
    return {"object": "list", "data": [{"id": mid, "object": "model", "created": 0, "owned_by": "timjax"}]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest):
    greq = build(request, body)
    job = await gen.submit(request, greq)
    cid, created = f"chatcmpl-{job.id}", int(time.time())
    tim = request.app.state.config.tim
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream(_chunks(job, cid, created, body.model, tim, include_usage), job)
    result = await job.wait()
    _failure(result)
    message: dict[str, Any] = {"role": "assistant", "content": gen.answer_text(result, tim)}
    if tim:
        message["reasoning"] = gen.reasoning_tree(result)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(result), "logprobs": None}],
        "usage": _usage(result),
    }


async def _chunks(job, cid, created, model, tim: bool, include_usage: bool):
    def chunk(delta: dict, finish=None, usage=None) -> dict:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return event(out)

    yield chunk({"role": "assistant", "content": ""})
    answer = gen.StreamAnswer()
    async for ev in job.events():
        if isinstance(ev, Delta):
            text = answer.feed(ev.text) if tim else ev.text
            if text:
                yield chunk({"content": text})
            continue
        result = ev
        if result.finish_reason == "error":
            yield event({"error": {"message": f"generation failed: {result.error}", "type": "server_error"}})
            return
        rest = answer.rest(gen.answer_text(result, tim)) if tim else ""
        if rest:
            yield chunk({"content": rest})
        yield chunk({}, finish=_finish_reason(result))
        if include_usage:
            yield chunk({}, usage=_usage(result))
    yield event("[DONE]")

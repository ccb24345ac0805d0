"""Anthropic Messages (``POST /v1/messages``), with its stream event types (message_start,
content_block_start / delta / stop, message_delta, message_stop). The ``anthropic`` client's ``base_url``
is the server root; it sends the key as ``x-api-key``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from timjax.serve import generation as gen
from timjax.serve.auth import require_key
from timjax.serve.backend import Delta
from timjax.serve.errors import ApiError
from timjax.serve.sse import event, stream

router = APIRouter(dependencies=[Depends(require_key)])


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stop_sequences: list[str] | None = None
    stream: bool = False


def build(request: Request, body: MessagesRequest):
    state = request.app.state
    gen.check_model(request, body.model)
    system = body.system if isinstance(body.system, str) or body.system is None else "".join(
        b.text for b in body.system
    )
    turns = [{"role": m.role, "content": m.text()} for m in body.messages]
    common = dict(
        system=system or None,
        max_tokens=body.max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 1.0,
        seed=0,
    )
    if state.config.tim:
        return gen.tim_request(state, turns, **common)
    return gen.plain_request(state, turns, stop=body.stop_sequences, **common)


def _stop_reason(result) -> str:
    return "max_tokens" if result.finish_reason == "length" else "end_turn"


@router.post("/v1/messages")
async def messages(request: Request, body: MessagesRequest):
    job = await gen.submit(request, build(request, body))
    mid, tim = f"msg_{job.id}", request.app.state.config.tim
    if body.stream:
        return stream(_events(job, mid, body.model, tim), job)
    result = await job.wait()
    if result.finish_reason == "error":
        raise ApiError(500, f"generation failed: {result.error}")
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": body.model,
        "content": [{"type": "text", "text": gen.answer_text(result, tim)}],
        "stop_reason": _stop_reason(result),
        "stop_sequence": None,
        "usage": {**_input_usage(result), "output_tokens": result.stats.generated_tokens},
    }


def _input_usage(result) -> dict:
    """Anthropic's split: ``input_tokens`` computed, ``cache_read_input_tokens`` read from the prefix cache."""
    cached = result.stats.cached_prompt_tokens
    return {"input_tokens": result.stats.prompt_tokens - cached, "cache_read_input_tokens": cached}


async def _events(job, mid, model, tim: bool):
    def ev(data: dict):
        return event(data, data["type"])

    n_prompt = len(job.request.prompt)
    yield ev(
        {
            "type": "message_start",
            "message": {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": n_prompt, "output_tokens": 0},
            },
        }
    )
    yield ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    answer = gen.StreamAnswer()
    async for item in job.events():
        if isinstance(item, Delta):
            text = answer.feed(item.text) if tim else item.text
            if text:
                yield ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
            continue
        result = item
        if result.finish_reason == "error":
            yield ev({"type": "error", "error": {"type": "api_error", "message": f"generation failed: {result.error}"}})
            return
        rest = answer.rest(gen.answer_text(result, tim)) if tim else ""
        if rest:
            yield ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": rest}})
        yield ev({"type": "content_block_stop", "index": 0})
        yield ev(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(result), "stop_sequence": None},
                "usage": {**_input_usage(result), "output_tokens": result.stats.generated_tokens},
            }
        )
        yield ev({"type": "message_stop"})

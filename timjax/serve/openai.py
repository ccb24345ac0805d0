"""OpenAI Chat Completions (``POST /v1/chat/completions``) and ``GET /v1/models``, close enough to the
public reference that the ``openai`` client works unchanged. With a TIM model the content is the answer of
the reasoning tree (``message.reasoning`` holds the tree); ``response_format`` json_schema constrains it.
Without TIM, ``response_format`` constrains the whole output to the schema. Client-side function calling
(``tools`` / ``tool_choice`` / ``parallel_tool_calls``): the output is constrained to a call of the
offered functions (``timjax.serve.constrained``) and comes back as ``message.tool_calls`` with
``finish_reason: "tool_calls"`` (streamed as one ``delta.tool_calls`` chunk per call); the client runs the
function and resends the conversation with ``role: "tool"`` messages, which the server re-prefills."""

from __future__ import annotations

import json
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


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as the server returned it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called functions (resent by the client)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        """The turn as the model reads it: an assistant's calls as the JSON it wrote, a tool result as is."""
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments)
                except ValueError:
                    args = c.function.arguments
                calls.append({"name": c.function.name, "arguments": args})
            return json.dumps({"tool_calls": calls}, ensure_ascii=False)
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


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
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
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
    for i, m in enumerate(body.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise ApiError(400, f"messages[{i}].tool_call_id: a tool message must name the call it answers",
                           param=f"messages[{i}].tool_call_id")
    common = dict(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 1.0,
        seed=body.seed or 0,
    )
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if body.tools and choice != "none":
        return _function_calling(state, body, turns, system, choice, common)
    if isinstance(choice, NamedToolChoice) or choice == "required":
        raise ApiError(400, "tool_choice: no tools were given", param="tool_choice")
    if state.config.tim:
        return gen.tim_request(state, turns, system=system, answer_schema=_answer_schema(body), **common)
    schema = _answer_schema(body)
    if schema is not None:  # no reasoning tree: the schema constrains the whole output
        gen.answer_model(schema, "response_format")  # a bad schema: 400 naming the field
        return gen.json_request(state, turns, system=system, schema=schema, param="response_format", **common)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return gen.plain_request(state, turns, system=system, stop=stop, **common)


def _function_calling(state, body: ChatRequest, turns, system, choice, common):
    """Client-side function calling: the output is constrained to a call of the offered functions (or, with
    ``auto``, an answer); the client runs the function and resends the conversation."""
    from timjax.serve.constrained import tool_call_schema, tool_prompt

    functions = []
    for i, t in enumerate(body.tools):
        param = f"tools[{i}].function.parameters"
        gen.answer_model(t.function.parameters, param)  # a bad JSON schema: 400 naming it
        if t.function.name in {f["name"] for f in functions}:
            raise ApiError(400, f"tools[{i}].function.name: {t.function.name!r} is offered twice",
                           param=f"tools[{i}].function.name")
        functions.append(t.function.model_dump())
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {f["name"] for f in functions}:
            raise ApiError(400, f"tool_choice.function.name: {choice.function.name!r} is not among the tools "
                           f"({', '.join(f['name'] for f in functions)})", param="tool_choice")
        choice = {"name": choice.function.name}
    schema = tool_call_schema(functions, choice, body.parallel_tool_calls is not False)
    prompt = tool_prompt(functions, choice)
    system = f"{system}\n\n{prompt}" if system else prompt
    return gen.json_request(state, turns, system=system, schema=schema, param="tools", kind="tools", **common)


def _tool_message(result) -> tuple[dict, str]:
    """The assistant message and finish reason of a function-calling request."""
    text = result.text or ""
    if result.finish_reason == "length":  # the JSON was cut: what was written, as content
        return {"role": "assistant", "content": text}, "length"
    doc = json.loads(text)
    if "tool_calls" in doc:  # the arguments as the model wrote them (what a stream sends, fragment by fragment)
        calls = [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}
            for name, args in gen.calls_so_far(text)
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": doc["content"]}, "stop"


def _finish_reason(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result) -> dict:
    p, c = result.stats.prompt_tokens, result.stats.generated_tokens
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": result.stats.cached_prompt_tokens},
    }


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
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream(_chunks(job, cid, created, body.model, greq.kind, include_usage), job)
    result = await job.wait()
    _failure(result)
    if greq.kind == "tools":
        message, finish = _tool_message(result)
    else:
        message, finish = {"role": "assistant", "content": gen.answer_text(result, greq.kind == "tim")}, None
        finish = _finish_reason(result)
    if greq.kind == "tim":
        message["reasoning"] = gen.reasoning_tree(result)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _usage(result),
    }


async def _chunks(job, cid, created, model, kind: str, include_usage: bool):
    def chunk(delta: dict, finish=None, usage=None) -> dict:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return event(out)

    tim = kind == "tim"
    yield chunk({"role": "assistant", "content": ""})
    answer = gen.StreamAnswer("content" if kind == "tools" else "answer")
    calls = gen.StreamCalls()
    async for ev in job.events():
        if isinstance(ev, Delta):
            if kind == "tools":  # each call as it is written: its name, then its arguments in fragments
                entries = calls.feed(ev.text)
                if entries:
                    yield chunk({"tool_calls": entries})
            text = answer.feed(ev.text) if tim or kind == "tools" else ev.text
            if text:
                yield chunk({"content": text})
            continue
        result = ev
        if result.finish_reason in ("error", "cancelled", "timeout"):
            yield event({"error": {"message": f"generation failed: {result.error}", "type": "server_error"}})
            return
        if kind == "tools":
            message, finish = _tool_message(result)
            final = result.text or ""
            rest = calls.feed(final[len(calls.doc):]) if final.startswith(calls.doc) else []
            if rest:  # text the deltas had not carried yet
                yield chunk({"tool_calls": rest})
            if finish == "length" and not calls.calls and not answer.sent:
                tail = message["content"]  # cut before a call or an answer began: what was written, as is
            else:
                tail = answer.rest(message["content"] or "") if not message.get("tool_calls") else ""
            if tail:
                yield chunk({"content": tail})
        else:
            finish = _finish_reason(result)
            rest = answer.rest(gen.answer_text(result, tim)) if tim else ""
            if rest:
                yield chunk({"content": rest})
        yield chunk({}, finish=finish)
        if include_usage:
            yield chunk({}, usage=_usage(result))
    yield event("[DONE]")

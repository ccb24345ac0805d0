"""The Runs API (the ``subconscious-sdk`` client's routes and camelCase wire format): ``POST /v1/runs`` ->
``{runId}``, ``GET /v1/runs/{id}``, ``POST /v1/runs/{id}/cancel``, ``POST /v1/runs/stream`` (SSE with
OpenAI-style chunks of the document as it is written, then ``[DONE]``; ``event: error`` on failure). A run
may bring its own tools (MCP servers, HTTP functions): the runtime calls them inside the inference."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from timjax.serve import generation as gen
from timjax.serve.auth import require_key
from timjax.serve.backend import Delta
from timjax.serve.errors import ApiError
from timjax.serve.sse import event, stream
from timjax.serve.tools import ToolRefused, open_request_tools

router = APIRouter(dependencies=[Depends(require_key)])
KEEP_RUNS = 1000  # finished runs kept for GET (oldest dropped first)


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class RunInput(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    instructions: str = Field(min_length=1)
    tools: list[dict[str, Any]] = []
    content: list[TextContent] | None = None
    resources: list[str] | None = None
    skills: list[str] | None = None
    answer_format: dict[str, Any] | None = Field(None, alias="answerFormat")


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int | None = Field(None, ge=1, le=3600)
    max_step_tokens: int | None = Field(None, ge=1)


class RunOutput(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    callback_url: str | None = Field(None, alias="callbackUrl")
    response_content: Literal["full", "answer_only"] | None = Field(None, alias="responseContent")


class CreateRun(BaseModel):
    model_config = ConfigDict(extra="ignore")
    engine: str
    input: RunInput
    options: RunOptions | None = None
    output: RunOutput | None = None


async def _start(request: Request, body: CreateRun):
    state = request.app.state
    gen.check_model(request, body.engine, "engine", status=400)
    if not state.config.tim:
        raise ApiError(400, f"engine {body.engine!r} is not a TIM model: the Runs API needs one", param="engine")
    inp = body.input
    if inp.skills or inp.resources:
        raise ApiError(400, "input.skills / input.resources: not supported by this server", param="input")
    if body.output is not None and body.output.callback_url:
        raise ApiError(400, "output.callbackUrl: callbacks are not supported by this server; poll or stream",
                       param="output")
    toolset = None
    if inp.tools:
        try:
            toolset = await run_in_threadpool(
                open_request_tools,
                inp.tools,
                base=state.tools,
                limits=state.tool_limits,
                allow_patterns=state.config.allow_tool_url,
            )
        except ToolRefused as e:
            raise ApiError(400, str(e), param="input.tools") from None
    text = inp.instructions + "".join("\n" + c.text for c in inp.content or [])
    try:
        greq = gen.tim_request(
            state,
            [{"role": "user", "content": text}],
            system=None,
            max_tokens=None,
            temperature=0.0,
            top_p=1.0,
            seed=0,
            answer_schema=inp.answer_format,
            schema_param="input.answerFormat",
            tools=toolset,
            timeout_s=body.options.timeout if body.options else None,
        )
    except BaseException:
        if toolset is not None:
            toolset.close()
        raise
    if toolset is not None:
        greq.on_close = toolset.close
    job = await gen.submit(request, greq)
    job.response_content = body.output.response_content if body.output else None
    runs: OrderedDict = state.runs
    runs[job.id] = job
    while len(runs) > KEEP_RUNS:
        runs.popitem(last=False)
    return job


def run_view(job) -> dict:
    out: dict[str, Any] = {"runId": job.id, "status": job.status}
    res = job.result
    if res is None:
        return out
    if job.status == "succeeded":
        result = {"answer": gen.answer_text(res, True)}
        if getattr(job, "response_content", None) != "answer_only":
            result["reasoning"] = gen.reasoning_tree(res)
        out["result"] = result
    elif job.status == "failed":
        out["error"] = {"code": "generation_failed", "message": res.error or res.finish_reason}
    elif job.status == "timed_out":
        out["error"] = {"code": "timeout", "message": res.error}
    out["usage"] = {
        "inputTokens": res.stats.prompt_tokens,
        "outputTokens": res.stats.generated_tokens,
        "durationMs": int(1000 * ((job.finished or time.time()) - job.created)),
    }
    return out


def _job(request: Request, run_id: str):
    job = request.app.state.runs.get(run_id)
    if job is None:
        raise ApiError(404, f"run {run_id!r} not found")
    return job


@router.post("/v1/runs")
async def create_run(request: Request, body: CreateRun):
    job = await _start(request, body)
    return {"runId": job.id}


@router.get("/v1/runs/{run_id}")
async def get_run(request: Request, run_id: str):
    return run_view(_job(request, run_id))


@router.post("/v1/runs/{run_id}/cancel")
async def cancel_run(request: Request, run_id: str):
    job = _job(request, run_id)
    if not job.done:
        job.cancel()
        await job.wait()
    return run_view(job)


@router.post("/v1/runs/stream")
async def stream_run(request: Request, body: CreateRun):
    job = await _start(request, body)

    async def events():
        yield event({"run_id": job.id})
        async for ev in job.events():
            if isinstance(ev, Delta):
                if ev.text:
                    yield event({"id": job.id, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}]})
                continue
            if job.status != "succeeded":
                view = run_view(job)
                err = view.get("error") or {"code": job.status, "message": ev.error or job.status}
                yield event({"error": err["message"], "code": err["code"]}, "error")
                return
        yield event("[DONE]")

    return stream(events(), job, headers={"x-run-id": job.id})

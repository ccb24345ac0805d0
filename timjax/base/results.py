"""Pydantic results returned by ``timjax.generate``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

FinishReason = Literal["stop", "length", "error", "grammar", "cancelled", "timeout"]


class GenerationStats(BaseModel):
    prompt_tokens: int
    generated_tokens: int
    time_s: float
    tokens_per_s: float
    first_token_s: float | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
    # TIM runs (pruning); zero / None otherwise.
    peak_working_tokens: int | None = None
    pruned_tokens: int = 0
    pruned_share: float = 0.0  # pruned KV entries / all KV entries ever written for generated tokens
    prune_events: int = 0
    reencoded_tokens: int = 0
    extend_time_s: float = 0.0  # device time in extend / re-encode steps for this sequence's batches
    host_time_s: float = 0.0  # host time in grammar and tree tracking
    preemptions: int = 0  # times the scheduler took its KV pages back (it resumed by writing its memory again)
    # Tool calls (timjax.tools): count, how many ended in an error object, summed call latency.
    tool_calls: int = 0
    tool_errors: int = 0
    tool_time_s: float = 0.0


ToolCallStatus = Literal[
    "ok",
    "tool_error",
    "timeout",
    "server_error",
    "invalid_arguments",
    "unknown_tool",
    "call_cap",
    "invalid_result",
    "truncated",
    "server_crashed",
]


class ToolCallRecord(BaseModel):
    """One tool call inside an inference: what the model asked for and what the runtime wrote back."""

    index: int  # order within the inference
    task_path: tuple[int, ...]  # the task whose tooluse made the call
    tool: str
    arguments: Any  # the parameters as the model wrote them (parsed JSON, or the raw text if it did not parse)
    result: str  # the exact text written after "tool_result": (timjax.tools.encoding)
    status: ToolCallStatus
    error: str | None = None  # what went wrong, when status is not "ok"
    latency_s: float  # the call on the tool loop, from its start to its answer (or fault; host clock for refusals)
    result_tokens: int = 0  # tokens forced for the result (after truncation)
    resume_s: float | None = None  # from the answer being available to the next sampled token


class GenerationResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    tokens: list[int]  # every generated (and forced) token, pruned ones included
    text: str | None = None
    finish_reason: FinishReason
    error: str | None = None
    stats: GenerationStats
    # TIM generations only:
    response: Any = None  # the parsed pydantic Response (complete tree, pruned subtasks included)
    partial_response: Any = None  # best-effort JSON value of an incomplete generation
    pruned_paths: list[tuple[int, ...]] = []  # task paths whose subtask lists were pruned
    working_memory: list[int] | None = None  # token ids in the KV cache at the end (generated part)
    working_memory_text: str | None = None
    tool_calls: list[ToolCallRecord] = []  # every tool call, in order (pruned ones included)

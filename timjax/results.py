"""Pydantic results returned by ``timjax.generate``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

FinishReason = Literal["stop", "length", "error", "grammar"]


class GenerationStats(BaseModel):
    prompt_tokens: int
    generated_tokens: int
    time_s: float
    tokens_per_s: float
    first_token_s: float | None = None
    # TIM runs (pruning); zero / None otherwise.
    peak_working_tokens: int | None = None
    pruned_tokens: int = 0
    pruned_share: float = 0.0  # pruned KV entries / all KV entries ever written for generated tokens
    prune_events: int = 0
    reencoded_tokens: int = 0
    extend_time_s: float = 0.0  # device time in extend / re-encode steps for this sequence's batches
    host_time_s: float = 0.0  # host time in grammar and tree tracking
    preemptions: int = 0  # times the scheduler took its KV pages back (it resumed by writing its memory again)


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

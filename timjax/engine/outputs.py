"""What the engine hands back: the events a request's handle yields, the engine's stats, and incremental
detokenization.

A handle yields, in order:

- ``TokenEvent(request_id, token_ids, text)``: the tokens written for the request since the last event
  (sampled ones and, under TIM, grammar-forced ones and tool results: exactly the final result's
  ``tokens``, in order) and the UTF-8-safe text delta (a token that ends inside a multi-byte character
  waits for the next one; the deltas concatenated are the decoded tokens). The stop-string cut of a plain
  request shows only in the final result's text.
- ``TreeEvent(request_id, kind, task_path, info)``: the TIM controller's reasoning tree, ``kind`` one of
  ``subtask_opened`` (a ``subtasks`` list opened under ``task_path``), ``subtask_closed`` (it closed),
  ``pruned`` (its KV entries were dropped; ``info["tokens"]``), ``tool_call_started`` (``info["tool"]``,
  ``info["index"]``), ``tool_call_finished`` (``info["tool"]``, ``info["index"]``, ``info["status"]``).
- ``FinishedEvent(request_id, result)``: the last event; ``result`` is the same ``GenerationResult`` as
  ``timjax.generate`` returns (``finish_reason`` "cancelled" or "timeout" for aborted requests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel

from timjax.base.results import GenerationResult

TreeEventKind = Literal["subtask_opened", "subtask_closed", "pruned", "tool_call_started", "tool_call_finished"]


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_ids: list[int]
    text: str


@dataclasses.dataclass(frozen=True)
class TreeEvent:
    request_id: str
    kind: TreeEventKind
    task_path: tuple[int, ...]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FinishedEvent:
    request_id: str
    result: GenerationResult


Event = TokenEvent | TreeEvent | FinishedEvent


class EngineStats(BaseModel):
    """A snapshot of the engine (taken by the loop after each step; cheap to read from any thread)."""

    waiting: int = 0  # requests accepted but not yet holding a cache slot (queue depth)
    running: int = 0  # requests holding a cache slot
    parked: int = 0  # requests waiting on something outside the device (a tool call)
    kv_pages_used: int = 0  # pages slots own, and cached pages some slot maps
    kv_pages_free: int = 0  # the rest, unreferenced cached pages included (reclaimable)
    kv_pages_total: int = 0
    tokens_generated_total: int = 0  # tokens written for requests (sampled and forced), since start
    pruned_tokens_total: int = 0  # KV entries dropped by subtask pruning, since start
    tool_calls_total: int = 0
    requests_finished_total: int = 0
    preemptions_total: int = 0
    steps_total: int = 0
    warmup_shapes_left: int = 0  # step shapes a background warmup has still to compile
    prefix_cache_hit_tokens_total: int = 0  # prompt tokens mapped from cached pages instead of computed
    prefix_cache_pages: int = 0  # KV pages the prefix index holds (mapped or evictable)
    prefix_cache_evictions_total: int = 0  # cached pages reclaimed for the allocator (LRU)


class Detokenizer:
    """Incremental detokenization (vLLM's prefix/read offsets): each call decodes a short window, and text
    is released only once it no longer ends in a partial UTF-8 character."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded for context
        self.read = 0  # tokens whose text has been released

    def __call__(self, new_ids: list[int], final: bool = False) -> str:
        if self.tok is None:
            return ""
        self.ids += new_ids
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

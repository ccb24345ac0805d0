"""The controller protocol: what a sequence wants next (PLAN.md contract 1), and the host state of a sequence.

A controller is the per-sequence policy: after each sampled token (``on_token``) it says which tokens to
write next (the sampled one, grammar-forced ones, a tool result, ...), which cache slots to prune, whether
to finish, and whether to park (wait on something outside the device, polled with ``poll``). Any of its
methods may raise: the engine ends that sequence alone with ``finish_reason="error"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import numpy as np

from timjax.base.results import FinishReason, GenerationResult

SPEC = -1  # in ``SeqState.pending``: a sample still on the device (packed as is: the step reads it there)


@dataclasses.dataclass(frozen=True)
class PruneOp:
    """Remove slots [start, end) of one sequence's ``cached + pending`` (as left by the op before it)."""

    start: int
    end: int


@dataclasses.dataclass
class Action:
    """What a controller wants after a sampled token (or, from ``poll``, when it unparks)."""

    feed: list[int]  # tokens to write next (sampled + forced tokens, a tool result, ...; may be empty when done)
    finish: FinishReason | None = None
    error: str | None = None
    prune: list[PruneOp] = dataclasses.field(default_factory=list)
    park: bool = False  # after feed/prune are applied, the sequence waits until ``poll`` returns an Action


class Controller(Protocol):
    """Per-sequence policy. ``wants_mask`` controllers fill a packed token bitmask before each sample."""

    wants_mask: bool

    def fill_mask(self, out: np.ndarray) -> None: ...

    def on_token(self, token: int, seq: SeqState) -> Action: ...

    # Optional: called once per iteration, only while the sequence is parked; must not block.
    # None = still waiting; an Action unparks it (feed = e.g. the tool result's tokens).
    def poll(self, seq: SeqState) -> Action | None: ...

    def finish(self, seq: SeqState, result: GenerationResult) -> None: ...


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    controller: Controller | None = None
    reposition: str | None = None  # "reencode" / "shift" for this request's pruned spans; None = the engine's


@dataclasses.dataclass(eq=False)
class SeqState:
    """The host state of one sequence. ``cached`` are the token ids in its cache slot (slot order);
    ``pending`` are known tokens not written yet. A preempted sequence has no slot and ``cached == []``:
    its working memory moved back to ``pending`` and is written again when it resumes."""

    index: int  # the request's position: also its priority (lower = older = preempted last)
    request: Request
    controller: Controller
    pending: list[int]
    cached: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    parked: bool = False
    sampled: int = 0  # tokens sampled so far: with the seed, fixes each draw (also across preemption)
    started: float = 0.0
    first_token_s: float | None = None
    extend_time_s: float = 0.0
    reencoded: int = 0
    preemptions: int = 0
    peak_cached: int = 0  # the most tokens its cache slot held
    # prefix caching (timjax.engine.prefix_cache): the index pages its slot maps as its first pages, in order
    # (read-only: shared with other slots), and whether its next prompt page can no longer enter the index
    shared: list = dataclasses.field(default_factory=list)
    share_blocked: bool = False
    cached_prompt: int = 0  # prompt tokens its first admission mapped from the index (usage's cached tokens)
    # the open engine's bookkeeping (timjax.engine.loop): who hears about it, and when it must end
    request_id: str = ""
    handle: Any = None  # a RequestHandle (or None): gets token deltas, tree events and the result
    emitted: int = 0  # generated tokens already handed to the handle
    deadline: float | None = None  # time.monotonic() past which it ends with "timeout"
    on_token: Any = None  # Engine.run's callback(position, sampled token)
    on_finish: Any = None  # callback(seq, result) after the handle has the result (closing tools, ...)
    # steps launched but not collected yet (``timjax.engine.loop``, oldest first): their chunks are the first
    # ``flight`` tokens of ``pending``; a chunk's sample not read yet is a ``SPEC`` placeholder in ``pending``
    flights: list = dataclasses.field(default_factory=list)

    @property
    def working_tokens(self) -> int:
        return len(self.cached) + len(self.pending)

    @property
    def flight(self) -> int:
        """Pending tokens that steps in flight are writing."""
        f = self.flights  # read for every row several times a step: the common cases without a generator
        return 0 if not f else f[0].n if len(f) == 1 else sum(r.n for r in f)

    @property
    def device_len(self) -> int:
        """Tokens its slot holds once the steps in flight are done."""
        return len(self.cached) + self.flight

    @property
    def unfed(self) -> int:
        """Pending tokens no step has been launched with yet."""
        return len(self.pending) - self.flight


class PlainController:
    """Unconstrained generation: stop on an EOS id, a stop string, or the token budget."""

    wants_mask = False

    def __init__(self, *, max_new_tokens: int, stop_ids: Seq[int] = (), stop: Seq[str] = (), tokenizer: Any = None):
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(stop_ids)
        self.stop = list(stop)
        self.tokenizer = tokenizer
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass stop token ids instead")

    def fill_mask(self, out):  # pragma: no cover - never called (wants_mask is False)
        raise AssertionError

    def on_token(self, token: int, seq: SeqState) -> Action:
        seq.generated.append(token)
        if token in self.stop_ids:
            return Action(feed=[], finish="stop")
        if self.stop:
            tail = self.tokenizer.decode(seq.generated[-32:])
            if any(s in tail for s in self.stop):
                return Action(feed=[], finish="stop")
        if len(seq.generated) >= self.max_new_tokens:
            return Action(feed=[], finish="length")
        return Action(feed=[token])

    def finish(self, seq, result):
        if self.stop and result.finish_reason == "stop" and result.text is not None:
            cut = min((result.text.find(s) for s in self.stop if s in result.text), default=-1)
            if cut >= 0:
                result.text = result.text[:cut]

"""The per-sequence TIM controller: grammar, reasoning-tree tracker and subtask pruning, driven by the
engine one sampled token at a time.

For each sampled token: the grammar consumes it, the tracker places it in the tree (a token that
straddles a subtask list's ``[`` or ``]`` is replaced by the tokenization of its pieces, see
``timjax.tim.tree``), the tokens the grammar forces next are appended, and every completed subtask list
goes through the FIFO prune buffer; lists leaving the buffer become cache-slot ranges for the engine to
remove. Host only: no JAX here.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from timjax.engine.protocol import Action, PruneOp
from timjax.tim.grammar import GrammarError, fill_masks, llg_tokenizer, make_grammar, token_at
from timjax.tim.partial_json import close_partial_json
from timjax.tim.pruning import PruneBuffer, WorkingMemory, full_response, pruned_task_paths
from timjax.tim.schema import KEY_SEPARATOR, TimSchema
from timjax.tim.tree import ListCompleted, ListOpened, Split, ToolCallReady, TreeTracker


class TimController:
    """Schema-constrained TIM generation with subtask pruning for one sequence.

    ``pruning_buffer``: None turns pruning off; 0, 1, 2, ... is the FIFO buffer size.
    ``override``: replay mode for benchmarks: a function from the document bytes so far to the next
    token, used instead of the sampled token (the device steps are the same).
    ``tools``: a ``timjax.tools.runner.ToolSession``: when the model has written a tool use's
    ``"tool_result"`` key, the call is submitted and the sequence parks; ``poll`` resumes it with the
    tokens of ``": " + <encoded result>`` (and what the grammar forces after), so the model never samples
    inside ``tool_result``. Without a session the model writes ``tool_result`` itself.
    """

    wants_mask = True

    def __init__(
        self,
        model,
        schema: TimSchema,
        *,
        max_new_tokens: int,
        prompt_len: int,
        pruning_buffer: int | None = 2,
        stop_ids: Sequence[int] = (),
        override: Callable[[bytes], int] | None = None,
        tools=None,
    ):
        tok = model.tokenizer
        if tok is None:
            raise ValueError("TIM generation needs the model's tokenizer (load a checkpoint with tokenizer files)")
        eos = list(stop_ids) or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        self.schema = schema
        self.grammar = make_grammar(tok, schema.json_schema(), model.config.vocab_size, eos_token=eos or None)
        self._llt = llg_tokenizer(tok, model.config.vocab_size, eos or None)
        self.tracker = TreeTracker(self._llt.tokenize_bytes)
        self.buffer = PruneBuffer(pruning_buffer)
        self.memory = WorkingMemory([0] * prompt_len)  # slot numbering includes the prompt
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(eos)
        self.override = override
        self.host_time = 0.0
        self.pruned_lists: list[ListCompleted] = []
        if tools is not None and hasattr(tools, "session"):  # a ToolRunner: this inference's session
            tools = tools.session(count_tokens=lambda text: len(self._llt.tokenize_bytes(text.encode("utf-8"))))
        self.tools = tools  # ToolSession or None
        self._call = None  # the tool call the sequence is parked on
        self._answered_at: float | None = None  # when the last tool answer was fed (for resume_s)
        # the open engine's tree events: on_event(kind, task_path, **info) (timjax.engine.outputs.TreeEvent)
        self.on_event: Callable[..., None] | None = None

    def _emit(self, kind: str, task_path, **info) -> None:
        if self.on_event is not None:
            self.on_event(kind, tuple(task_path), **info)

    def fill_mask(self, out: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.grammar.fill_mask(out)
        self.host_time += time.perf_counter() - t0

    @staticmethod
    def fill_mask_batch(controllers: Sequence["TimController"], out: np.ndarray, rows: Sequence[int]) -> dict:
        """Every row's mask in one call on llguidance's threads (``timjax.tim.grammar.fill_masks``)."""
        t0 = time.perf_counter()
        errors = fill_masks([c.grammar for c in controllers], out, rows)
        share = (time.perf_counter() - t0) / max(1, len(controllers))
        for c in controllers:
            c.host_time += share
        return errors

    def _bytes(self, token: int) -> bytes:
        return self._llt.decode_bytes([token])

    def on_token(self, token: int, seq) -> Action:
        t0 = time.perf_counter()
        try:
            return self._on_token(token, seq)
        finally:
            self.host_time += time.perf_counter() - t0

    def _on_token(self, token: int, seq) -> Action:
        if self._answered_at is not None:  # the first sample after a tool answer
            self.tools.records[-1].resume_s = time.perf_counter() - self._answered_at
            self._answered_at = None
        if self.override is not None:
            token = self.override(bytes(self.tracker.buf))
        if self.tracker.done or token in self.stop_ids:
            if not self.tracker.done:
                return Action(feed=[], finish="grammar", error="end of sequence before the document was complete")
            return Action(feed=[], finish="stop")
        return self._advance([token], seq)

    def _advance(self, queue: list[int], seq) -> Action:
        """Consume ``queue`` (sampled, split or forced tokens, or a tool result) and what the grammar forces
        after it; park on a tool call."""
        feed: list[int] = []
        prune: list[PruneOp] = []
        while queue:
            t = queue.pop(0)
            try:
                self.grammar.consume([t])
            except GrammarError as e:
                return Action(feed=feed, finish="grammar", error=str(e), prune=prune)
            events = self.tracker.feed(t, self._bytes(t))
            if events and isinstance(events[0], Split):
                self.grammar.rollback(1)
                queue[0:0] = list(events[0].token_ids)
                continue
            feed.append(t)
            seq.generated.append(t)
            self.memory.append(t)
            for ev in events:
                if isinstance(ev, ListOpened):
                    self._emit("subtask_opened", ev.task_path)
                elif isinstance(ev, ListCompleted):
                    self._emit("subtask_closed", ev.task_path)
                    for lst in self.buffer.push(ev):
                        op = self.memory.prune(lst)
                        self.pruned_lists.append(lst)
                        if op.n_pruned:
                            prune.append(PruneOp(op.start_slot, op.end_slot))
                            self._emit("pruned", lst.task_path, tokens=op.n_pruned)
                elif isinstance(ev, ToolCallReady) and self.tools is not None:
                    # what is left of the queue was the model's try at the value: the runtime writes it
                    self._call = self.tools.submit(ev.tool_name, ev.parameters_json, ev.task_path)
                    self._emit("tool_call_started", ev.task_path, tool=ev.tool_name, index=self._call.index)
                    return Action(feed=feed, prune=prune, park=True)
            if len(self.memory.history) >= self.max_new_tokens and not self.tracker.done:
                break  # forced tokens count toward the budget too: stop at it, not after the forced run
            if not queue and not self.tracker.done:
                queue = list(self.grammar.forced_tokens())
        if self.tracker.done:
            return Action(feed=feed, finish="stop", prune=prune)
        if len(self.memory.history) >= self.max_new_tokens:
            return Action(feed=feed, finish="length", prune=prune)
        return Action(feed=feed, prune=prune)

    def poll(self, seq) -> Action | None:
        """While parked on a tool call: None until it is answered, then the result's tokens."""
        if self._call is None:
            return Action(feed=[])
        record = self.tools.poll(self._call)
        if record is None:
            return None
        t0 = time.perf_counter()
        self._emit("tool_call_finished", record.task_path, tool=record.tool, index=record.index, status=record.status)
        try:
            self._call = None
            ids = list(self._llt.tokenize_bytes((KEY_SEPARATOR + record.result).encode("utf-8")))
            record.result_tokens = len(ids)
            action = self._advance(ids, seq)
            self._answered_at = time.perf_counter()
            return action
        finally:
            self.host_time += time.perf_counter() - t0

    def finish(self, seq, result) -> None:
        if self._call is not None and self._call.future is not None:  # cancelled or timed out while parked
            self._call.future.cancel()
            self._call = None
        stats = self.memory.stats()
        generated_written = stats.history_len
        result.stats.peak_working_tokens = stats.peak_working_len
        result.stats.pruned_tokens = stats.pruned_tokens
        result.stats.pruned_share = stats.pruned_tokens / generated_written if generated_written else 0.0
        result.stats.prune_events = stats.prune_ops
        result.stats.host_time_s = self.host_time
        if self.tools is not None:
            calls = list(self.tools.records)
            result.tool_calls = calls
            result.stats.tool_calls = len(calls)
            result.stats.tool_errors = sum(c.status != "ok" for c in calls)
            result.stats.tool_time_s = sum(c.latency_s for c in calls)
        result.pruned_paths = sorted(pruned_task_paths(self.pruned_lists))
        result.working_memory = self.memory.kept_tokens(include_prompt=False)
        text = bytes(self.tracker.buf).decode("utf-8", errors="replace")
        result.text = text
        result.working_memory_text = b"".join(self._bytes(t) for t in result.working_memory).decode(
            "utf-8", errors="replace"
        )
        if self.tracker.done:
            try:
                result.response = full_response(self.schema, self.tracker)
            except ValueError as e:
                result.error = result.error or f"the document does not parse: {e}"
        else:
            result.partial_response = close_partial_json(text)


class ReplayText:
    """Replay source for ``TimController(override=...)``: the next token is the tokenizer's first token of
    the document's remaining bytes, so the runtime writes ``text`` through its real steps."""

    def __init__(self, text: str | bytes, llg_tok):
        self.data = text.encode() if isinstance(text, str) else text
        self.llt = llg_tok

    def __call__(self, written: bytes) -> int:
        if not self.data.startswith(written):
            raise ValueError("replay diverged from the document")
        return token_at(self.llt, self.data, len(written))

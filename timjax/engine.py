"""The host loop: continuous batching over the paged cache, with a per-sequence controller.

Every sequence holds a cache slot and a list of ``pending`` tokens (known but not yet in the cache). Each
iteration the engine feeds pending tokens to the device: rows with one pending token take the decode step,
rows with more (a prompt, forced grammar tokens, a re-encoded suffix, a tool result) take an extend step.
The device samples each row's next token; the host hands it to the sequence's controller, which says
what to feed next, whether to prune part of the cache, and whether the sequence is finished. Finished
sequences free their slot and pages, and a waiting prompt takes them.

Controllers that constrain sampling fill a packed token bitmask per row. For them the step is split in
two dispatches (forward, then sample) so the host fills masks while the device runs the forward.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timjax import steps
from timjax.cache import (check_invariants, compact_slot, create_cache, pages_for_budget, release,
                          truncate_slot)
from timjax.model import Qwen3
from timjax.results import FinishReason, GenerationResult, GenerationStats
from timjax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class PruneOp:
    """Remove cache slots [start, end) of one sequence."""

    start: int
    end: int


@dataclasses.dataclass
class Action:
    """What a controller wants after a sampled token."""

    feed: list[int]  # tokens to feed next (usually [token]; more with forced tokens; may be empty when done)
    finish: FinishReason | None = None
    error: str | None = None
    prune: list[PruneOp] = dataclasses.field(default_factory=list)
    park: bool = False  # after feed/prune are applied, the sequence waits (e.g. on a tool call) until ``poll``


class Controller(Protocol):
    """Per-sequence policy. ``wants_mask`` controllers fill a token bitmask before each sample."""

    wants_mask: bool

    def fill_mask(self, out: np.ndarray) -> None: ...

    def on_token(self, token: int, seq: "Sequence") -> Action: ...

    # Optional: called once per iteration, only while the sequence is parked; must not block.
    # None = still waiting; an Action unparks it (feed = e.g. the tool result's tokens).
    def poll(self, seq: "Sequence") -> Action | None: ...

    def finish(self, seq: "Sequence", result: GenerationResult) -> None: ...


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    controller: Controller | None = None


@dataclasses.dataclass
class Sequence:
    index: int
    request: Request
    slot: int
    controller: Controller
    pending: list[int]
    cached: list[int] = dataclasses.field(default_factory=list)  # token ids in the cache, in slot order
    generated: list[int] = dataclasses.field(default_factory=list)
    sampled: int = 0
    started: float = 0.0
    first_token_s: float | None = None
    extend_time_s: float = 0.0
    reencoded: int = 0
    parked: bool = False


class PlainController:
    """Unconstrained generation: stop on an EOS id, a stop string, or the token budget."""

    wants_mask = False

    def __init__(self, *, max_new_tokens: int, stop_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 tokenizer: Any = None):
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(stop_ids)
        self.stop = list(stop)
        self.tokenizer = tokenizer
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass stop token ids instead")

    def fill_mask(self, out):  # pragma: no cover - never called (wants_mask is False)
        raise AssertionError

    def on_token(self, token: int, seq: Sequence) -> Action:
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


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


class Engine:
    """Owns the cache and the compiled steps for one model; ``run`` serves a list of requests."""

    def __init__(self, model: Qwen3, *, max_batch: int = 8, page_size: int = 16, max_seq_len: int | None = None,
                 kv_tokens: int | None = None, kv_memory_fraction: float | None = None, impl: str = "auto",
                 max_chunk: int = 512, reposition: str = "reencode", check_cache: bool = False):
        if reposition not in ("reencode", "shift"):
            raise ValueError(f"reposition must be 'reencode' or 'shift', got {reposition!r}")
        self.model = model
        self.cfg = model.config
        self.params = model.params()
        self.impl = impl
        self.max_batch = max_batch
        self.max_chunk = _pow2(max_chunk)
        self.reposition = reposition
        self.check_cache = check_cache
        self.max_seq_len = min(max_seq_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        if kv_tokens is None and kv_memory_fraction is None:
            kv_tokens = max_batch * -(-self.max_seq_len // page_size) * page_size
        num_pages = pages_for_budget(self.cfg, model.dtype, page_size, tokens=kv_tokens,
                                     memory_fraction=kv_memory_fraction)
        self.cache = create_cache(self.cfg, num_pages=num_pages, page_size=page_size, max_seqs=max_batch,
                                  max_seq_len=self.max_seq_len, dtype=model.dtype)
        self.words = -(-self.cfg.vocab_size // 32)

    # -- device calls -----------------------------------------------------------------------------
    def _sampling(self, seqs: list[Sequence | None]) -> SamplingParams:
        host = SamplingParams.host(len(seqs))
        for i, s in enumerate(seqs):
            if s is not None:
                r = s.request
                host["temperature"][i], host["top_k"][i], host["top_p"][i] = r.temperature, r.top_k, r.top_p
                host["seed"][i], host["counter"][i] = r.seed, s.sampled
        return SamplingParams(**jax.device_put(host))

    def _dispatch(self, rows_seqs: list[Sequence | None], rows: np.ndarray, tokens: np.ndarray,
                  q_len: np.ndarray):
        """Run one step for these rows; returns a device array of sampled tokens (not yet synced)."""
        sampling = self._sampling(rows_seqs)
        ps = self.cache.page_size
        need = max(-(-(len(s.cached) + int(q_len[i])) // ps) for i, s in enumerate(rows_seqs) if s is not None)
        kv_pages = min(_pow2(need), self.cache.max_pages_per_seq)  # a few buckets: few compiles
        args = (self.params, self.cache, *jax.device_put((rows, tokens, q_len)))
        kw = dict(cfg=self.cfg, impl=self.impl, kv_pages=kv_pages)
        if any(s is not None and s.controller.wants_mask for s in rows_seqs):
            logits, self.cache = steps.logits_step(*args, **kw)
            mask = np.full((len(rows_seqs), self.words), -1, np.int32)  # filled while the device runs
            for i, s in enumerate(rows_seqs):
                if s is not None and s.controller.wants_mask and q_len[i] > 0:
                    s.controller.fill_mask(mask[i])
            return steps.sample_step(logits, sampling, jnp.asarray(mask))
        out, self.cache = steps.generate_step(*args, sampling, **kw)
        return out

    def _prune(self, seq: Sequence, ops: list[PruneOp]) -> None:
        """Apply prune ops in order; each names slots of ``cached + pending`` as left by the one before.
        Slots past the cache (tokens not fed yet) are dropped from ``pending`` without device work."""
        for op in ops:
            n = len(seq.cached)
            logical = seq.cached + seq.pending
            kept = logical[:op.start] + logical[op.end:]
            if op.start >= n:  # only unfed tokens
                seq.pending = kept[n:]
                continue
            if self.reposition == "reencode":
                # Drop the cache from the span on and feed the kept suffix again at compacted positions.
                seq.cached, seq.pending = kept[:op.start], kept[op.start:]
                seq.reencoded += max(n - op.end, 0)
                self.cache = truncate_slot(self.cache, jnp.int32(seq.slot), jnp.int32(op.start))
            else:
                end = min(op.end, n)
                self.cache = compact_slot(self.cache, jnp.int32(seq.slot), jnp.int32(op.start), jnp.int32(end),
                                          jnp.int32(n), rope_theta=self.cfg.rope_theta, impl=self.impl)
                seq.cached = kept[:n - (end - op.start)]
                seq.pending = kept[n - (end - op.start):]

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, requests: list[Request], *, on_token: Callable[[int, int], None] | None = None,
            progress: Any = None, on_step: Callable[["Engine", list[Sequence]], None] | None = None
            ) -> list[GenerationResult]:
        """Serve every request; ``on_step(engine, running)`` is called after each iteration (tests and
        tracing: the cache and every running sequence are consistent then)."""
        results: list[GenerationResult | None] = [None] * len(requests)
        waiting = deque(enumerate(requests))
        slots: list[Sequence | None] = [None] * self.max_batch
        tokenizer = self.model.tokenizer

        def finish(seq: Sequence, reason: FinishReason, error: str | None = None):
            elapsed = time.perf_counter() - seq.started
            n = len(seq.generated)
            result = GenerationResult(
                tokens=list(seq.generated),
                text=tokenizer.decode(seq.generated) if tokenizer is not None else None,
                finish_reason=reason, error=error,
                stats=GenerationStats(prompt_tokens=len(seq.request.prompt), generated_tokens=n, time_s=elapsed,
                                      tokens_per_s=n / elapsed if elapsed > 0 else 0.0,
                                      first_token_s=seq.first_token_s, reencoded_tokens=seq.reencoded,
                                      extend_time_s=seq.extend_time_s))
            seq.controller.finish(seq, result)
            results[seq.index] = result
            slots[seq.slot] = None
            if progress is not None:
                progress.update(1)
            return seq.slot

        parked_freed: list[int] = []

        def apply(s: Sequence, action: Action) -> bool:
            """Apply a controller's action; True when the sequence finished (its slot is to be released)."""
            s.pending += action.feed
            if action.prune:
                self._prune(s, action.prune)
            if action.finish is not None:
                finish(s, action.finish, action.error)
                return True
            if len(s.cached) + len(s.pending) > self.max_seq_len:
                finish(s, "length", f"the working memory reached max_seq_len={self.max_seq_len}")
                return True
            s.parked = action.park
            if not s.pending and not s.parked:
                finish(s, "error", "the controller fed no token and did not park or finish")
                return True
            return False

        while waiting or any(slots):
            for slot in range(self.max_batch):  # admit waiting prompts into free slots
                if slots[slot] is None and waiting:
                    index, req = waiting.popleft()
                    ctrl = req.controller or PlainController(max_new_tokens=req.max_new_tokens)
                    error = None
                    if not req.prompt:
                        error = "empty prompt"
                    elif len(req.prompt) >= self.max_seq_len:
                        error = f"prompt of {len(req.prompt)} tokens does not fit max_seq_len={self.max_seq_len}"
                    elif max(req.prompt) >= self.cfg.vocab_size or min(req.prompt) < 0:
                        error = f"prompt token id out of range [0, {self.cfg.vocab_size})"
                    seq = Sequence(index, req, slot, ctrl, pending=list(req.prompt), started=time.perf_counter())
                    if error:
                        finish(seq, "error", error)
                        continue
                    slots[slot] = seq
            live = [s for s in slots if s is not None]
            for s in live:  # parked sequences: ask their controller whether they can go on
                if s.parked:
                    poll = getattr(s.controller, "poll", None)
                    try:
                        action = poll(s) if poll is not None else Action(feed=[])
                    except Exception as e:  # noqa: BLE001 - one sequence's failure never takes down the others
                        parked_freed.append(finish(s, "error", f"controller.poll raised {type(e).__name__}: {e}"))
                        continue
                    if action is not None:
                        s.parked = False
                        if apply(s, action):
                            parked_freed.append(s.slot)
            if parked_freed:
                mask = np.zeros(self.max_batch, bool)
                mask[parked_freed] = True
                parked_freed.clear()
                self.cache = release(self.cache, jnp.asarray(mask))
            running = [s for s in slots if s is not None and not s.parked and s.pending]
            if not running:
                if any(slots):
                    time.sleep(0.001)  # every live sequence waits on something outside the device
                continue
            extend = [s for s in running if len(s.pending) > 1]
            decode = [s for s in running if len(s.pending) == 1]
            outputs = []
            if extend:
                t0 = time.perf_counter()
                R = _pow2(len(extend))
                T = _pow2(min(max(len(s.pending) for s in extend), self.max_chunk), lo=16)
                rows = np.zeros(R, np.int32)
                tokens = np.zeros((R, T), np.int32)
                q_len = np.zeros(R, np.int32)
                row_seqs: list[Sequence | None] = [None] * R
                for i, s in enumerate(extend):
                    chunk = s.pending[:T]
                    rows[i], q_len[i], row_seqs[i] = s.slot, len(chunk), s
                    tokens[i, :len(chunk)] = chunk
                rows[len(extend):] = extend[0].slot  # padding rows: q_len 0, write nothing
                outputs.append((row_seqs, q_len, self._dispatch(row_seqs, rows, tokens, q_len), t0))
            if decode:
                rows = np.arange(self.max_batch, dtype=np.int32)
                tokens = np.zeros((self.max_batch, 1), np.int32)
                q_len = np.zeros(self.max_batch, np.int32)
                row_seqs = [None] * self.max_batch
                for s in decode:
                    tokens[s.slot, 0], q_len[s.slot], row_seqs[s.slot] = s.pending[0], 1, s
                outputs.append((row_seqs, q_len, self._dispatch(row_seqs, rows, tokens, q_len), None))

            # the one host sync of the step
            oom, *sampled_all = jax.device_get((self.cache.oom, *[o[2] for o in outputs]))
            freed = np.zeros(self.max_batch, bool)
            retry = np.zeros(self.max_batch, bool)
            if oom.any():
                # Fail only the biggest holder; the others wrote nothing this step and retry once its pages are back.
                flagged = [s for s in running if oom[s.slot]]
                victim = max(flagged, key=lambda s: len(s.cached) + len(s.pending))
                retry[[s.slot for s in flagged if s is not victim]] = True
                freed[finish(victim, "error", f"KV cache out of pages after {len(victim.cached)} tokens (pool of "
                                              f"{self.cache.num_pages} pages of {self.cache.page_size})")] = True
            for (row_seqs, q_len, _, t0), sampled in zip(outputs, sampled_all):
                if t0 is not None:
                    elapsed = time.perf_counter() - t0
                for i, s in enumerate(row_seqs):
                    if s is None or q_len[i] == 0 or freed[s.slot] or retry[s.slot]:
                        continue
                    if t0 is not None:
                        s.extend_time_s += elapsed
                    s.cached += s.pending[:q_len[i]]
                    s.pending = s.pending[q_len[i]:]
                    if s.pending:  # a chunk of a longer extend: the sample is not needed
                        continue
                    token = int(sampled[i])
                    s.sampled += 1
                    if s.first_token_s is None:
                        s.first_token_s = time.perf_counter() - s.started
                    try:
                        action = s.controller.on_token(token, s)
                    except Exception as e:  # one sequence's failure never takes down the others
                        freed[finish(s, "error", f"{type(e).__name__}: {e}")] = True
                        continue
                    if on_token is not None:
                        on_token(s.index, token)
                    if apply(s, action):
                        freed[s.slot] = True
            if freed.any() or retry.any():
                self.cache = release(self.cache, jnp.asarray(freed), jnp.asarray(retry))
            if self.check_cache:
                check_invariants(self.cache)
            if on_step is not None:
                on_step(self, [s for s in slots if s is not None])
        return results  # type: ignore[return-value]

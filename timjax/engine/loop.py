"""The loop's state across steps: the scheduler over every live sequence, and one iteration of it.

Each iteration: poll parked sequences; plan (admission, budget, preemption); launch the ragged step; fill
grammar masks while it runs; collect (the one sync); hand each sampled token to its controller and apply
its action; hand the new tokens to each sequence's handle. A controller's exception, or non-finite logits,
end that sequence alone with ``finish_reason="error"``; the others go on. Sequences join (``admit``) and
leave (``finish``: done, cancelled, timed out) only between two iterations; a finished sequence's slot is
released by the next step's edits, or by ``release_idle`` once nothing is live.

Only the thread that owns the engine calls into this module.
"""

from __future__ import annotations

import time

import numpy as np

from timjax.base.results import FinishReason, GenerationResult, GenerationStats
from timjax.engine.outputs import EngineStats
from timjax.engine.overlap import OverlapPolicy
from timjax.engine.protocol import SPEC, Action, SeqState
from timjax.engine.runner import Runner
from timjax.engine.scheduler import Row, Scheduler


class Loop:
    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int,
        max_seq_len: int,
        max_step_tokens: int,
        tokenizer,
        overlap: bool | str = "auto",
    ):
        self.runner = runner
        self.policy = OverlapPolicy(overlap)
        self.prev = None  # overlap: the step whose sample is in flight (a ``Launched``)
        self._waited = 0.0  # this iteration's time blocked on the device
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        cache = runner.cache
        self.sched = Scheduler(
            slots=cache.max_seqs,
            max_batch=max_batch,
            num_pages=cache.num_pages,
            page_size=cache.page_size,
            max_step_tokens=max_step_tokens,
            prefix=runner.prefix,
        )
        self.counters = {"iterations": 0, "dispatches": 0, "tokens": 0, "computed": 0, "preemptions": 0}
        # overlap: rows launched on a sample not read yet whose write was kept / voided by the controller
        self.counters.update(spec_kept=0, spec_voided=0)
        self.totals = EngineStats(kv_pages_total=cache.num_pages, kv_pages_free=cache.num_pages)
        self.dirty = False  # a slot was freed since the last step: its pages go back with the next edits
        self.vocab = runner.cfg.vocab_size

    # -- joining and leaving ----------------------------------------------------------------------
    def admit(self, seq: SeqState) -> None:
        req = seq.request
        if not req.prompt:
            self.finish(seq, "error", "empty prompt")
        elif len(req.prompt) >= self.max_seq_len:
            self.finish(seq, "error", f"prompt of {len(req.prompt)} tokens does not fit max_seq_len={self.max_seq_len}")
        elif max(req.prompt) >= self.vocab or min(req.prompt) < 0:
            self.finish(seq, "error", f"prompt token id out of range [0, {self.vocab})")
        else:
            self.sched.add(seq)

    def live(self) -> list[SeqState]:
        return self.sched.live()

    def release_idle(self) -> None:
        """Nothing is live: return every page now (no step would carry the releases) and drop edits meant
        for sequences that are gone."""
        if self.dirty:
            self.runner.compactions.clear()
            if self.runner.prefix is not None:
                self.runner.prefix.maps.clear()  # their sequences are gone
            self.runner.release(np.ones(self.runner.slots, bool))
            self.dirty = False
            self.snapshot()

    # -- one iteration ----------------------------------------------------------------------------
    def iteration(self) -> bool:
        """One step; False when no sequence could run (every live one waits on something off the device).

        With ``overlap`` the step's sample stays in flight: the next iteration plans and launches its step
        first (a decode row's input is that sample, read on the device: ``SPEC``) and only then syncs and
        runs the controllers on it, so the host's bookkeeping of step N runs while the device computes step
        N+1. A controller's answer that the speculation did not foresee (forced tokens, a prune, a tool
        call, the end) voids that row of step N+1: the row joins one step later; the others go on.
        Whether to overlap is ``OverlapPolicy``'s call (``timjax.engine.overlap``)."""
        t0, self._waited = time.perf_counter(), 0.0
        ran = self._iteration()
        self.policy.iteration(time.perf_counter() - t0 - self._waited)
        return ran

    def _iteration(self) -> bool:
        self.poll_parked()
        if self.prev is not None and self.prev.want_pages:  # its page table is read before another step
            self.drain()
        plan = self.sched.plan()
        for seq, msg in plan.failed:
            self.finish(seq, "error", msg)
        self.counters["preemptions"] += len(plan.preempted)
        if not plan.rows:
            if self.prev is not None:
                self.drain()
                return True
            if self.dirty:  # no step to carry the releases (every live sequence waits): release them now
                self.runner.release(np.array([s is None for s in self.sched.slots]))
                self.dirty = False
            return False
        prev, self.prev = self.prev, None
        step = self.runner.launch(plan.rows, self.sched.slots, self.sched.evictions(plan.rows), prev)
        step.dispatched_s = time.perf_counter()
        self.dirty = False  # the step's edits released every freed slot
        for row in step.rows:
            row.seq.flights.append(row)
            if row.samples:
                row.seq.pending.append(SPEC)
        if prev is not None:
            self.finish_step(prev)  # while the device runs ``step``
        mask_errors = self.fill_masks(step.rows, step.mask) if step.mask is not None else {}
        step.mask_errors = mask_errors
        self.runner.sample(step)
        if self.policy.overlap():
            self.prev = step
        else:
            self.finish_step(step)
        return True

    def drain(self) -> None:
        """Sync and hand over the step in flight, if any (before reading the cache, or going idle)."""
        if self.prev is not None:
            prev, self.prev = self.prev, None
            self.finish_step(prev)

    def finish_step(self, step) -> None:
        """The sync of a sampled step, then each (not voided) row's tokens to its sequence and controller."""
        t0 = time.perf_counter()
        tokens, bad, oom, page_table = self.runner.collect(step)
        self._waited += time.perf_counter() - t0
        self.policy.synced(getattr(step, "dispatched_s", t0))
        elapsed = time.perf_counter() - step.launched_s
        st = self.counters
        st["iterations"] += 1
        st["dispatches"] = self.runner.dispatches
        st["tokens"] += step.tokens
        st["computed"] += step.computed
        errors = getattr(step, "mask_errors", {})
        for row in step.rows:
            if row.void:
                continue
            slot = row.seq.slot
            pages = page_table[slot] if page_table is not None else None
            self.after_step(
                row, int(tokens[slot]), bool(bad[slot]), bool(oom[slot]), errors.get(id(row.seq)), elapsed, pages
            )

    def fill_masks(self, rows: list[Row], mask: np.ndarray) -> dict[int, str]:
        """Runs while the device computes the forward. A failing fill leaves its row unmasked; that
        sequence ends with the error after the sync. Controllers of a class with ``fill_mask_batch`` are
        filled together, one call per class (TIM: llguidance's threads); one at a time if that call fails."""
        todo = [r for r in rows if r.samples and not (r.void or r.void_sample) and r.seq.controller.wants_mask]
        groups: dict = {}
        single: list[Row] = []
        for r in todo:
            c = r.seq.controller
            batch = getattr(type(c), "fill_mask_batch", None) if "fill_mask" not in vars(c) else None
            (groups.setdefault(batch, []) if batch is not None else single).append(r)
        errors = {}
        for batch, rs in groups.items():
            try:
                failed = batch([r.seq.controller for r in rs], mask, [r.seq.slot for r in rs])
            except Exception:  # noqa: BLE001 - fill them one by one: a failure stays with its own row
                single += rs
                continue
            for i, msg in failed.items():
                errors[id(rs[i].seq)] = f"controller.fill_mask failed: {msg}"
        for r in single:
            try:
                r.seq.controller.fill_mask(mask[r.seq.slot])
            except Exception as e:  # noqa: BLE001 - one sequence's failure never takes down the others
                errors[id(r.seq)] = f"controller.fill_mask raised {type(e).__name__}: {e}"
        return errors

    def after_step(
        self, row: Row, token: int, bad: bool, oom: bool, mask_error: str | None, elapsed: float, pages=None
    ):
        """``pages``: the slot's page table row when its full prompt pages may enter the prefix index."""
        s = row.seq
        assert s.flights and s.flights[0] is row, "steps are collected in launch order"
        s.flights.pop(0)
        if oom:  # the scheduler's page count rules this out: an internal error, reported, not hidden
            return self.finish(s, "error", "internal: the KV allocator refused pages the scheduler counted as free")
        assert SPEC not in s.pending[: row.n], "a chunk's speculated token was not resolved before its sync"
        s.cached += s.pending[: row.n]
        s.pending = s.pending[row.n :]
        if pages is not None:  # before the controller: it may prune or finish the sequence
            self.runner.prefix.register(s, pages)
        s.peak_cached = max(s.peak_cached, len(s.cached))
        if row.n > 1:
            s.extend_time_s += elapsed
        if not row.samples or row.void_sample:  # a chunk of a longer write, or forced tokens come first
            return None
        if mask_error:
            return self.finish(s, "error", mask_error)
        if bad:
            return self.finish(
                s,
                "error",
                f"non-finite logits (NaN or inf) after {len(s.cached)} cached tokens: "
                "the model's weights or activations are not finite",
            )
        s.sampled += 1
        if s.first_token_s is None:
            s.first_token_s = time.perf_counter() - s.started
        nxt = s.flights[0] if s.flights else None  # its row in the step launched after this one
        assert all(t == SPEC for t in s.pending), "a sampling row's chunk ends its pending tokens"
        s.flights, s.pending = [], []  # the placeholders go; ``apply`` writes what the controller wants
        if nxt is not None:
            nxt.void = True  # unless the controller's answer is what the speculation assumed (below)
        try:
            action = s.controller.on_token(token, s)
        except Exception as e:  # noqa: BLE001
            return self.finish(s, "error", f"controller.on_token raised {type(e).__name__}: {e}")
        if s.on_token is not None:
            s.on_token(token)
        self.apply(s, action)
        self.policy.answered(s.slot is not None and not s.parked and not action.prune and s.pending == [token])
        if nxt is not None:
            self.keep_or_void(s, nxt, token, action)
        return None

    def keep_or_void(self, s: SeqState, nxt: Row, token: int, action: Action) -> None:
        """``nxt`` (launched with ``token`` before the controller saw it) stays void unless the controller
        wrote ``token`` next and nothing else moved: no park, no prune, still resident."""
        keep = s.slot is not None and not s.parked and not action.prune and s.pending[:1] == [token]
        self.counters["spec_kept" if keep else "spec_voided"] += 1
        if not keep:
            return
        nxt.void = False  # the step in flight wrote the right token
        s.flights = [nxt]
        if s.pending == [token]:
            s.pending.append(SPEC)  # and its sample is the sequence's next one
        else:
            nxt.void_sample = True  # forced tokens come before the next sample

    def poll_parked(self) -> None:
        for s in [s for s in self.sched.live() if s.parked]:
            poll = getattr(s.controller, "poll", None)
            if poll is None:
                self.finish(s, "error", "the controller parked the sequence but has no poll method")
                continue
            try:
                action = poll(s)
            except Exception as e:  # noqa: BLE001
                self.finish(s, "error", f"controller.poll raised {type(e).__name__}: {e}")
                continue
            if action is not None:
                self.sched.unpark(s)
                self.apply(s, action)

    def apply(self, s: SeqState, action: Action) -> None:
        """A controller's action: feed, prune, then finish, park, or go on."""
        max_new = s.request.max_new_tokens
        try:
            s.pending += [int(t) for t in action.feed]
            if action.prune:
                self.runner.prune(s, action.prune)
        except Exception as e:  # noqa: BLE001 - a bad feed or prune op is that controller's fault
            return self.finish(s, "error", f"the controller's action could not be applied: {type(e).__name__}: {e}")
        if action.finish is not None:
            return self.finish(s, action.finish, action.error)
        if len(s.generated) >= max_new:  # the hard cap on tokens written, forced ones included
            return self.finish(s, "length")
        if s.working_tokens > self.max_seq_len:
            return self.finish(s, "length", f"the working memory reached max_seq_len={self.max_seq_len}")
        s.parked = action.park
        if s.parked and s.slot is None:
            self.sched.remove(s)  # waiting while parked: not admitted until poll unparks it
            self.sched.parked_waiting.append(s)
        if not s.pending and not s.parked:
            return self.finish(s, "error", "the controller fed no token and did not park or finish")
        self.emit(s)
        return None

    def emit(self, s: SeqState) -> None:
        """Hand the tokens written since the last call to the sequence's handle."""
        end = min(len(s.generated), s.request.max_new_tokens)
        if end > s.emitted:
            new = s.generated[s.emitted : end]
            s.emitted = end
            self.totals.tokens_generated_total += len(new)
            if s.handle is not None:
                s.handle._push_tokens(new)

    # -- the end of a sequence --------------------------------------------------------------------
    def finish(self, s: SeqState, reason: FinishReason, error: str | None = None) -> None:
        if s.slot is not None:
            self.dirty = True
        for row in s.flights:  # a step in flight wrote for it: nothing of it is read
            row.void = True
        s.flights = []
        s.pending = [t for t in s.pending if t != SPEC]
        self.sched.remove(s)
        s.parked = False
        result = self._result(s, reason, error)
        try:
            s.controller.finish(s, result)
        except Exception as e:  # noqa: BLE001
            result.finish_reason = "error"
            result.error = f"controller.finish raised {type(e).__name__}: {e}" + (f" (after: {error})" if error else "")
        result.stats.peak_working_tokens = s.peak_cached  # what the cache held, whatever a controller counted
        self.emit(s)
        t = self.totals
        t.requests_finished_total += 1
        t.pruned_tokens_total += result.stats.pruned_tokens
        t.tool_calls_total += result.stats.tool_calls
        if s.handle is not None:
            s.handle._finish(result)
        if s.on_finish is not None:
            s.on_finish(s, result)

    def _result(self, s: SeqState, reason: FinishReason, error: str | None) -> GenerationResult:
        elapsed = time.perf_counter() - s.started
        tokens = s.generated[: s.request.max_new_tokens]
        tok = self.tokenizer
        return GenerationResult(
            tokens=tokens,
            text=tok.decode(tokens) if tok is not None else None,
            finish_reason=reason,
            error=error,
            stats=GenerationStats(
                prompt_tokens=len(s.request.prompt),
                generated_tokens=len(tokens),
                time_s=elapsed,
                tokens_per_s=len(tokens) / elapsed if elapsed > 0 else 0.0,
                first_token_s=s.first_token_s,
                cached_prompt_tokens=s.cached_prompt,
                reencoded_tokens=s.reencoded,
                extend_time_s=s.extend_time_s,
                peak_working_tokens=s.peak_cached,
                preemptions=s.preemptions,
            ),
        )

    def snapshot(self, waiting_extra: int = 0) -> EngineStats:
        """The stats as of now (the loop thread calls this after each step)."""
        sched, t = self.sched, self.totals
        resident = sched.resident
        used = sched.used_pages()
        prefix = self.runner.prefix
        return t.model_copy(
            update=dict(
                waiting=len(sched.waiting) + waiting_extra,
                running=len(resident),
                parked=sum(s.parked for s in resident) + len(sched.parked_waiting),
                kv_pages_used=used,
                kv_pages_free=sched.num_pages - used,
                preemptions_total=self.counters["preemptions"],
                steps_total=self.counters["iterations"],
                prefix_cache_hit_tokens_total=prefix.hit_tokens_total if prefix else 0,
                prefix_cache_pages=prefix.held if prefix else 0,
                prefix_cache_evictions_total=prefix.evictions_total if prefix else 0,
            )
        )

"""The engine: one loop over the scheduler (what runs), the runner (how it runs on the device) and the
controllers (what each sequence wants next).

Each iteration: poll parked sequences; plan (admission, budget, preemption); launch the ragged step; fill
grammar masks while it runs; collect (the one sync); hand each sampled token to its controller and apply
its action. A controller's exception, or non-finite logits, end that sequence alone with
``finish_reason="error"``; the batch goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from timjax.buckets import bucket, cdiv, pow2
from timjax.cache import check_invariants, pages_for_budget, release
from timjax.engine.protocol import Action, PlainController, Request, SeqState
from timjax.engine.runner import Runner
from timjax.engine.scheduler import Row, Scheduler
from timjax.model import Qwen3
from timjax.results import FinishReason, GenerationResult, GenerationStats


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Engine:
    """Owns the paged cache and the compiled steps for one model; serves many ``run`` / ``generate`` calls.

    Shapes come from buckets (slots: a power of two >= ``max_batch``; pages per sequence: a power of two;
    the pool: ``timjax.buckets.bucket`` pages unless ``kv_tokens`` fixes it), so one engine, or engines
    built with nearby settings, reuse the same compiled steps. ``max_step_tokens`` is the per-step token
    budget (long prompts are chunked against it).
    """

    def __init__(
        self,
        model: Qwen3,
        *,
        max_batch: int = 8,
        page_size: int = 16,
        max_seq_len: int | None = None,
        kv_tokens: int | None = None,
        kv_memory_fraction: float | None = None,
        impl: str = "auto",
        max_step_tokens: int = 512,
        reposition: str = "reencode",
        check_cache: bool = False,
    ):
        for name, value in (("max_batch", max_batch), ("page_size", page_size), ("max_step_tokens", max_step_tokens)):
            _positive(name, value)
        if reposition not in ("reencode", "shift"):
            raise ValueError(f"reposition must be 'reencode' or 'shift', got {reposition!r}")
        self.model = model
        self.cfg = model.config
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        _positive("max_seq_len", self.max_seq_len)
        self.max_step_tokens = max(max_step_tokens, max_batch)
        self.reposition = reposition
        self.check_cache = check_cache
        if kv_tokens is None and kv_memory_fraction is None:
            num_pages = bucket(max_batch * cdiv(self.max_seq_len, page_size))
        else:
            num_pages = pages_for_budget(
                self.cfg, model.dtype, page_size, tokens=kv_tokens, memory_fraction=kv_memory_fraction
            )
            if kv_tokens is None and getattr(model, "mesh", None) is not None:
                num_pages *= model.mesh.shape["tp"]  # a device holds 1/tp of every page (its kv heads)
        self.runner = Runner(
            model,
            max_batch=pow2(max_batch),
            page_size=page_size,
            max_seq_len=pow2(cdiv(self.max_seq_len, page_size)) * page_size,
            num_pages=num_pages,
            impl=impl,
        )
        self.stats = {"iterations": 0, "dispatches": 0, "tokens": 0, "computed": 0, "preemptions": 0}

    # -- what tests and benchmarks look at --------------------------------------------------------
    @property
    def cache(self):
        return self.runner.cache

    @property
    def impl(self) -> str:
        return self.runner.impl

    def generate(self, prompt, **kwargs):
        """``timjax.generate`` on this engine (no new cache, no recompilation)."""
        from timjax.api import generate

        return generate(self, prompt, **kwargs)

    # -- the loop ---------------------------------------------------------------------------------
    def run(
        self,
        requests: list[Request],
        *,
        on_token: Callable[[int, int], None] | None = None,
        progress: Any = None,
        on_step: Callable[[Engine, list[SeqState]], None] | None = None,
        reposition: str | None = None,
    ) -> list[GenerationResult]:
        """Serve every request; ``on_step(engine, running)`` is called after each iteration (tests and
        tracing: the cache and every resident sequence are consistent then)."""
        run = _Run(self, requests, on_token, progress, reposition or self.reposition)
        while run.sched.live():
            run.iteration()
            if self.check_cache:
                check_invariants(self.cache)
            if on_step is not None:
                on_step(self, run.sched.resident)
        run.flush_edits()
        return run.results  # type: ignore[return-value]


class _Run:
    """The state of one ``Engine.run``: the scheduler over its requests and their results."""

    def __init__(self, engine: Engine, requests: list[Request], on_token, progress, reposition: str):
        self.engine, self.runner, self.on_token, self.progress = engine, engine.runner, on_token, progress
        if reposition not in ("reencode", "shift"):
            raise ValueError(f"reposition must be 'reencode' or 'shift', got {reposition!r}")
        self.runner.reposition = reposition
        self.results: list[GenerationResult | None] = [None] * len(requests)
        cache = self.runner.cache
        self.sched = Scheduler(
            slots=cache.max_seqs,
            max_batch=engine.max_batch,
            num_pages=cache.num_pages,
            page_size=cache.page_size,
            max_step_tokens=engine.max_step_tokens,
        )
        vocab = engine.cfg.vocab_size
        for i, req in enumerate(requests):
            ctrl = req.controller or PlainController(max_new_tokens=req.max_new_tokens)
            seq = SeqState(i, req, ctrl, pending=list(req.prompt), started=time.perf_counter())
            if not req.prompt:
                self.finish(seq, "error", "empty prompt")
            elif len(req.prompt) >= engine.max_seq_len:
                self.finish(
                    seq, "error", f"prompt of {len(req.prompt)} tokens does not fit max_seq_len={engine.max_seq_len}"
                )
            elif max(req.prompt) >= vocab or min(req.prompt) < 0:
                self.finish(seq, "error", f"prompt token id out of range [0, {vocab})")
            else:
                self.sched.add(seq)

    # -- one iteration ----------------------------------------------------------------------------
    def iteration(self) -> None:
        self.poll_parked()
        plan = self.sched.plan()
        for seq, msg in plan.failed:
            self.finish(seq, "error", msg)
        self.engine.stats["preemptions"] += len(plan.preempted)
        if not plan.rows:
            if self.sched.live():
                time.sleep(0.001)  # every live sequence waits on something outside the device
            return
        t0 = time.perf_counter()
        step = self.runner.launch(plan.rows, self.sched.slots)
        mask_errors = self.fill_masks(step.rows, step.mask) if step.mask is not None else {}
        tokens, bad, oom = self.runner.collect(step)
        elapsed = time.perf_counter() - t0
        st = self.engine.stats
        st["iterations"] += 1
        st["dispatches"] = self.runner.dispatches
        st["tokens"] += step.tokens
        st["computed"] += step.computed
        for row in plan.rows:
            self.after_step(
                row,
                int(tokens[row.seq.slot]),
                bool(bad[row.seq.slot]),
                bool(oom[row.seq.slot]),
                mask_errors.get(row.seq.index),
                elapsed,
            )

    def fill_masks(self, rows: list[Row], mask: np.ndarray) -> dict[int, str]:
        """Runs while the device computes the forward. A failing fill leaves its row unmasked; that
        sequence ends with the error after the sync."""
        errors = {}
        for r in rows:
            if r.samples and r.seq.controller.wants_mask:
                try:
                    r.seq.controller.fill_mask(mask[r.seq.slot])
                except Exception as e:  # noqa: BLE001 - one sequence's failure never takes down the others
                    errors[r.seq.index] = f"controller.fill_mask raised {type(e).__name__}: {e}"
        return errors

    def after_step(self, row: Row, token: int, bad: bool, oom: bool, mask_error: str | None, elapsed: float):
        s = row.seq
        if oom:  # the scheduler's page count rules this out: an internal error, reported, not hidden
            return self.finish(s, "error", "internal: the KV allocator refused pages the scheduler counted as free")
        s.cached += s.pending[: row.n]
        s.pending = s.pending[row.n :]
        s.peak_cached = max(s.peak_cached, len(s.cached))
        if row.n > 1:
            s.extend_time_s += elapsed
        if not row.samples:  # a chunk of a longer write: the sample is not needed
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
        try:
            action = s.controller.on_token(token, s)
        except Exception as e:  # noqa: BLE001
            return self.finish(s, "error", f"controller.on_token raised {type(e).__name__}: {e}")
        if self.on_token is not None:
            self.on_token(s.index, token)
        return self.apply(s, action)

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
        if s.working_tokens > self.engine.max_seq_len:
            return self.finish(s, "length", f"the working memory reached max_seq_len={self.engine.max_seq_len}")
        s.parked = action.park
        if s.parked and s.slot is None:
            self.sched.remove(s)  # waiting while parked: not admitted until poll unparks it
            self.sched.parked_waiting.append(s)
        if not s.pending and not s.parked:
            return self.finish(s, "error", "the controller fed no token and did not park or finish")
        return None

    # -- the end of a sequence --------------------------------------------------------------------
    def finish(self, s: SeqState, reason: FinishReason, error: str | None = None) -> None:
        self.sched.remove(s)
        elapsed = time.perf_counter() - s.started
        tokens = s.generated[: s.request.max_new_tokens]
        tok = self.engine.model.tokenizer
        result = GenerationResult(
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
                reencoded_tokens=s.reencoded,
                extend_time_s=s.extend_time_s,
                peak_working_tokens=s.peak_cached,
                preemptions=s.preemptions,
            ),
        )
        try:
            s.controller.finish(s, result)
        except Exception as e:  # noqa: BLE001
            result.finish_reason = "error"
            result.error = f"controller.finish raised {type(e).__name__}: {e}" + (f" (after: {error})" if error else "")
        result.stats.peak_working_tokens = s.peak_cached  # what the cache held, whatever a controller counted
        self.results[s.index] = result
        if self.progress is not None:
            self.progress.update(1)

    def flush_edits(self) -> None:
        """Every sequence has finished: return all pages now, in one call (the next run's first step would
        otherwise do it), and drop edits meant for sequences that are gone."""
        self.runner.compactions.clear()
        self.runner.cache = release(self.runner.cache, jnp.ones(self.runner.slots, bool))

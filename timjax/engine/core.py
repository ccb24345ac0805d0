"""``Engine``: the open engine. One loop owns the device; requests join, stream and leave while it runs.

Modelled on vLLM v1's EngineCore / AsyncLLM split, in one process:

- ``engine.add_request(prompt, params=None, request_id=None) -> RequestHandle``: thread-safe, returns at
  once; the request joins at the next step boundary. ``params`` is a ``RequestParams`` (or a dict of its
  fields), checked here: a bad field raises ``ParameterError`` naming it. A full waiting queue
  (``max_waiting`` requests accepted but not yet holding a cache slot) raises ``EngineFull``; a stopped
  engine raises ``EngineStopped``. Requests with tool servers to connect open them on a worker thread.
- ``engine.step()``: one iteration (take new requests, aborts and deadlines; schedule; one ragged step;
  controllers; hand outputs to the handles). ``engine.start()`` runs steps on one background thread that
  owns the device from then on; ``engine.stop(drain=True, timeout=None)`` finishes the running requests
  (or, ``drain=False`` / past ``timeout``, cancels them) and joins it.
- ``engine.abort(ids)`` / ``handle.cancel()``: the request ends at the next boundary with
  ``finish_reason="cancelled"``; ``RequestParams.timeout_s`` ends it with ``"timeout"``. Either way its
  pages go back with the next step and a parked tool call is cancelled (the tool session is closed).
- ``engine.stats()``: an ``EngineStats`` snapshot (queue depth, running, parked, KV pages, totals).
- ``engine.run(requests)``: the closed-batch convenience (``timjax.generate`` uses it): add every
  ``Request`` and collect the results in order; it drives the steps itself on a stopped engine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from timjax.base.buckets import bucket, cdiv, pow2
from timjax.base.errors import EngineFull, EngineStopped
from timjax.base.results import GenerationResult, GenerationStats
from timjax.base.validation import check_overlap, fail
from timjax.engine.controllers import build_request, check_for_model, open_tools
from timjax.engine.handle import RequestHandle
from timjax.engine.loop import Loop
from timjax.engine.outputs import EngineStats
from timjax.engine.params import RequestParams
from timjax.engine.protocol import PlainController, Request, SeqState
from timjax.engine.runner import Runner
from timjax.runtime.cache import check_invariants, pages_for_budget

log = logging.getLogger(__name__)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Engine:
    """Owns the paged cache and the compiled steps for one model; serves requests as they come.

    Shapes come from buckets (slots: a power of two >= ``max_batch``; pages per sequence: a power of two;
    the pool: ``timjax.base.buckets.bucket`` pages unless ``kv_tokens`` fixes it), so one engine, or engines
    built with nearby settings, reuse the same compiled steps. ``max_step_tokens`` is the per-step token
    budget (long prompts are chunked against it). ``max_waiting`` bounds the waiting queue.
    ``prefix_cache``: full pages of prompt tokens are cached and shared by requests that start with the
    same tokens (``timjax.engine.prefix_cache``); False computes every prompt from scratch.
    ``overlap``: launch each step before the host has read the one before (``timjax.engine.loop``): True,
    False (sync every step), or "auto" (``timjax.engine.overlap``: measured, where it pays). The tokens are
    the same in every mode.
    """

    def __init__(
        self,
        model,
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
        max_waiting: int = 1024,
        prefix_cache: bool = True,
        overlap: bool | str = "auto",
    ):
        for name, value in (
            ("max_batch", max_batch),
            ("page_size", page_size),
            ("max_step_tokens", max_step_tokens),
            ("max_waiting", max_waiting),
        ):
            _positive(name, value)
        if reposition not in ("reencode", "shift"):
            raise ValueError(f"reposition must be 'reencode' or 'shift', got {reposition!r}")
        check_overlap("overlap", overlap)
        self.model = model
        self.cfg = model.config
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        _positive("max_seq_len", self.max_seq_len)
        self.max_step_tokens = max(max_step_tokens, max_batch)
        self.reposition = reposition
        self.check_cache = check_cache
        self.max_waiting = max_waiting
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
            reposition=reposition,
            prefix_cache=prefix_cache,
        )
        self.loop = Loop(
            self.runner,
            max_batch=max_batch,
            max_seq_len=self.max_seq_len,
            max_step_tokens=self.max_step_tokens,
            tokenizer=model.tokenizer,
            overlap=overlap,
        )
        # shared with other threads, under _lock: the inbox, aborts, ids in flight, tool openings
        self._lock = threading.Lock()
        self._inbox: deque[SeqState] = deque()
        self._aborts: set[str] = set()
        self._ids: dict[str, SeqState | None] = {}  # accepted and not finished (None: not enqueued yet)
        self._opening: dict[str, bool] = {}  # tools being connected: request id -> cancelled
        self._index = itertools.count()  # arrival order = priority (older is preempted last)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._draining = False
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._warm_jobs: deque[tuple[int, int, bool, bool]] = deque()  # background warmup: shapes left to compile
        self._stats = self.loop.snapshot()
        self.failure: BaseException | None = None  # the last exception a step raised (the loop goes on)

    # -- what tests and benchmarks look at --------------------------------------------------------
    @property
    def cache(self):
        return self.runner.cache

    @property
    def impl(self) -> str:
        return self.runner.impl

    @property
    def counters(self) -> dict[str, int]:
        """Iterations, dispatches, tokens packed, tokens computed (with padding), preemptions."""
        return self.loop.counters

    def check_invariants(self) -> None:
        """Audit the pages (tests): every page free, owned by one slot, or held by the prefix index, once;
        each cached page's reference count equals the slots that map it."""
        prefix = self.runner.prefix
        if prefix is None:
            return check_invariants(self.cache)
        check_invariants(self.cache, prefix.pages(), prefix.dev_borrowed)
        prefix.check(self.loop.live())

    def stats(self) -> EngineStats:
        with self._lock:
            extra = len(self._inbox) + len(self._opening)
            warm = len(self._warm_jobs)
        return self._stats.model_copy(update={"waiting": self._stats.waiting + extra, "warmup_shapes_left": warm})

    # -- the door ---------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: RequestParams | dict | None = None, request_id: str | None = None
    ) -> RequestHandle:
        params = RequestParams.coerce(params)
        check_for_model(self.model, params)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        self._reserve(rid, bounded=True)
        handle = RequestHandle(rid, self, self.model.tokenizer)
        deadline = time.monotonic() + params.timeout_s if params.timeout_s is not None else None
        if params.tools is not None and not hasattr(params.tools, "session"):  # servers to connect first
            with self._lock:
                self._opening[rid] = False
            self._pool().submit(self._open_then_enqueue, prompt, params, handle, deadline)
            return handle
        try:
            req = build_request(self.model, prompt, params, tools_runner=params.tools)
        except BaseException:
            with self._lock:
                self._ids.pop(rid, None)
            raise
        self._enqueue(req, handle, deadline)
        return handle

    def add(self, request: Request, request_id: str | None = None, timeout_s: float | None = None) -> RequestHandle:
        """The lower door: an engine ``Request`` with its own controller (replays, custom policies); the
        same queue bound, streams and aborts as ``add_request``."""
        rid = request_id if request_id is not None else uuid.uuid4().hex
        self._reserve(rid, bounded=True)
        handle = RequestHandle(rid, self, self.model.tokenizer)
        self._enqueue(request, handle, time.monotonic() + timeout_s if timeout_s is not None else None)
        return handle

    def abort(self, request_ids) -> None:
        """End these requests at the next step boundary (``finish_reason="cancelled"``); unknown or
        finished ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        with self._lock:
            for rid in request_ids:
                if rid in self._opening:
                    self._opening[rid] = True
                elif rid in self._ids:
                    self._aborts.add(rid)
        self._wake.set()

    def _reserve(self, rid: str, *, bounded: bool, closed_ok: bool = False) -> None:
        if not isinstance(rid, str) or not rid:
            raise fail("request_id", rid, "expected a non-empty string or None")
        with self._lock:
            if self._closed and not closed_ok:
                raise EngineStopped("the engine is stopping or stopped: no new requests")
            if rid in self._ids:
                raise fail("request_id", rid, "a request with this id is still running")
            queued = self._stats.waiting + len(self._inbox) + len(self._opening)
            if bounded and queued >= self.max_waiting:
                raise EngineFull(f"the engine's waiting queue is full ({queued} of max_waiting={self.max_waiting})")
            self._ids[rid] = None

    def _enqueue(self, req: Request, handle: RequestHandle, deadline: float | None, close=None, on_token=None):
        ctrl = req.controller or PlainController(max_new_tokens=req.max_new_tokens)
        seq = SeqState(
            next(self._index),
            req,
            ctrl,
            pending=list(req.prompt),
            started=time.perf_counter(),
            request_id=handle.request_id,
            handle=handle,
            deadline=deadline,
            on_token=on_token,
            on_finish=lambda s, r: self._finished(s, close),
        )
        if hasattr(ctrl, "on_event"):  # the TIM controller's tree events go to the handle
            ctrl.on_event = handle._push_tree
        with self._lock:
            self._ids[handle.request_id] = seq
            self._inbox.append(seq)
        self._wake.set()
        return seq

    def _finished(self, seq: SeqState, close: Callable[[], None] | None) -> None:
        with self._lock:
            self._ids.pop(seq.request_id, None)
        if close is not None:
            self._pool().submit(close)  # closing MCP clients may block: never on the loop thread

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._workers is None:
                self._workers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="timjax-tools")
            return self._workers

    def _open_then_enqueue(self, prompt, params: RequestParams, handle: RequestHandle, deadline) -> None:
        """On a worker thread: connect the request's tool servers, build its controller, enqueue it."""
        close = None
        try:
            runner, close = open_tools(params)
            req = build_request(self.model, prompt, params, tools_runner=runner)
        except Exception as e:  # noqa: BLE001 - a tool server that cannot start fails its request alone
            if close is not None:
                close()
            return self._end_unqueued(handle, "error", f"the request's tools could not be opened: {e}")
        with self._lock:
            cancelled = self._opening.pop(handle.request_id, False)
        if cancelled or (deadline is not None and time.monotonic() >= deadline):
            if close is not None:
                close()
            return self._end_unqueued(handle, "cancelled" if cancelled else "timeout", None)
        self._enqueue(req, handle, deadline, close)

    def _end_unqueued(self, handle: RequestHandle, reason, error: str | None) -> None:
        with self._lock:
            self._opening.pop(handle.request_id, None)
            self._ids.pop(handle.request_id, None)
        stats = GenerationStats(prompt_tokens=0, generated_tokens=0, time_s=0.0, tokens_per_s=0.0)
        handle._finish(GenerationResult(tokens=[], finish_reason=reason, error=error, stats=stats))

    # -- the loop ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration; False when nothing ran on the device (idle, or every live request waits on a
        tool). Only the thread that owns the engine may call it."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine's loop thread owns the device: call stop() before step()")
        self._take_inbox()
        ran = self.loop.iteration() if self.loop.live() or self.loop.prev is not None else False
        if self.check_cache:  # waits for the step in flight (overlap stays on: its bookkeeping is tested too)
            self.check_invariants()
        if not self.loop.live():
            self.loop.drain()
            self.loop.release_idle()
        self._stats = self.loop.snapshot()
        return ran

    def _take_inbox(self) -> None:
        with self._lock:
            new, aborts = list(self._inbox), self._aborts
            self._inbox.clear()
            self._aborts = set()
            seqs = [self._ids.get(rid) for rid in aborts]
        for seq in new:
            self.loop.admit(seq)
        for seq in seqs:
            if seq is not None and seq.request_id in self._ids:
                self.loop.finish(seq, "cancelled", "cancelled by the client")
        now = time.monotonic()
        for seq in self.loop.live():
            if seq.deadline is not None and now >= seq.deadline:
                self.loop.finish(seq, "timeout", "the request's deadline (timeout_s) passed")

    def _busy(self) -> bool:
        return bool(self._inbox or self._aborts or self.loop.live())

    def warmup(self, *, progress: bool = False, masked: bool = True, background: bool = False) -> int:
        """Compile every step shape this engine can take (each packed-length bucket up to
        ``max_step_tokens`` times each KV window; with ``masked`` also the grammar-masked variant), so that
        no request waits on a compile: a server's requests arrive at staggered moments and meet many shapes
        that a batch run never does. Smallest shapes first (decode steps), the ones a request meets first.

        ``background=False``: now, before ``start`` (a progress bar with ``progress``). ``background=True``:
        the loop thread compiles one shape at a time whenever no request is live, so the engine serves at
        once and a request waits on at most the one compile in progress (``stats().warmup_shapes_left``).
        Returns the number of shapes."""
        if self.loop.live() or (self._thread is not None and not background):
            raise RuntimeError("Engine.warmup runs before any request (and, unless background, before start())")
        variants = (False, True) if masked else (False,)
        jobs = [(n, w, m, d) for n, w, d in self.runner.step_shapes(self.max_step_tokens) for m in variants]
        if background:
            with self._lock:
                self._warm_jobs.extend(jobs)
            self._wake.set()
            return len(jobs)
        from tqdm.auto import tqdm

        for job in tqdm(jobs, desc="compiling steps", unit="shape", disable=not progress):
            self._warm(job)
        return len(jobs)

    def _warm(self, job: tuple[int, int, bool, bool]) -> None:
        self.loop.release_idle()  # the warm step releases every slot: drop what finished sequences left
        n, window, masked, decode = job
        self.runner.warm(n, window, masked=masked, shift=self.reposition == "shift", decode=decode)

    def _warm_one_if_idle(self) -> bool:
        """The loop thread, nothing live: compile the next background-warmup shape, if any."""
        with self._lock:
            if not self._warm_jobs or self._inbox or self._aborts or self._opening:
                return False
            job = self._warm_jobs.popleft()
        self._warm(job)
        return True

    def start(self) -> None:
        """Run the loop on a background thread (it owns the device until ``stop``)."""
        with self._lock:
            if self._thread is not None:
                return
            self._closed = self._draining = False
            self._thread = threading.Thread(target=self._serve, name="timjax-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._wake.clear()
            if not self._busy():
                with self._lock:
                    opening = bool(self._opening)
                if self._draining and not opening:
                    return
                try:
                    if self._warm_one_if_idle():
                        continue
                except Exception:  # noqa: BLE001 - a shape that fails to compile now fails its request later
                    log.exception("background warmup failed; the remaining shapes compile when first met")
                    with self._lock:
                        self._warm_jobs.clear()
                self._wake.wait(0.05)
                continue
            try:
                ran = self.step()
            except Exception as e:  # noqa: BLE001 - fail what is live, keep serving
                self._fail_live(e)
                continue
            if not ran and self.loop.live():  # every live request waits on a tool: do not spin
                self._wake.wait(0.001)

    def _fail_live(self, e: BaseException) -> None:
        log.exception("engine step failed")
        self.failure = e
        for seq in self.loop.live():
            try:
                self.loop.finish(seq, "error", f"internal: the engine step raised {type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                log.exception("finishing a request after a failed step")

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; ``drain``: let the accepted ones finish (those left after ``timeout``
        seconds are cancelled); else cancel them now. Joins the loop thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if not drain:
            self._abort_all()
        if thread is None:
            t_end = None if timeout is None else time.monotonic() + timeout
            while self._busy() or self._opening:
                if t_end is not None and time.monotonic() > t_end:
                    self._abort_all()
                    t_end = None
                if not self.step():
                    time.sleep(0.001)
        else:
            self._draining = True
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                self._abort_all()
                thread.join()
            self._thread = None
        if self._workers is not None:
            self._workers.shutdown(wait=False)
            self._workers = None

    def _abort_all(self) -> None:
        with self._lock:
            ids = list(self._ids)
        self.abort(ids)

    def run(
        self,
        requests: list[Request],
        *,
        on_token: Callable[[int, int], None] | None = None,
        progress: Any = None,
        on_step: Callable[[Engine, list[SeqState]], None] | None = None,
        reposition: str | None = None,
    ) -> list[GenerationResult]:
        """Serve every request and return the results in order (add + collect). ``on_token(i, token)`` hears
        each sampled token of request i; ``on_step(engine, resident)`` is called after each iteration on a
        stopped engine (tests and tracing: the cache and every resident sequence are consistent then)."""
        if reposition is not None and reposition not in ("reencode", "shift"):
            raise ValueError(f"reposition must be 'reencode' or 'shift', got {reposition!r}")
        running = self._thread is not None
        if running and on_step is not None:
            raise RuntimeError("on_step needs a stopped engine (run() then drives the steps itself)")
        handles = []
        tag = uuid.uuid4().hex[:8]
        for i, req in enumerate(requests):
            if reposition is not None and req.reposition is None:
                req = dataclasses.replace(req, reposition=reposition)
            rid = f"run-{tag}-{i}"
            self._reserve(rid, bounded=False, closed_ok=not running)  # a stopped engine serves run() itself
            h = RequestHandle(rid, self, stream=False)
            close = (lambda: progress.update(1)) if progress is not None else None
            tok_cb = (lambda t, i=i: on_token(i, t)) if on_token is not None else None
            seq = self._enqueue(req, h, None, on_token=tok_cb)
            if close is not None:
                seq.on_finish = lambda s, r, c=close: (self._finished(s, None), c())
            handles.append(h)
        if running:
            return [h.result() for h in handles]
        while not all(h.done for h in handles):
            if not self.step():
                time.sleep(0.001)  # every live sequence waits on something outside the device
            if on_step is not None:
                self.loop.drain()  # the cache and the host agree only with no step in flight
                on_step(self, self.loop.sched.resident)
        return [h.result() for h in handles]

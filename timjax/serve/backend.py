"""The server's one door to the engine: ``Backend.submit(GenRequest) -> Job``; nothing else in
``timjax.serve`` imports the engine, the model or the controllers.

INTERIM (issue 20 not landed yet): the open engine (``engine.add_request`` -> handle) is being built
beside this module. Until it lands, ``Backend`` drives today's closed-batch ``Engine.run`` from one
background thread: it takes every queued request, runs them as one batch (continuous batching inside
the batch), and starts the next batch with what arrived meanwhile. A request that arrives while a batch
runs waits for that batch to end. Cancellation, client disconnects and deadlines work already: each
request's controller is wrapped by ``_Watched``, which ends the sequence at its next token (or poll, when
parked on a tool) so the engine frees its pages. Streaming comes from the engine's ``on_step`` hook
(every resident sequence's new tokens after each iteration). Switching to the open engine touches only
this module: ``submit`` becomes ``engine.add_request`` and the thread goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger(__name__)

CANCELED = "canceled by the client"
TIMED_OUT = "the run's timeout passed"


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests: the route answers 429 with Retry-After."""


class RequestRejected(ValueError):
    """A request the engine cannot take (prompt too long, bad schema...): the route answers 400 naming it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class GenRequest:
    """What a route asks the engine for, already validated and tokenized."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    schema: Any = None  # a timjax.tim.schema.TimSchema: a TIM request (reasoning tree, pruning, tools)
    pruning_buffer: int | None = 2
    tools: Any = None  # a ToolRunner-like object (timjax.serve.tools.ToolSet) the controller calls
    timeout_s: float | None = None  # deadline from submission; the request ends with TIMED_OUT
    on_close: Callable[[], None] | None = None  # called once when the job ends (closes per-request tools)


@dataclasses.dataclass
class Delta:
    text: str
    tokens: list[int]


class Job:
    """One request's handle: status, async events (``Delta``s then the final result), ``cancel()``."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop, request_id: str | None = None):
        self.id = request_id or uuid.uuid4().hex
        self.request = request
        self.status = "queued"  # queued | running | succeeded | failed | canceled | timed_out
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.result = None  # GenerationResult once done
        self.cancelled = False
        self.deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()
        self._sent_tokens = 0
        self._sent_text = ""
        self._on_cancel: Callable[[Job], None] | None = None

    def cancel(self) -> None:
        """Ends the request at its next step (its pages are freed then); a queued one ends now."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def done(self) -> bool:
        return self.result is not None

    async def events(self) -> AsyncIterator[Delta | Any]:
        """``Delta``s as tokens come, then the ``GenerationResult`` (the last item)."""
        while True:
            ev = await self._events.get()
            yield ev
            if not isinstance(ev, Delta):
                return

    async def wait(self):
        await self._done.wait()
        return self.result

    # -- called on the engine thread
    def _push(self, item) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    def _emit_tokens(self, tokens: list[int], tokenizer) -> None:
        """New tokens since the last call as a text delta; a trailing partial UTF-8 character waits."""
        if len(tokens) <= self._sent_tokens or tokenizer is None:
            return
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd"):
            return
        new = tokens[self._sent_tokens :]
        self._sent_tokens = len(tokens)
        delta = text[len(self._sent_text) :] if text.startswith(self._sent_text) else text
        self._sent_text = text
        self._push(Delta(delta, new))

    def _finish(self, result) -> None:
        if result.error == CANCELED:
            self.status = "canceled"
        elif result.error == TIMED_OUT:
            self.status = "timed_out"
        else:
            self.status = "failed" if result.finish_reason == "error" else "succeeded"
        self.finished = time.time()
        self.result = result
        self._push(result)
        self._loop.call_soon_threadsafe(self._done.set)


class _Watched:
    """A controller that ends its sequence when the job is cancelled or past its deadline, checked at each
    token and each poll while parked on a tool (so a cancelled request frees its pages within a step)."""

    def __init__(self, inner, job: Job):
        self.inner, self.job = inner, job
        self.wants_mask = inner.wants_mask

    def _stop_reason(self) -> str | None:
        if self.job.cancelled:
            return CANCELED
        if self.job.deadline is not None and time.monotonic() > self.job.deadline:
            return TIMED_OUT
        return None

    def fill_mask(self, out) -> None:
        self.inner.fill_mask(out)

    def on_token(self, token: int, seq):
        from timjax.engine.protocol import Action

        why = self._stop_reason()
        if why is not None:
            return Action(feed=[], finish="error", error=why)
        return self.inner.on_token(token, seq)

    def poll(self, seq):
        from timjax.engine.protocol import Action

        why = self._stop_reason()
        if why is not None:
            return Action(feed=[], finish="error", error=why)
        return self.inner.poll(seq)

    def finish(self, seq, result) -> None:
        self.inner.finish(seq, result)
        why = self._stop_reason() if result.finish_reason == "error" else None
        if why is not None:  # the reason the watcher gave, not what the inner controller wrote over it
            result.error = why


class Backend:
    """The engine behind the routes (see the module docstring). Thread-safe ``submit``; ``start`` /
    ``stop(drain, timeout)``; ``stats()`` for /metrics."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        page_size: int = 16,
        impl: str = "auto",
        reposition: str = "reencode",
        engine_options: dict | None = None,
        on_finish: Callable[[Job], None] | None = None,
    ):
        from timjax.engine import Engine

        self.model = model
        self.tokenizer = model.tokenizer
        self.engine = Engine(
            model,
            max_batch=max_batch,
            page_size=page_size,
            max_seq_len=max_seq_len,
            impl=impl,
            reposition=reposition,
            **(engine_options or {}),
        )
        self.max_seq_len = self.engine.max_seq_len
        self.max_queue = max_queue
        self.on_finish = on_finish
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: dict[int, Job] = {}
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.pages_used = 0
        self.pages_total = self.engine.cache.num_pages
        self.page_size = page_size

    # -- building requests (HTTP side: errors here become 400s)
    def stop_ids(self) -> list[int]:
        ids = list(self.model.config.eos_token_ids)
        tok = self.tokenizer
        if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        return ids

    def encode_chat(self, messages: list[dict], *, system: str | None = None) -> list[int]:
        """Token ids of a conversation through the checkpoint's chat template (the generation prompt added)."""
        tok = self.tokenizer
        if tok is None:
            raise RequestRejected("this model has no tokenizer: text requests cannot be served", "messages")
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant: "
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _controller(self, req: GenRequest):
        from timjax.engine.protocol import PlainController

        if req.schema is None:
            return PlainController(
                max_new_tokens=req.max_new_tokens, stop_ids=self.stop_ids(), stop=req.stop, tokenizer=self.tokenizer
            )
        from timjax.tim_controller import TimController

        try:
            return TimController(
                self.model,
                req.schema,
                max_new_tokens=req.max_new_tokens,
                prompt_len=len(req.prompt),
                pruning_buffer=req.pruning_buffer,
                stop_ids=self.stop_ids(),
                tools=req.tools,
            )
        except (ValueError, RuntimeError) as e:  # llguidance refuses the schema (GrammarError is a RuntimeError)
            raise RequestRejected(f"the response schema cannot be compiled: {e}", "response_format") from None

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop, request_id: str | None = None) -> Job:
        """Queue a request (returns at once; its events go to ``loop``). Raises ``RequestRejected`` or
        ``QueueFull``. Builds the controller (a schema's grammar): call it off the event loop."""
        if len(req.prompt) + 1 > self.max_seq_len:
            raise RequestRejected(
                f"the prompt has {len(req.prompt)} tokens; this server's context is {self.max_seq_len} tokens",
                "messages",
            )
        if self._stopping:
            raise QueueFull("the server is shutting down")
        ctrl = self._controller(req)
        job = Job(req, loop, request_id)
        job._controller = _Watched(ctrl, job)
        job._on_cancel = self._cancel_queued
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue})")
            self._queue.append(job)
            self._cond.notify()
        return job

    # -- the engine thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="timjax-engine", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; with ``drain`` finish the queued and running ones (up to ``timeout``
        seconds, then cancel what is left), else cancel them now."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify()
        if not drain:
            self._cancel_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._cancel_all()
                self._thread.join(10)

    def _cancel_queued(self, job: Job) -> None:
        with self._cond:
            if job not in self._queue:
                return  # running (the watcher ends it at its next step) or done
            self._queue.remove(job)
        job._finish(_failed(job.request, CANCELED))
        self._closed(job)

    def _cancel_all(self) -> None:
        with self._cond:
            jobs = list(self._queue) + list(self._running.values())
        for j in jobs:
            j.cancel()

    def stats(self) -> dict:
        with self._cond:
            return {
                "queued": len(self._queue),
                "running": len(self._running),
                "kv_pages_used": self.pages_used,
                "kv_pages_free": self.pages_total - self.pages_used,
            }

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            if self._stopping and not self._drain:
                return None
            jobs = list(self._queue)
            self._queue.clear()
        return jobs

    def _loop(self) -> None:
        from timjax.engine import Request

        while (jobs := self._take_batch()) is not None:
            for j in [j for j in jobs if j.cancelled]:  # cancelled while queued: never started
                j._finish(_failed(j.request, CANCELED))
                self._closed(j)
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            with self._cond:
                self._running = dict(enumerate(jobs))
            requests = []
            for j in jobs:
                j.status, j.started = "running", time.time()
                r = j.request
                requests.append(
                    Request(r.prompt, r.max_new_tokens, r.temperature, 0, r.top_p, r.seed, controller=j._controller)
                )
            try:
                results = self.engine.run(requests, on_step=self._on_step)
            except Exception as e:  # noqa: BLE001 - the engine failed: every request of the batch fails, loudly
                log.exception("engine run failed")
                results = [_failed(r, f"internal error: {type(e).__name__}: {e}") for r in requests]
            with self._cond:
                self._running = {}
                self.pages_used = 0
            for j, res in zip(jobs, results):
                if res.tokens:
                    j._emit_tokens(res.tokens, self.tokenizer)
                j._finish(res)
                self._closed(j)

    def _closed(self, job: Job) -> None:
        if job.request.on_close is not None:
            try:
                job.request.on_close()
            except Exception:  # noqa: BLE001
                log.exception("closing a request's tools failed")
        if self.on_finish is not None:
            self.on_finish(job)

    def _on_step(self, engine, resident) -> None:
        used = 0
        for seq in resident:
            used += -(-len(seq.cached) // self.page_size)
            job = self._running.get(seq.index)
            if job is not None:
                job._emit_tokens(list(seq.generated), self.tokenizer)
        self.pages_used = used


def _failed(request, message: str):
    from timjax.results import GenerationResult, GenerationStats

    return GenerationResult(
        tokens=[],
        finish_reason="error",
        error=message,
        stats=GenerationStats(prompt_tokens=len(request.prompt), generated_tokens=0, time_s=0.0, tokens_per_s=0.0),
    )


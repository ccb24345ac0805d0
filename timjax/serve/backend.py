"""The server's one door to the engine: ``Backend.submit(GenRequest) -> Job``; nothing else in
``timjax.serve`` imports the engine.

The engine is the open engine (``timjax.engine.Engine``): its loop runs on its own thread and owns the
device; ``submit`` is ``engine.add_request(prompt, RequestParams)``, so a request joins the running batch at
the next step boundary. A ``Job`` wraps the engine's ``RequestHandle`` for the HTTP side: one asyncio task
per job (``Job.attach``) reads the handle's events on the server's event loop, turns ``TokenEvent``s into
``Delta``s for the routes, tracks the status (queued -> running at the first token -> succeeded / failed /
canceled / timed_out from the result's ``finish_reason``) and, once the request ends, closes its
per-request tools and records its metrics. Cancel and client disconnects are ``handle.cancel()``; a run's
deadline is ``RequestParams.timeout_s``; a full waiting queue is the engine's ``EngineFull`` (-> 429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's waiting queue is full (``--max-queue``): the route answers 429 with Retry-After."""


class ShuttingDown(Exception):
    """The engine stopped taking requests (SIGTERM): the route answers 503."""


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
    schema: Any = None  # a timjax.tim.schema.TimSchema (tools included): a TIM request
    pruning_buffer: int | None = 2
    tools: Any = None  # a ToolRunner-like object (timjax.serve.tools.ToolSet) the controller calls
    timeout_s: float | None = None  # deadline from submission; the request ends timed_out
    on_close: Callable[[], None] | None = None  # called once when the job ends (closes per-request tools)
    kind: str = "text"  # "tim" (a reasoning tree), "text", "json" (response_format without TIM), "tools"
    # a route's own engine controller (JSON-constrained output), built in ``submit`` off the event loop;
    # its errors are 400s naming ``controller_param``
    make_controller: Callable[[], Any] | None = None
    controller_param: str | None = None


@dataclasses.dataclass
class Delta:
    text: str
    tokens: list[int]


_STATUS = {"cancelled": "canceled", "timeout": "timed_out", "error": "failed"}


class Job:
    """One request as the routes see it: status, async events (``Delta``s then the final result),
    ``wait()``, ``cancel()``."""

    def __init__(self, request: GenRequest, handle, on_end: Callable[[Job], None]):
        self.id = handle.request_id
        self.request = request
        self.handle = handle
        self.status = "queued"  # queued | running | succeeded | failed | canceled | timed_out
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.result = None  # the GenerationResult once done
        self._on_end = on_end
        self._events: asyncio.Queue = asyncio.Queue()
        self._done = asyncio.Event()
        self._task: asyncio.Task | None = None

    def attach(self) -> None:
        """Start reading the handle on the running event loop (call once, right after submit)."""
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        from timjax.engine import FinishedEvent, TokenEvent

        try:
            async for ev in self.handle:
                if isinstance(ev, TokenEvent):
                    if self.status == "queued":
                        self.status, self.started = "running", time.time()
                    if ev.token_ids or ev.text:
                        self._events.put_nowait(Delta(ev.text, list(ev.token_ids)))
                elif isinstance(ev, FinishedEvent):
                    self._finish(ev.result)
        except asyncio.CancelledError:  # the server's loop is going away: end the request with it
            self.handle.cancel()
            raise

    def _finish(self, result) -> None:
        self.status = _STATUS.get(result.finish_reason, "succeeded")
        self.finished = time.time()
        self.result = result
        self._events.put_nowait(result)
        self._done.set()
        self._on_end(self)

    def cancel(self) -> None:
        """Ends the request at the engine's next step (its pages are freed then)."""
        self.handle.cancel()

    @property
    def done(self) -> bool:
        return self.result is not None

    async def events(self) -> AsyncIterator[Delta | Any]:
        """``Delta``s as tokens come, then the ``GenerationResult`` (the last item). One consumer. The
        deltas that queued up while the consumer was busy (sending the last chunk) come as one: under load
        a stream sends fewer, longer chunks instead of falling further behind, one chunk per token."""
        q = self._events
        while True:
            ev = await q.get()
            while isinstance(ev, Delta) and not q.empty():
                nxt = q.get_nowait()
                if not isinstance(nxt, Delta):
                    yield ev
                    ev = nxt
                    break
                ev = Delta(ev.text + nxt.text, ev.tokens + nxt.tokens)
            yield ev
            if not isinstance(ev, Delta):
                return

    async def wait(self):
        await self._done.wait()
        return self.result


class Backend:
    """The open engine behind the routes (see the module docstring). ``submit`` (thread-safe, blocking
    for a schema's grammar: call it off the event loop); ``start`` / ``stop(drain, timeout)``; ``stats()``."""

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
            max_waiting=max_queue,
            **(engine_options or {}),
        )
        self.max_seq_len = self.engine.max_seq_len
        self.max_queue = max_queue
        self.on_finish = on_finish

    # -- building requests (HTTP side: errors here become 400s)
    def encode_chat(self, messages: list[dict], *, system: str | None = None, tools: list | None = None) -> list[int]:
        """Token ids of a conversation through the checkpoint's chat template (the generation prompt added);
        ``tools`` (OpenAI function definitions) go to the template's ``tools`` argument."""
        tok = self.tokenizer
        if tok is None:
            raise RequestRejected("this model has no tokenizer: text requests cannot be served", "messages")
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        if getattr(tok, "chat_template", None):
            kw = {"tools": tools} if tools else {}
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        else:
            text = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in msgs) + "\nassistant: "
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def submit(self, req: GenRequest, request_id: str | None = None) -> Job:
        """Add a request to the engine (it joins the running batch at the next step). Raises
        ``RequestRejected``, ``QueueFull`` or ``ShuttingDown``. Call ``job.attach()`` on the event loop next."""
        from timjax.base.errors import ParameterError
        from timjax.engine import EngineFull, EngineStopped, Request, RequestParams

        if len(req.prompt) + 1 > self.max_seq_len:
            raise RequestRejected(
                f"the prompt has {len(req.prompt)} tokens; this server's context is {self.max_seq_len} tokens",
                "messages",
            )
        rid = request_id or uuid.uuid4().hex
        try:
            if req.make_controller is not None:  # the engine's lower door: a Request with its own controller
                try:
                    ctrl = req.make_controller()
                except (ValueError, RuntimeError) as e:
                    raise RequestRejected(f"invalid {req.controller_param}: {e}", req.controller_param) from None
                r = Request(req.prompt, req.max_new_tokens, req.temperature, 0, req.top_p, req.seed, ctrl)
                handle = self.engine.add(r, rid, timeout_s=req.timeout_s)
            else:
                params = RequestParams(
                    max_new_tokens=req.max_new_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                    stop=tuple(req.stop),
                    schema=req.schema,
                    tools=req.tools,
                    pruning_buffer=req.pruning_buffer if req.schema is not None else None,
                    timeout_s=req.timeout_s,
                )
                handle = self.engine.add_request(req.prompt, params, rid)
        except EngineFull as e:
            raise QueueFull(str(e)) from None
        except EngineStopped as e:
            raise ShuttingDown(str(e)) from None
        except RequestRejected:
            raise
        except ParameterError as e:
            raise RequestRejected(str(e), getattr(e, "name", None)) from None
        except (ValueError, RuntimeError) as e:  # llguidance refuses the schema (GrammarError is a RuntimeError)
            raise RequestRejected(f"the response schema cannot be compiled: {e}", "response_format") from None
        return Job(req, handle, self._ended)

    def _ended(self, job: Job) -> None:
        if job.request.on_close is not None:
            try:
                job.request.on_close()
            except Exception:  # noqa: BLE001
                log.exception("closing a request's tools failed")
        if self.on_finish is not None:
            self.on_finish(job)

    # -- the engine's loop thread
    def start(self) -> None:
        self.engine.start()

    def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; with ``drain`` finish the queued and running ones (up to ``timeout``
        seconds, then cancel what is left), else cancel them now."""
        self.engine.stop(drain=drain, timeout=timeout)

    def stats(self) -> dict:
        """The engine's own ``EngineStats`` (taken by its loop after each step), with ``queued`` for the
        waiting queue's depth."""
        s = self.engine.stats().model_dump()
        s["queued"] = s["waiting"]
        return s

"""A request's handle: what ``Engine.add_request`` returns.

The engine's loop thread pushes into the handle (``_push_tokens``, ``_push_tree``, ``_finish``); any other
thread reads it:

- ``for event in handle`` (blocking) or ``async for event in handle`` (from an asyncio loop on any thread:
  the loop thread hands events over with ``loop.call_soon_threadsafe``). One consumer per handle: the first
  ``async for`` moves what was buffered into its asyncio queue.
- ``handle.result(timeout=None)`` / ``await handle.aresult()``: the final ``GenerationResult`` (independent
  of the event stream; reading both is fine).
- ``handle.cancel()``: ``engine.abort([request_id])``; the request ends at the next step boundary with
  ``finish_reason="cancelled"`` (unless it finished first).

Text deltas are decoded on the consumer's side (``Detokenizer``), not on the loop thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from timjax.base.results import GenerationResult
from timjax.engine.outputs import Detokenizer, Event, FinishedEvent, TokenEvent, TreeEvent


class RequestHandle:
    def __init__(self, request_id: str, engine: Any, tokenizer: Any = None, *, stream: bool = True):
        self.request_id = request_id
        self._stream = stream  # False: only the result is kept (Engine.run), no token events
        self._engine = engine
        self._detok = Detokenizer(tokenizer)
        self._cv = threading.Condition()
        self._buf: deque = deque()  # raw items: ("tokens", ids) | TreeEvent | FinishedEvent
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # -- the loop thread's side ------------------------------------------------------------------------
    def _push(self, item: Any) -> None:
        with self._cv:
            if self._async is not None:
                loop, q = self._async
                _threadsafe(loop, q.put_nowait, item)
            else:
                self._buf.append(item)
                self._cv.notify_all()

    def _push_tokens(self, ids: list[int]) -> None:
        if ids and self._stream:
            self._push(("tokens", list(ids)))

    def _push_tree(self, kind: str, task_path: tuple[int, ...] = (), **info: Any) -> None:
        if not self._stream:
            return
        self._push(TreeEvent(self.request_id, kind, tuple(task_path), info))  # type: ignore[arg-type]

    def _finish(self, result: GenerationResult) -> None:
        with self._cv:
            if self._done.is_set():
                return
            self._result = result
            self._done.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            _threadsafe(loop, _set_result, fut, result)
        self._push(FinishedEvent(self.request_id, result))

    # -- the consumer's side ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        if not self.done:
            self._engine.abort([self.request_id])

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._result  # type: ignore[return-value]

    async def aresult(self) -> GenerationResult:
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._done.is_set():
                return self._result  # type: ignore[return-value]
            fut = loop.create_future()
            self._waiters.append((loop, fut))
        return await fut

    def _events(self, item: Any) -> list[Event]:
        if isinstance(item, tuple):  # ("tokens", ids): the text delta is decoded here, off the loop thread
            return [TokenEvent(self.request_id, item[1], self._detok(item[1]))]
        if isinstance(item, FinishedEvent) and self._detok.read < len(self._detok.ids):
            tail = self._detok([], final=True)  # a trailing partial character: released as is at the end
            if tail:
                return [TokenEvent(self.request_id, [], tail), item]
        return [item]

    def __iter__(self):
        while True:
            with self._cv:
                while not self._buf:
                    self._cv.wait()
                item = self._buf.popleft()
            yield from self._events(item)
            if isinstance(item, FinishedEvent):
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._async is None:
                q: asyncio.Queue = asyncio.Queue()
                while self._buf:
                    q.put_nowait(self._buf.popleft())
                self._async = (loop, q)
            q = self._async[1]
        while True:
            item = await q.get()
            for ev in self._events(item):
                yield ev
            if isinstance(item, FinishedEvent):
                return


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _threadsafe(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass

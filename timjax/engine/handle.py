"""A request's handle: what ``Engine.add_request`` returns.

The engine's loop thread pushes into the handle (``_push_tokens``, ``_push_tree``, ``_finish``); any other
thread reads it:

- ``for event in handle`` (blocking) or ``async for event in handle`` (from an asyncio loop on any thread).
  One consumer per handle: the first ``async for`` moves what was buffered into its asyncio queue. The
  loop thread hands items to an asyncio loop through that loop's ``_Mailbox``: one wakeup
  (``call_soon_threadsafe``, a write to the loop's self-pipe) per batch of items, not per token, so a step
  that writes a token for 64 streaming requests wakes the server once. A consumer that falls behind gets
  the token ids written meanwhile as one ``TokenEvent`` (one text delta), never one event per token.
- ``handle.result(timeout=None)`` / ``await handle.aresult()``: the final ``GenerationResult`` (independent
  of the event stream; reading both is fine).
- ``handle.cancel()``: ``engine.abort([request_id])``; the request ends at the next step boundary with
  ``finish_reason="cancelled"`` (unless it finished first).

Text deltas are decoded on the consumer's side (``Detokenizer``), not on the loop thread.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
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
                mailbox, q = self._async
                mailbox.post(q.put_nowait, item)
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

    def _events(self, items: list[Any]) -> list[Event]:
        """Events for raw items in order; consecutive token items become one ``TokenEvent``."""
        out: list[Event] = []
        ids: list[int] = []
        for item in items:
            if isinstance(item, tuple):  # ("tokens", ids)
                ids += item[1]
                continue
            if ids:
                out.append(self._token_event(ids))
                ids = []
            if isinstance(item, FinishedEvent) and self._detok.read < len(self._detok.ids):
                tail = self._detok([], final=True)  # a trailing partial character: released as is at the end
                if tail:
                    out.append(TokenEvent(self.request_id, [], tail))
            out.append(item)
        if ids:
            out.append(self._token_event(ids))
        return out

    def _token_event(self, ids: list[int]) -> TokenEvent:
        return TokenEvent(self.request_id, ids, self._detok(ids))  # decoded here, off the loop thread

    def __iter__(self):
        while True:
            with self._cv:
                while not self._buf:
                    self._cv.wait()
                items = list(self._buf)
                self._buf.clear()
            yield from self._events(items)
            if isinstance(items[-1], FinishedEvent):
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._async is None:
                q: asyncio.Queue = asyncio.Queue()
                while self._buf:
                    q.put_nowait(self._buf.popleft())
                self._async = (_mailbox(loop), q)
            q = self._async[1]
        while True:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            for ev in self._events(items):
                yield ev
            if isinstance(items[-1], FinishedEvent):
                return


class _Mailbox:
    """Items posted from other threads to one asyncio loop, delivered in order by one callback per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[Any, Any]] = []

    def post(self, deliver, item: Any) -> None:
        with self.lock:
            self.items.append((deliver, item))
            if len(self.items) > 1:  # a drain is already scheduled and has not run yet: it takes this one too
                return
        _threadsafe(self.loop, self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for deliver, item in items:
            deliver(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _threadsafe(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass

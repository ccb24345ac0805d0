"""One MCP server's client, on an event loop of its own (a daemon thread per server).

Why a loop per server: an in-process ``MCPServer`` runs on its client's loop, so a tool that blocks that
loop (``time.sleep`` in an ``async def``) would freeze every other server's calls on a shared loop; here
it freezes only its own server, whose calls then time out on the engine's clock.

Submission never blocks the caller: ``LoopThread.submit`` hands the coroutine to the loop through its
thread-safe call queue (``asyncio.run_coroutine_threadsafe``: a deque append and a self-pipe write), even
when the loop is busy or blocked, unlike anyio's portal, which waits for the loop to accept the task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("timjax.tools.runner")

__all__ = ["Connection", "LoopThread", "ServerDown", "describe"]


class ServerDown(Exception):
    pass


def describe(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"timjax-tools-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(BaseException):
                tasks = asyncio.all_tasks(self.loop)
                for t in tasks:
                    t.cancel()
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=5) if tasks else asyncio.sleep(0))
            self.loop.close()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Schedule ``coro`` on the loop; never waits for the loop (see the module docstring)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine, timeout: float) -> Any:
        """Run ``coro`` and wait for it (startup and shutdown only, never on the engine thread)."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout:g} s") from None

    def stop(self, timeout: float) -> bool:
        """Stop the loop and join the thread; False if it is stuck (a tool blocking it: left as a daemon)."""
        if self.loop.is_closed():
            return True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        return not self.thread.is_alive()


class Connection:
    """A server's client, (re)connected on demand on its ``LoopThread``. ``gen`` counts connections, so a
    call that failed on an old client does not tear down the one another call has since reconnected."""

    def __init__(self, label: str, make_client: Callable[[], Any], loop: LoopThread):
        self.label = label
        self._make_client = make_client
        self.loop = loop
        self.client = None
        self.gen = 0
        self.error: BaseException | None = None
        self._scope = None
        self._host_task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None

    async def _host(self, ready: asyncio.Event) -> None:
        import anyio

        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                async with self._make_client() as client:
                    self.client = client
                    ready.set()
                    await anyio.sleep_forever()
            except Exception as e:  # noqa: BLE001 - the transport died (crash, garbage, closed pipe) or never came up
                self.error = e
            finally:
                self.client = None
                ready.set()

    async def ensure(self, timeout_s: float) -> tuple[Any, int]:
        """``(client, gen)``; starts the server/transport if needed. Raises ``ServerDown``."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.client is not None:
                return self.client, self.gen
            self.error = None
            self.gen += 1
            ready = asyncio.Event()
            self._host_task = asyncio.get_running_loop().create_task(self._host(ready))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ready.wait(), timeout_s)
            if self.client is None:
                if self._scope is not None:
                    self._scope.cancel()
                why = describe(self.error) if self.error else f"no answer within {timeout_s:g} s"
                raise ServerDown(f"server {self.label!r} did not start: {why}")
            return self.client, self.gen

    def reset(self, gen: int | None = None) -> None:
        """Drop the client of connection ``gen`` (None: whatever is up); the next call reconnects."""
        if gen is not None and gen != self.gen:
            return
        if self._scope is not None:
            self._scope.cancel()
        self.client = None

    async def aclose(self, timeout_s: float) -> None:
        self.reset()
        task = self._host_task
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)

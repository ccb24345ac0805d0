"""Server-sent events: one response type for the three streaming routes (sse-starlette: keep-alive
comments, and the generator is cancelled when the client goes away), and the job tied to it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse


def event(data, name: str | None = None) -> dict:
    """One SSE event: ``data`` as JSON (a string is sent as is, e.g. ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return {"data": text, "event": name} if name else {"data": text}


def stream(events: AsyncIterator[dict], job, headers: dict | None = None) -> EventSourceResponse:
    """Send ``events``; a client that disconnects (or any failure) cancels ``job``, which frees its pages."""

    async def guarded():
        try:
            async for ev in events:
                yield ev
        finally:
            if not job.done:
                job.cancel()

    return EventSourceResponse(guarded(), headers=headers, ping=15, sep="\n")

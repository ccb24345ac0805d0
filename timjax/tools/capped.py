"""A byte cap on tool answers at the transport, before any parsing (issue 22).

A server's answer is read by the MCP SDK in full and parsed (JSON-RPC, pydantic) before the runner sees
it: a 5 MB answer costs the runtime's process ~0.1 s of CPU under the GIL beside the engine thread. Here
the runtime stops reading one answer after ``ToolPolicy.result_bytes`` bytes and hands the SDK, in place of
the rest, a JSON-RPC error for the same request id (code ``OVER_CAP``; ``data`` holds the tool, the cap,
the bytes read and, when one is cheap to get, a readable prefix of the first text block). The runner turns
it into a ``truncated`` call. Nothing past the cap is parsed; at most one more socket read (64 KiB) is
taken off the wire by httpcore before the response is closed.

* Streamable HTTP (``capped_http_client``): an ``httpx2.AsyncClient`` built by the SDK's own factory, with
  a response event hook that wraps the body stream of each ``tools/call`` POST (other POSTs: a generous
  ``OTHER_CAP``). The response is then closed: httpcore drops that TCP connection, the MCP session stays
  up and the next call opens a new connection. ``Accept-Encoding: identity`` is asked for; a compressed
  answer is refused (a gzip bomb would otherwise pass a cap on the compressed bytes). JSON bodies are held
  until the end or the cap (the SDK reads them whole anyway); SSE bodies pass through event by event, and
  only the event in progress is held.
* stdio (``CappedLines``): the SDK's stdout reader wrapped so that a line longer than the cap is never
  assembled: its head (for the request id and the prefix) is kept, the rest is skipped with ``find``
  until its newline, and an error line takes its place. The server keeps running and the pipe stays in
  step for the next call.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["OTHER_CAP", "OVER_CAP", "CappedLines", "capped_http_client", "error_message", "over_cap_info"]

OVER_CAP = -32077  # JSON-RPC error code of an answer cut at the byte cap (implementation-defined range)
OTHER_CAP = 16 * 2**20  # answers to requests other than tools/call (initialize, tools/list): a loose bound
_HEAD = 4096  # bytes of an over-cap stdio line kept for its id and prefix

_TEXT_KEY = re.compile(rb'"text"\s*:\s*"')
_STRING_BODY = re.compile(rb'(?:[^"\\]|\\.)*', re.S)


def readable_prefix(head: bytes, max_chars: int) -> str | None:
    """The start of the first ``"text"`` string in a cut JSON-RPC message (``None`` if there is none)."""
    m = _TEXT_KEY.search(head)
    if m is None:
        return None
    raw = _STRING_BODY.match(head, m.end()).group(0)[: 6 * (max_chars + 1)]
    for cut in range(len(raw), max(len(raw) - 8, -1), -1):  # drop a cut escape or UTF-8 sequence
        try:
            text = json.loads(b'"' + raw[:cut] + b'"')
        except ValueError:
            continue
        return text[: max_chars + 1]
    return None


def error_message(tool: str | None, cap: int) -> str:
    who = repr(tool) if tool else "the server"
    return f"result truncated: {who} answered more than the cap of {cap:,} bytes"


def _error_body(request_id: Any, tool: str | None, cap: int, read: int, head: bytes | None, why: str | None) -> bytes:
    data: dict[str, Any] = {"tool": tool, "cap_bytes": cap, "read_bytes": read}
    if head is not None:
        prefix = readable_prefix(head, max_chars=cap)
        if prefix:
            data["partial"] = prefix
    msg = why or error_message(tool, cap)
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": OVER_CAP, "message": msg, "data": data}},
        ensure_ascii=True,
    ).encode()


def over_cap_info(exc: BaseException) -> dict | None:
    """The ``data`` of an ``MCPError`` raised for a cut answer, else None."""
    err = getattr(exc, "error", None)
    if getattr(err, "code", None) != OVER_CAP:
        return None
    data = getattr(err, "data", None)
    return {**(data if isinstance(data, dict) else {}), "message": getattr(err, "message", "")}


def _request_info(content: bytes) -> tuple[Any, str | None, str | None]:
    """(JSON-RPC id, method, tool name) of a request body; (None, None, None) when it is not one request."""
    try:
        msg = json.loads(content)
    except ValueError:
        return None, None, None
    if not isinstance(msg, dict) or "id" not in msg or "method" not in msg:
        return None, None, None
    params = msg.get("params")
    tool = params.get("name") if isinstance(params, dict) and msg["method"] == "tools/call" else None
    return msg["id"], msg["method"], tool if isinstance(tool, str) else None


# -- streamable HTTP ---------------------------------------------------------------------------------
def _sse_boundary(buf: bytearray) -> int:
    """End of the last complete SSE event in ``buf`` (0: none yet)."""
    return max(buf.rfind(b"\n\n") + 2, buf.rfind(b"\r\n\r\n") + 4, buf.rfind(b"\r\r") + 2, 0)


def _make_body_class():
    import httpx2

    class CappedBody(httpx2.AsyncByteStream):
        """A response body that ends with an ``OVER_CAP`` error in place of whatever lies past ``cap``."""

        def __init__(self, inner, *, cap: int, request_id: Any, tool: str | None, sse: bool, refuse: str | None):
            self.inner, self.cap, self.request_id, self.tool = inner, cap, request_id, tool
            self.sse, self.refuse = sse, refuse
            self.read = 0  # bytes taken from the wire (the last read may pass the cap by one chunk)
            self.cut = False

        def _error(self, head: bytes | None) -> bytes:
            body = _error_body(self.request_id, self.tool, self.cap, self.read, head, self.refuse)
            return b"event: message\ndata: " + body + b"\n\n" if self.sse else body

        async def __aiter__(self) -> AsyncIterator[bytes]:
            if self.refuse is not None:
                await self.aclose()
                self.cut = True
                yield self._error(None)
                return
            buf, sent = bytearray(), 0
            it = self.inner.__aiter__()
            try:
                async for chunk in it:
                    self.read += len(chunk)
                    buf += chunk
                    if sent + len(buf) > self.cap:
                        self.cut = True
                        break
                    if self.sse and (end := _sse_boundary(buf)):
                        out = bytes(buf[:end])
                        del buf[:end]
                        sent += end
                        yield out
            finally:
                if hasattr(it, "aclose"):
                    await it.aclose()
            if not self.cut:
                if buf:
                    yield bytes(buf)
                return
            await self.aclose()  # an unread body: httpcore closes this connection (the session stays)
            yield self._error(bytes(buf[: self.cap]))

        async def aclose(self) -> None:
            await self.inner.aclose()

    return CappedBody


def capped_http_client(cap: int, headers: dict[str, str] | None = None, meter: list | None = None):
    """An ``httpx2.AsyncClient`` for ``streamable_http_client`` whose ``tools/call`` answers stop at
    ``cap`` bytes (see the module docstring). ``meter``: a list that gets each capped body (tests read
    ``.read`` and ``.cut``)."""
    from mcp.shared._httpx_utils import create_mcp_http_client

    body_cls = _make_body_class()
    client = create_mcp_http_client(headers={**(headers or {}), "Accept-Encoding": "identity"})

    async def on_response(response) -> None:
        request = response.request
        if request.method != "POST":
            return  # the GET stream of server-initiated messages: no call's answer travels there
        request_id, method, tool = _request_info(request.content)
        if method is None:
            return
        limit = cap if method == "tools/call" else max(cap, OTHER_CAP)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        refuse = None
        if encoding not in ("", "identity"):
            refuse = f"a compressed answer ({encoding}) is refused: identity was asked for"
            del response.headers["content-encoding"]
        sse = response.headers.get("content-type", "").lower().startswith("text/event-stream")
        body = body_cls(response.stream, cap=limit, request_id=request_id, tool=tool, sse=sse, refuse=refuse)
        if meter is not None:
            meter.append(body)
        response.stream = body

    client.event_hooks["response"].append(on_response)
    return client


# -- stdio -------------------------------------------------------------------------------------------
_ID_KEY = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')


def _line_id(head: bytes, tail: bytes) -> Any:
    """The JSON-RPC id of a cut line: the first top-level ``"id"`` in its head, else the last in its tail."""
    depth, in_str, esc = 0, False, False
    for i, b in enumerate(head):
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
            continue
        if b == 0x22:
            if depth == 1 and (m := _ID_KEY.match(head, i)):
                return json.loads(m.group(1))
            in_str = True
        elif b in b"{[":
            depth += 1
        elif b in b"}]":
            depth -= 1
    found = list(_ID_KEY.finditer(tail))
    return json.loads(found[-1].group(1)) if found else None


class CappedLines:
    """A byte stream over a stdio server's stdout (an ``anyio`` ``ByteReceiveStream``) in which a line of
    more than ``cap`` bytes becomes one ``OVER_CAP`` error line: complete lines pass as they are, a line in
    progress is held up to the cap, then only its head is kept and the rest is skipped unparsed
    (``bytes.find`` for the newline), never joined into one string."""

    def __init__(self, inner, cap: int, meter: list | None = None):
        self.inner, self.cap = inner, cap
        self.pending = bytearray()  # the line in progress, while under the cap
        self.head: bytes | None = None  # set while skipping an over-cap line
        self.tail = b""
        self.skipped = 0  # bytes of the over-cap line read so far
        self.cut = 0  # over-cap lines replaced
        if meter is not None:
            meter.append(self)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            out = self._feed(await self.inner.receive(max_bytes))
            if out:
                return out

    def _feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(chunk):
            nl = chunk.find(b"\n", pos)
            end = len(chunk) if nl < 0 else nl + 1
            piece = chunk[pos:end]
            pos = end
            if self.head is None and len(self.pending) + len(piece) - (nl >= 0) > self.cap:
                held = bytes(self.pending) + piece
                self.head, self.tail, self.skipped = held[:_HEAD], held[-256:], len(held)
                self.pending.clear()
            elif self.head is not None:
                if len(self.head) < _HEAD:
                    self.head += piece[: _HEAD - len(self.head)]
                self.tail = (self.tail + piece)[-256:]
                self.skipped += len(piece)
            else:
                self.pending += piece
                if nl >= 0:
                    out += self.pending
                    self.pending.clear()
                continue
            if nl >= 0:  # the end of the over-cap line
                out += _error_body(_line_id(self.head, self.tail), None, self.cap, self.skipped, self.head, None)
                out += b"\n"
                self.head, self.tail, self.cut = None, b"", self.cut + 1
        return bytes(out)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self):
        return getattr(self.inner, "extra_attributes", {})

"""The byte cap at the transport (issue 22, ``timjax/tools/capped.py``): a tool answer over
``ToolPolicy.result_bytes`` is cut before any parsing, over streamable HTTP (JSON and SSE bodies, real
servers on loopback) and over a stdio pipe; the call is ``truncated`` naming the tool and the cap, a call
in flight on another server is untouched, and the next call to the same server works."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import sys
import time

from _loopback import serve_on_loopback as serve
from _loopback import wait

from timjax.tools.capped import OVER_CAP, CappedLines, _line_id, capped_http_client, readable_prefix
from timjax.tools.runner import ToolPolicy, ToolRunner, ToolServer, stdio_server
from timjax.tools.servers import faulty

SOCKET_READ = 65536  # httpcore's read size: the client takes at most one read past the cap off the wire


def test_an_http_answer_over_the_byte_cap_is_cut_before_parsing():
    policy = ToolPolicy(timeout_s=30, max_result_tokens=64)
    cap = policy.result_bytes
    assert cap == 8 * 8 * 64 + 4096
    app = faulty.make_server().streamable_http_app()  # answers a call with one JSON body
    with serve(app) as port:
        servers = [
            ToolServer(f"http://127.0.0.1:{port}/mcp", tools=["big", "echo"], name="remote"),
            ToolServer(faulty.make_server(), tools=["slow"]),  # another server, a call in flight on it
        ]
        with ToolRunner(servers, policy) as runner:
            s = runner.session(lambda text: len(text) // 4)
            slow = s.submit("slow", json.dumps({"seconds": 0.5}))
            t0 = time.perf_counter()
            big = wait(s, s.submit("big", json.dumps({"megabytes": 5})))
            t_big = time.perf_counter() - t0
            body = runner._meter[-1]
            assert body.cut and not body.sse
            assert cap < body.read <= cap + SOCKET_READ  # bytes taken off the wire for the 5 MB answer
            assert big.status == "truncated" and big.result_tokens <= 64
            msg = f"result truncated: 'big' answered more than the cap of {cap:,} bytes"
            assert big.error == msg
            obj = json.loads(big.result)
            assert obj["error"] == msg and obj["partial"].startswith('"xxxxxxxx') and obj["partial"].endswith("…")
            assert t_big < 0.5 and not s.poll(slow)  # cut at once, while the other server's call still runs
            rec = wait(s, slow)
            assert (rec.status, json.loads(rec.result)) == ("ok", "slept 0.5 s")
            # the same server, at once: the session is up (a new TCP connection), small answers whole
            echo = wait(s, s.submit("echo", json.dumps({"text": "hi", "n": 2})))
            assert (echo.status, json.loads(echo.result)) == ("ok", {"text": "hi", "n": 2})
            assert not runner._meter[-1].cut
            again = wait(s, s.submit("big", json.dumps({"megabytes": 1})))
            assert again.status == "truncated" and runner._meter[-1].read <= cap + SOCKET_READ
            # an explicit cap
        with ToolRunner(servers[:1], ToolPolicy(max_result_tokens=64, max_result_bytes=50_000)) as runner:
            s = runner.session(lambda text: len(text) // 4)
            assert wait(s, s.submit("big", json.dumps({"megabytes": 0.04}))).status == "truncated"  # cut by chars
            assert not runner._meter[-1].cut
            rec = wait(s, s.submit("big", json.dumps({"megabytes": 0.06})))
            assert rec.error == "result truncated: 'big' answered more than the cap of 50,000 bytes"
            assert runner._meter[-1].cut


def test_a_stdio_answer_over_the_byte_cap_is_skipped_unparsed():
    params = stdio_server([sys.executable, "-m", "timjax.tools.servers.faulty"], env={"PYTHONPATH": "."})
    policy = ToolPolicy(timeout_s=30, max_result_tokens=64)
    with ToolRunner([ToolServer(params, tools=["big", "echo"])], policy) as runner:
        s = runner.session(lambda text: len(text) // 4)
        for _ in range(2):  # the pipe stays in step: the server is not restarted
            big = wait(s, s.submit("big", json.dumps({"megabytes": 5})))
            assert big.status == "truncated"
            assert big.error == f"result truncated: 'big' answered more than the cap of {policy.result_bytes:,} bytes"
            assert json.loads(big.result)["partial"].startswith('"xxxx')
            echo = wait(s, s.submit("echo", json.dumps({"text": "hi", "n": 2})))
            assert (echo.status, json.loads(echo.result)) == ("ok", {"text": "hi", "n": 2})
        lines = runner._meter[-1]
        assert lines.cut == 2 and runner.tools["big"].conn.gen == 1


def test_capped_lines_pass_small_lines_and_replace_long_ones_in_any_chunking():
    small = b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n'
    long_head = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"' + b"\\u00e9" * 5000 + b'"}]}}\n'
    long_tail = b'{"result":{"content":[{"type":"text","text":"' + b"y" * 5000 + b'"}]},"jsonrpc":"2.0","id":"k9"}\n'
    stream = small + long_head + small + long_tail + small
    for size in (1, 7, 100, 4096, len(stream)):

        class Inner:
            def __init__(self):
                self.chunks = [stream[i : i + size] for i in range(0, len(stream), size)]

            async def receive(self, max_bytes=65536):
                import anyio

                if not self.chunks:
                    raise anyio.EndOfStream
                return self.chunks.pop(0)

        capped = CappedLines(Inner(), cap=1000)

        async def read_all():
            import anyio

            out = b""
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    out += await capped.receive()
            return out

        lines = asyncio.run(read_all()).split(b"\n")
        assert lines[0] + b"\n" == small and lines[2] + b"\n" == small and lines[4] + b"\n" == small, size
        e1, e2 = json.loads(lines[1]), json.loads(lines[3])
        assert (e1["id"], e1["error"]["code"], e2["id"]) == (7, OVER_CAP, "k9")
        assert e1["error"]["data"]["partial"].startswith("é" * 100) and e1["error"]["data"]["read_bytes"] == len(long_head)
        assert "partial" not in e2["error"]["data"] or e2["error"]["data"]["partial"].startswith("yyy")
    assert _line_id(b'{"result":{"id":3,"text":"', b'"id":5}') == 5  # a nested "id" is not the message's
    assert readable_prefix(b'"text":"ab\\n\\u00', 10) == "ab\n"  # a cut escape is dropped
    assert readable_prefix('"text":"é'.encode()[:-1], 10) == ""  # so is a cut UTF-8 sequence


async def _gzip_app(scope, receive, send):
    """A server that answers every POST with a gzip-compressed JSON-RPC result (identity was asked for)."""
    if scope["type"] != "http":
        return
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "x" * 10**6}]}})
    data = gzip.compress(body.encode())  # ~1 KB on the wire, 1 MB once inflated
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]})
    await send({"type": "http.response.body", "body": data})


def test_a_compressed_answer_is_refused_not_inflated():
    with serve(_gzip_app) as port:

        async def go():
            meter = []
            async with capped_http_client(4096, meter=meter) as client:
                req = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "zip", "arguments": {}}}
                r = await client.post(f"http://127.0.0.1:{port}/", json=req)
                assert r.request.headers["accept-encoding"] == "identity"
                return r.json(), meter

        answer, meter = asyncio.run(go())
        assert answer["id"] == 1 and answer["error"]["code"] == OVER_CAP and meter[0].cut
        assert answer["error"]["message"] == "a compressed answer (gzip) is refused: identity was asked for"


async def _sse_app(scope, receive, send):
    """A server that answers a POST with an SSE stream: a notification, then a 2 MB response event."""
    if scope["type"] != "http":
        return
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}})
    big = json.dumps({"jsonrpc": "2.0", "id": 4, "result": {"content": [{"type": "text", "text": "z" * 2 * 10**6}]}})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": f"event: message\ndata: {note}\n\n".encode(), "more_body": True})
    payload = f"event: message\ndata: {big}\n\n".encode()
    for i in range(0, len(payload), 32768):
        await send({"type": "http.response.body", "body": payload[i : i + 32768], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_an_sse_answer_passes_whole_events_until_the_cap_then_one_error_event():
    with serve(_sse_app) as port:

        async def go():
            meter = []
            async with capped_http_client(8192, meter=meter) as client:
                req = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "huge", "arguments": {}}}
                async with client.stream("POST", f"http://127.0.0.1:{port}/", json=req) as r:
                    chunks = [c async for c in r.aiter_bytes()]
                return chunks, meter[0]

        chunks, body = asyncio.run(go())
        events = b"".join(chunks).decode().split("\n\n")
        assert events[-1] == "" and len(events) == 3
        assert json.loads(events[0].split("data: ", 1)[1])["method"] == "notifications/progress"
        err = json.loads(events[1].split("data: ", 1)[1])
        assert err["id"] == 4 and err["error"]["code"] == OVER_CAP and err["error"]["data"]["tool"] == "huge"
        assert err["error"]["message"] == "result truncated: 'huge' answered more than the cap of 8,192 bytes"
        assert err["error"]["data"]["partial"].startswith("zzzz") and body.sse and body.cut
        assert body.read <= 8192 + SOCKET_READ

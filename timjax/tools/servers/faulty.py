"""A deliberately faulty MCP server for tests: slow, hanging, crashing, garbage and huge answers.

In-process (``make_server()``) a "crash" is an exception and "garbage" is text that is not UTF-8
encodable; over stdio (``python -m timjax.tools.servers.faulty``) ``crash`` kills the process and
``garbage`` writes bytes that are neither UTF-8 nor JSON-RPC to stdout. ``--startup-delay S`` makes the
server sleep before it serves (a server that never starts, for a short connect timeout).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import anyio
from mcp.types import CallToolResult, TextContent, ToolAnnotations

_SAFE = ToolAnnotations(readOnlyHint=True)  # retried once by the runner after a crash

_STDIO = False  # set when serving over stdio: crash and garbage then act on the process itself


def make_server(name: str = "faulty"):
    from mcp.server.mcpserver import MCPServer

    server = MCPServer(name, log_level="CRITICAL")

    @server.tool(description="answer after `seconds` seconds", annotations=_SAFE)
    async def slow(seconds: float) -> CallToolResult:
        await anyio.sleep(seconds)
        return CallToolResult(content=[TextContent(type="text", text=f"slept {seconds:g} s")])

    @server.tool(description="never answer")
    async def hang() -> CallToolResult:
        await anyio.sleep_forever()

    @server.tool(description="die")
    def crash() -> CallToolResult:
        if _STDIO:
            os._exit(3)
        raise RuntimeError("crashed")

    @server.tool(description="write bytes that are not UTF-8 JSON")
    def garbage() -> CallToolResult:
        if _STDIO:
            os.write(1, b"\xff\xfe\x00 not json at all \x80\n")
            time.sleep(60)
        return CallToolResult(content=[TextContent(type="text", text="bad \udcff surrogate")])

    @server.tool(description="a text of n words")
    def huge(n: int) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text="word " * n)])

    @server.tool(description="structured content JSON cannot hold")
    def nan() -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text="nan")], structured_content={"x": float("nan")})

    @server.tool(description="echo the arguments", annotations=_SAFE)
    def echo(text: str, n: int = 1) -> CallToolResult:
        return CallToolResult(
            content=[TextContent(type="text", text=text * n)], structured_content={"text": text, "n": n}
        )

    @server.tool(description="answer after `seconds` seconds (not annotated: never retried)")
    async def slow_write(seconds: float) -> CallToolResult:
        await anyio.sleep(seconds)
        return CallToolResult(content=[TextContent(type="text", text="written")])

    @server.tool(description="block the server's event loop for `seconds` seconds, then answer")
    async def block(seconds: float) -> CallToolResult:
        time.sleep(seconds)  # deliberately blocking inside async: the loop stops
        return CallToolResult(content=[TextContent(type="text", text="unblocked")])

    @server.tool(description="the text, as given (control characters, DEL, ...)")
    def raw(text: str) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text=text)])

    @server.tool(description="a text of `megabytes` MB")
    def big(megabytes: float) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text="x" * int(megabytes * 1_000_000))])

    @server.tool(description="the environment variables this process sees")
    def env() -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text=",".join(sorted(os.environ)))])

    return server


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="a faulty MCP server for tests (stdio)")
    ap.add_argument("--startup-delay", type=float, default=0.0)
    args = ap.parse_args()
    _STDIO = True
    time.sleep(args.startup_delay)
    make_server().run("stdio")
    sys.exit(0)

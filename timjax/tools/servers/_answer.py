"""Turn a pure function's answer into an MCP result without the SDK's error wrapping.

A tool that raises makes MCPServer reply ``"Error executing tool <name>: <message>"``; returning the
``CallToolResult`` ourselves keeps the message exactly as the pure function wrote it, so training data
built from the pure functions and ``encode_error`` matches what the runtime reads from the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.types import CallToolResult, TextContent

from timjax.tools.encoding import encode_value


def answer(call: Callable[[], Any], errors: type[Exception] | tuple[type[Exception], ...]) -> CallToolResult:
    try:
        value = call()
    except errors as e:
        return CallToolResult(content=[TextContent(type="text", text=str(e))], is_error=True)
    return CallToolResult(content=[TextContent(type="text", text=encode_value(value))], structured_content=value)

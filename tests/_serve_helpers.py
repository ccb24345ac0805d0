"""Servers for tests/test_serve_*.py: timjax serve in-process under uvicorn on a free loopback port, and
the outside tools a request may bring (an MCP server over streamable HTTP, an HTTP function)."""

import time
from typing import Literal

from _loopback import Uvicorn, free_port  # noqa: F401  (the serve tests take both from here)

_MODEL = []


def tiny_tim():
    """The shipped tiny TIM, loaded once per test process (the serve test modules share it: one load)."""
    if not _MODEL:
        import timjax
        from timjax.api import default_model_path

        _MODEL.append(timjax.load(default_model_path(), dtype="float32"))
    return _MODEL[0]


def tools_app(calls: list, delay_s: float = 0.0):
    """A Starlette app with an MCP server at /mcp whose ``calculator`` answers a op b + 1000 (so a tree shows
    which server answered), and an HTTP function at /fn/calc answering a op b + 2000."""
    from mcp.server.mcpserver import MCPServer
    from mcp.types import CallToolResult
    from starlette.responses import JSONResponse

    from timjax.tools.servers._answer import answer
    from timjax.tools.servers.calculator import DESCRIPTION, CalculatorError, Number, calculate

    server = MCPServer("test-calc", log_level="WARNING")

    @server.tool(name="calculator", description=DESCRIPTION)
    def calculator(op: Literal["add", "sub", "mul", "div"], a: Number, b: Number) -> CallToolResult:
        calls.append(("mcp", op, a, b))
        time.sleep(delay_s)
        return answer(lambda: {"result": calculate(op, a, b)["result"] + 1000}, CalculatorError)

    app = server.streamable_http_app()

    async def fn(request):
        args = await request.json()
        calls.append(("fn", args["op"], args["a"], args["b"]))
        return JSONResponse({"result": calculate(args["op"], args["a"], args["b"])["result"] + 2000})

    app.add_route("/fn/calc", fn, methods=["POST"])
    return app


def calculator_schema() -> dict:
    from timjax.train.tools_adapter import listed_specs

    return next(s for s in listed_specs() if s.name == "calculator").input_schema

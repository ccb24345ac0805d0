"""Servers for tests/test_serve_*.py: timjax serve in-process under uvicorn on a free loopback port, and
the outside tools a request may bring (an MCP server over streamable HTTP, an HTTP function)."""

import socket
import threading
import time
from typing import Literal

import uvicorn


_MODEL = []


def tiny_tim():
    """The shipped tiny TIM, loaded once per test process (the serve test modules share it: one load)."""
    if not _MODEL:
        import timjax
        from timjax.api import default_model_path

        _MODEL.append(timjax.load(default_model_path(), dtype="float32"))
    return _MODEL[0]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Uvicorn:
    """An ASGI app served by uvicorn on a thread (a real HTTP server on 127.0.0.1)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


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

"""Tool results are written in one canonical form whatever the server's formatting (issue 23, item 1):
structured content when given, else text that parses as JSON re-serialised compactly, else the text;
errors alike. Real MCP servers (official SDK, in-process) return dicts, pydantic models, lists, plain text,
pretty-printed JSON and errors; and a calculator that pretty-prints its results gets the shipped tiny TIM
the same answers as the shipped calculator."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from _loopback import call
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

from timjax.tools.runner import ToolLimits, ToolRunner
from timjax.tools.servers import calculator


class Point(BaseModel):
    x: int
    y: int


def formats_server() -> MCPServer:
    s = MCPServer("formats", log_level="CRITICAL")

    @s.tool()
    def as_dict(a: int) -> dict:  # the SDK sends only pretty-printed text for a bare dict
        return {"result": a, "note": "ünï"}

    @s.tool()
    def as_model(a: int) -> Point:  # structured content + pretty text
        return Point(x=a, y=-a)

    @s.tool()
    def as_list(a: int) -> list[int]:  # structured {"result": [...]} + one text block per item
        return [a, a + 1]

    @s.tool()
    def as_text(a: int) -> str:
        return f"plain {a}\nsecond line"

    @s.tool(structured_output=False)
    def as_pretty_text(a: int) -> str:
        return json.dumps({"result": a, "items": [1, 2]}, indent=4)

    @s.tool(structured_output=False)
    def as_number_text(a: int) -> str:
        return f" {a} "

    @s.tool()
    def raises(a: int) -> str:
        raise ValueError("secret internals")

    @s.tool()
    def pretty_error(a: int) -> CallToolResult:
        text = json.dumps({"code": 7, "detail": "bad a"}, indent=2)
        return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)

    @s.tool()
    def text_error(a: int) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text="a is too big")], is_error=True)

    return s


@pytest.mark.parametrize(
    "tool,want,status",
    [
        ("as_dict", '{"result": 13, "note": "ünï"}', "ok"),
        ("as_model", '{"x": 13, "y": -13}', "ok"),
        ("as_list", '{"result": [13, 14]}', "ok"),
        ("as_text", '{"result": "plain 13\\nsecond line"}', "ok"),
        ("as_pretty_text", '{"result": 13, "items": [1, 2]}', "ok"),
        ("as_number_text", "13", "ok"),
        ("raises", '{"error": "Error executing tool raises"}', "tool_error"),
        ("pretty_error", '{"error": "{\\"code\\": 7, \\"detail\\": \\"bad a\\"}"}', "tool_error"),
        ("text_error", '{"error": "a is too big"}', "tool_error"),
    ],
)
def test_results_are_canonical_whatever_the_server_sends(formats, tool, want, status):
    rec = call(formats.session(), tool, {"a": 13})
    assert (rec.result, rec.status) == (want, status)


@pytest.fixture(scope="module")
def formats():
    with ToolRunner([formats_server()], ToolLimits(timeout_s=10)) as r:
        yield r


# -- the shipped tiny TIM: a pretty-printing calculator reads as the shipped one ----------------------
def pretty_calculator() -> MCPServer:
    """The calculator's name, description and argument schema, answering only with pretty-printed text
    (no structured content), as a server written outside the project would."""
    s = MCPServer("pretty-calculator", log_level="CRITICAL")

    @s.tool(name="calculator", description=calculator.DESCRIPTION, structured_output=False)
    def calc(op: Literal["add", "sub", "mul", "div"], a: calculator.Number, b: calculator.Number) -> str:
        try:
            return json.dumps(calculator.calculate(op, a, b), indent=2)
        except calculator.CalculatorError as e:
            raise ValueError(str(e)) from None

    return s


QUESTIONS = ["Calculate -(7 * (7 - 12)).", "Calculate (3 + 4) * 5."]


def test_a_pretty_printing_calculator_gets_the_shipped_answers():
    import timjax
    from timjax.api import default_model_path
    from timjax.tim.schema import tim_schema

    model = timjax.load(default_model_path(), dtype="float32")
    with ToolRunner([pretty_calculator()]) as r:
        assert call(r.session(), "calculator", {"op": "add", "a": 6, "b": 7}).result == '{"result": 13}'

    engine = timjax.Engine(model, max_batch=len(QUESTIONS), page_size=16, max_seq_len=2048)  # compiled once

    def run(server):
        return timjax.generate(
            engine, QUESTIONS, schema=tim_schema(), tools=[server], pruning_buffer=1, max_new_tokens=1024
        )

    shipped, pretty = run(calculator.make_server()), run(pretty_calculator())
    assert [r.finish_reason for r in shipped] == ["stop"] * len(QUESTIONS)
    assert [r.response.answer for r in pretty] == [r.response.answer for r in shipped]
    assert [r.text for r in pretty] == [r.text for r in shipped]  # byte for byte the same trees
    assert sum(r.stats.tool_calls for r in pretty) >= len(QUESTIONS)
    assert all(c.status == "ok" for r in pretty for c in r.tool_calls)

"""Exact integer and rational arithmetic, one binary operation per call (no ``eval``, no parser).

One operation per call is what makes a model decompose an expression into steps: ``(3 + 4) * 5`` is
``calculator(op="add", a=3, b=4)`` -> ``{"result": 7}``, then ``calculator(op="mul", a=7, b=5)``.

Numbers are JSON integers or strings ``"p/q"`` / ``"-p/q"`` / ``"n"``; results are integers when whole,
else ``"p/q"`` strings in lowest terms, so a result can be copied into the next call as it is.
"""

from __future__ import annotations

import re
import sys
from fractions import Fraction
from typing import Annotated, Literal, TypedDict, Union

from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from timjax.tools.servers._answer import answer

__all__ = ["MAX_DIGITS", "OPS", "calculate", "format_number", "make_server", "parse_number"]

OPS = ("add", "sub", "mul", "div")
MAX_DIGITS = 200  # per numerator / denominator, inputs and results: keeps every result small
NUMBER_PATTERN = r"^-?[0-9]+(/[0-9]+)?$"
_NUMBER = re.compile(NUMBER_PATTERN)

Number = Union[int, Annotated[str, Field(pattern=NUMBER_PATTERN, max_length=2 * MAX_DIGITS + 2)]]


class CalcResult(TypedDict):
    result: int | str


class CalculatorError(ValueError):
    """A call the calculator refuses (its message is what the model reads)."""


def parse_number(x, name: str = "number") -> Fraction:
    """An integer, or a string ``"n"``, ``"p/q"``, ``"-p/q"``, as an exact Fraction."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise CalculatorError(f'{name}: expected an integer or a string like "3/4", got {x!r}')
    if isinstance(x, str):
        if not _NUMBER.match(x):
            raise CalculatorError(f"{name}: {x!r} is not an integer or a fraction p/q")
        if "/" in x and int(x.split("/")[1]) == 0:
            raise CalculatorError(f"{name}: {x!r} has a zero denominator")
    f = Fraction(x)
    _check_size(f, name)
    return f


def _check_size(f: Fraction, name: str) -> None:
    for part in (f.numerator, f.denominator):
        if len(str(abs(part))) > MAX_DIGITS:
            raise CalculatorError(f"{name}: more than {MAX_DIGITS} digits")


def format_number(f: Fraction) -> int | str:
    return f.numerator if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def calculate(op: str, a, b) -> CalcResult:
    """``{"result": a <op> b}`` exactly; raises ``CalculatorError`` (unknown op, bad number, division by zero)."""
    x, y = parse_number(a, "a"), parse_number(b, "b")
    if op == "add":
        r = x + y
    elif op == "sub":
        r = x - y
    elif op == "mul":
        r = x * y
    elif op == "div":
        if y == 0:
            raise CalculatorError("division by zero")
        r = x / y
    else:
        raise CalculatorError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    _check_size(r, "result")
    return {"result": format_number(r)}


DESCRIPTION = (
    "Exact arithmetic, one operation per call: a op b with op add, sub, mul or div. Numbers are "
    'integers or fractions written as strings "p/q"; the result is an integer or a "p/q" string.'
)

# a pure function: safe to retry after a crashed server restarts (timjax.tools.runner)
READ_ONLY = ToolAnnotations(readOnlyHint=True, idempotentHint=True)


def make_server(name: str = "calculator"):
    """An MCP server with one tool, ``calculator(op, a, b)``."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer(name, log_level="WARNING")

    @server.tool(name="calculator", description=DESCRIPTION, annotations=READ_ONLY)
    def calculator(op: Literal["add", "sub", "mul", "div"], a: Number, b: Number) -> CallToolResult:
        return answer(lambda: calculate(op, a, b), CalculatorError)

    return server


if __name__ == "__main__":  # python -m timjax.tools.servers.calculator: serve over stdio
    make_server().run("stdio")
    sys.exit(0)

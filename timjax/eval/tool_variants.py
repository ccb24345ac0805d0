"""Calculators written here, not by the tools package: the tool contract with small variations (issue 23).

Each variant is an MCP server with the shipped tool name ``calculator`` and its operations
(``add``/``sub``/``mul``/``div`` on integers or ``"p/q"`` strings), but its own arithmetic and one change
in the contract: the order of the arguments in the input schema, the description's wording, or the form of
the result (``{"result": x}`` as structured content, ``{"value": x}``, a bare number, or a dict
pretty-printed as text the way the MCP SDK writes one). ``timjax eval --tool-variants`` runs the problems
once per variant; the runtime's canonical result encoding decides what the model reads.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Literal, Union

from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

Op = Literal["add", "sub", "mul", "div"]
Num = Union[int, str]  # module level: the SDK resolves the (string) annotations in this module's globals
Order = Literal["op-a-b", "a-b-op", "a-op-b"]
ResultForm = Literal["result", "value", "bare", "pretty"]

DESCRIPTIONS = {
    "shipped": None,  # the package's calculator description, word for word
    "terse": "Calculator: apply op (add, sub, mul, div) to a and b.",
    "plain": "Does one arithmetic operation. Give the operation name and two numbers; fractions as 'p/q' text.",
}


class ToolVariant(BaseModel):
    name: str
    order: Order = "op-a-b"
    description: str = "shipped"  # a key of DESCRIPTIONS
    result: ResultForm = "result"


VARIANTS: dict[str, ToolVariant] = {
    v.name: v
    for v in (
        ToolVariant(name="own"),  # the shipped contract, served by this module's own code
        ToolVariant(name="order-a-b-op", order="a-b-op"),
        ToolVariant(name="order-a-op-b", order="a-op-b"),
        ToolVariant(name="desc-terse", description="terse"),
        ToolVariant(name="desc-plain", description="plain"),
        ToolVariant(name="result-value", result="value"),
        ToolVariant(name="result-bare", result="bare"),
        ToolVariant(name="result-pretty", result="pretty"),
    )
}


def _number(x, name: str) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise ValueError(f"{name}: expected an integer or a 'p/q' string, got {x!r}")
    return Fraction(x)


def compute(op: str, a, b) -> int | str:
    """``a op b`` exactly: an int when whole, else ``"p/q"`` (raises ``ValueError``/``ZeroDivisionError``)."""
    x, y = _number(a, "a"), _number(b, "b")
    ops = {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y, "div": lambda: x / y}
    if op not in ops:
        raise ValueError(f"unknown op {op!r}")
    r = ops[op]()
    return r.numerator if r.denominator == 1 else f"{r.numerator}/{r.denominator}"


def reply(v: ToolVariant, op: str, a, b) -> CallToolResult:
    """The variant's answer to one call, as its MCP result."""
    try:
        x = compute(op, a, b)
    except (ValueError, ZeroDivisionError) as e:
        return CallToolResult(content=[TextContent(type="text", text=str(e) or "division by zero")], is_error=True)
    if v.result == "bare":
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(x))])
    key = "value" if v.result == "value" else "result"
    if v.result == "pretty":  # text only, the SDK's indent-2 layout, no structured content
        return CallToolResult(content=[TextContent(type="text", text=json.dumps({key: x}, indent=2))])
    return CallToolResult(content=[TextContent(type="text", text=json.dumps({key: x}))], structured_content={key: x})


def make_variant_server(variant: str | ToolVariant):
    """An in-process MCP server offering ``calculator`` under ``variant`` (a name of ``VARIANTS``)."""
    from mcp.server.mcpserver import MCPServer

    from timjax.tools.servers.calculator import DESCRIPTION

    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"--tool-variants: unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
        variant = VARIANTS[variant]
    v = variant
    desc = DESCRIPTIONS[v.description] or DESCRIPTION
    server = MCPServer(f"calculator-{v.name}", log_level="WARNING")
    # the input schema lists the parameters in signature order: one function per order
    if v.order == "op-a-b":

        def calculator(op: Op, a: Num, b: Num) -> CallToolResult:
            return reply(v, op, a, b)

    elif v.order == "a-b-op":

        def calculator(a: Num, b: Num, op: Op) -> CallToolResult:
            return reply(v, op, a, b)

    else:

        def calculator(a: Num, op: Op, b: Num) -> CallToolResult:
            return reply(v, op, a, b)

    server.tool(name="calculator", description=desc)(calculator)
    return server


def variant_tools(variant: str, kb_seed: int = 0) -> list:
    """The variant calculator beside the shipped lookup server (the model's other tool)."""
    from timjax.tools.servers import kb

    return [make_variant_server(variant), kb.make_server(seed=kb_seed)]

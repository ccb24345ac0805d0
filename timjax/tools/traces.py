"""Scripted TIM documents with tool calls, whose results come from the shipped servers' pure functions
encoded exactly as the runtime encodes MCP answers (``encoding.py``). Replayed through the runtime
(``TimController(override=ReplayText(...))``) they check that the runtime writes byte for byte what a
training document holds; the benchmark uses them to put N tool calls in one inference.

``calculation_trace(n_calls)``: a running total over ``n_calls`` calculator / lookup calls, grouped in
subtask lists of ``group`` calls (each group's list is prunable once the group concludes)::

    {"reasoning": [{"thought": ..., "subtasks": [
        {"thought": "group 1", "subtasks": [{"thought": ..., "tooluse": {...}, "conclusion": ...}, ...],
         "conclusion": "total is 17"}, ...], "conclusion": ...}], "answer": "..."}
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from typing import Any

from timjax.tools.encoding import encode_error, encode_value
from timjax.tools.servers import calculator, kb

__all__ = ["calculation_trace", "tool_call"]


def tool_call(name: str, params: dict, kb_: kb.KnowledgeBase | None = None) -> tuple[dict, Any]:
    """``(tooluse dict, decoded result)`` for one call of the shipped servers, result as the runtime writes it."""
    try:
        if name == "calculator":
            out = calculator.calculate(**params)
        elif name == "lookup":
            out = kb.lookup(kb_ if kb_ is not None else kb.generate_kb(0), **params)
        else:
            raise ValueError(f"no pure function for tool {name!r}")
        text = encode_value(out)
    except (calculator.CalculatorError, kb.LookupError_) as e:
        text = encode_error(str(e))
    value = json.loads(text)
    return {"tool_name": name, "parameters": params, "tool_result": value}, value


def calculation_trace(
    n_calls: int, *, n_steps: int | None = None, group: int = 3, seed: int = 0, kb_seed: int = 0, words: int = 3
) -> dict:
    """A TIM document (a dict) of ``n_steps`` steps (default ``n_calls``, at least 1) of which the first
    ``n_calls`` call a tool; the other steps do their arithmetic in the thought (same shape, no tooluse),
    so documents with 0..N calls have about the same length (the benchmark's baseline)."""
    n = max(n_steps if n_steps is not None else n_calls, n_calls, 1)
    rng = random.Random(seed)
    k = kb.generate_kb(kb_seed)
    people = k.entities("person")
    filler = ["so", "next", "we", "check", "the", "running", "total"]

    def text(prefix: str) -> str:
        return " ".join([prefix, *rng.sample(filler, words)])

    total: Any = rng.randint(1, 20)
    age = None  # a looked-up age waiting to be added
    groups, calls = [], []
    for i in range(n):
        tool = i < n_calls
        if i % 3 == 2:  # a lookup; the next calculator step adds its value
            person = rng.choice(people)
            use, value = tool_call("lookup", {"entity": person, "relation": "age"}, k)
            age = value["result"]
            step = {"thought": text(f"age of {person}"), "tooluse": use, "conclusion": f"age is {age}"}
        else:
            if age is not None:
                op, b, age = "add", age, None
            else:  # keep the total small (its digits are in every conclusion); div only when exact
                b = rng.randint(2, 9)
                ops = ["add", "sub"] + (["mul"] if abs(Fraction(total)) < 100 else [])
                ops += ["div"] if Fraction(total) % b == 0 else []
                op = rng.choice(ops)
            use, value = tool_call("calculator", {"op": op, "a": total, "b": b})
            total = value["result"]
            step = {"thought": text(f"{op} {b}"), "tooluse": use, "conclusion": f"total is {total}"}
        if not tool:
            del step["tooluse"]
        calls.append(step)
        if len(calls) == group or i == n - 1:
            groups.append(
                {"thought": text(f"step group {len(groups) + 1}"), "subtasks": calls, "conclusion": f"total is {total}"}
            )
            calls = []
    return {
        "reasoning": [
            {
                "thought": "compute the running total with the tools",
                "subtasks": groups,
                "conclusion": f"the total is {total}",
            }
        ],
        "answer": str(total),
    }

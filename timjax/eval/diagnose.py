"""Where a wrong rewrite-format answer first left the reference trace (issue 23).

An arithmetic problem solved in the rewrite format (``timjax.train.rewrite``) has exactly one right
trace: the steps ``rewrite.rewrites`` takes from the question's expression. The first place a model's
tree leaves it says what to train next:

* ``op``: the step's thought names another operation than the next one (the wrong operation chosen by
  precedence or position, or its operands copied wrongly from the expression);
* ``call``: the calculator was called with other arguments than the thought names;
* ``rewrite``: the expression written after the step is not the one before it with that operation's
  span replaced (a copy error);
* ``steps``: the tree stops early or goes on after the value, or a step is not laid out as a step;
* ``answer``: every step is right but the answer is not the last step's value.

A tree that leaves no trace at all (no response, another format) is ``format``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from timjax.train import rewrite as rw
from timjax.train.corpus import question_expression

KINDS = ("op", "call", "rewrite", "steps", "answer", "format")
_NUM = r"-?\d+(?:/\d+)?"
_THOUGHT = re.compile(rf"Compute ({_NUM}) ([-+*/]) ({_NUM})\.")
_OP_NAMES = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _field(obj: Any, name: str, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _number(x) -> Fraction | None:
    try:
        return Fraction(str(x))
    except (ValueError, ZeroDivisionError):
        return None


def _call(step) -> tuple | None:
    """The (a, op, b) the step's calculator call asked for, or None when it made none."""
    for sub in _field(step, "subtasks") or []:
        use = _field(sub, "tooluse")
        if use is not None and _field(use, "tool_name") == "calculator":
            p = _field(use, "parameters") or {}
            return _number(p.get("a")), _OP_NAMES.get(p.get("op"), p.get("op")), _number(p.get("b"))
    return None


def first_divergence(question: str, response: Any) -> dict | None:
    """``{"kind", "step", "got", "want"}`` for the first place ``response`` (a ``Response`` or its dict)
    leaves the reference trace of ``question``, or None when it follows it to the right answer."""
    try:
        ref = rw.rewrites(question_expression(question))
    except ValueError:
        return {"kind": "format", "step": None, "got": question, "want": "a rewrite-format question"}
    reasoning = _field(response, "reasoning") if response is not None else None
    if not reasoning or not ref:
        return {"kind": "format", "step": None, "got": None, "want": "a rewrite-format tree"}
    steps = _field(reasoning[0], "subtasks") or []
    for i, want in enumerate(ref):
        if i >= len(steps):
            return {"kind": "steps", "step": i, "got": "no more steps", "want": f"Compute {_op_text(want)}."}
        found = _diverges(steps[i], want)
        if found is not None:
            return {**found, "step": i}
    if len(steps) > len(ref):
        return {"kind": "steps", "step": len(ref), "got": _field(steps[len(ref)], "thought"), "want": "the answer"}
    answer, value = _field(response, "answer"), ref[-1].text
    if str(answer).strip() != value:
        return {"kind": "answer", "step": None, "got": answer, "want": value}
    return None


def _op_text(s: rw.Step) -> str:
    return f"{rw.fmt_num(s.a)} {s.op} {rw.fmt_num(s.b)}"


def _diverges(step, want: rw.Step) -> dict | None:
    thought = _field(step, "thought") or ""
    m = _THOUGHT.fullmatch(thought.strip())
    if m is None:
        return {"kind": "steps", "got": thought, "want": f"Compute {_op_text(want)}."}
    named = (Fraction(m[1]), m[2], Fraction(m[3]))
    if named != (want.a, want.op, want.b):
        return {"kind": "op", "got": thought, "want": f"Compute {_op_text(want)}."}
    call = _call(step)
    if call != named:
        return {"kind": "call", "got": None if call is None else list(map(str, call)), "want": list(map(str, named))}
    text = _field(step, "conclusion")
    if text != want.text:
        return {"kind": "rewrite", "got": text, "want": want.text}
    return None

"""Where a wrong arithmetic answer first left the reference trace (issue 23).

In the rewrite formats (``timjax.train.rewrite``; chunked: ``corpus.chunked_task``) an arithmetic problem
has exactly one right tree: the corpus's own document for it. The first place, in writing order, where a
model's tree leaves that document says what to train next:

* ``op``: a step's thought names another operation than the next one (the wrong operation chosen by
  precedence or position, or its operands copied wrongly);
* ``piece``: a chunk's thought holds another piece of the sum, or the value so far copied wrongly;
* ``call``: the calculator was called with other arguments than the step names;
* ``rewrite``: a step's or a piece's conclusion is not the reference's (the expression copied wrongly
  around the new value, or a value copied wrongly);
* ``steps``: the tree stops early, goes on, or lays a task out otherwise;
* ``answer``: the whole tree is right but the answer is not its value.

A tree that is not there (no response) or a question outside the format is ``format``. Tool results
are not compared: the runtime writes them.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

from timjax.train import corpus
from timjax.train import rewrite as rw

KINDS = ("op", "piece", "call", "rewrite", "steps", "answer", "format")
REWRITE = corpus.DocFormat(rewrite=True)


def _field(obj: Any, name: str, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def reference(question: str, fmt: corpus.DocFormat = REWRITE) -> dict:
    """The corpus's document for an arithmetic question in ``fmt`` (``ValueError`` if it has none)."""
    text = corpus.question_expression(question)
    answer = rw.fmt_num(rw.evaluate(text))
    prob = corpus.Problem("arith", question, answer, "diagnose", 0, {"expr": text})
    return corpus.document(prob, **dataclasses.asdict(fmt))


def first_divergence(question: str, response: Any, fmt: corpus.DocFormat = REWRITE) -> dict | None:
    """``{"kind", "path", "got", "want"}`` for the first place ``response`` (a ``Response`` or its dict)
    leaves the reference tree of ``question`` in ``fmt``, or None when it follows it to the answer.
    ``path``: the task's indices from the root (``[0, 2]``: the root's third subtask)."""
    try:
        ref = reference(question, fmt)
    except (ValueError, ZeroDivisionError, RuntimeError):
        return {"kind": "format", "path": None, "got": question, "want": "an arithmetic question"}
    reasoning = _field(response, "reasoning") if response is not None else None
    if not reasoning:
        return {"kind": "format", "path": None, "got": None, "want": "a tree"}
    found = _tasks(reasoning, ref["reasoning"], [])
    if found is not None:
        return found
    answer = _field(response, "answer")
    if str(answer).strip() != ref["answer"]:
        return {"kind": "answer", "path": None, "got": answer, "want": ref["answer"]}
    return None


def _tasks(got: list, want: list, path: list[int]) -> dict | None:
    for i, w in enumerate(want):
        if i >= len(got):
            return {"kind": "steps", "path": path + [i], "got": "no more tasks", "want": w["thought"]}
        found = _task(got[i], w, path + [i])
        if found is not None:
            return found
    if len(got) > len(want):
        return {"kind": "steps", "path": path + [len(want)], "got": _field(got[len(want)], "thought"), "want": None}
    return None


def _role(want: dict, path: list[int]) -> str:
    """``root`` (a top-level task), ``call`` (it calls the calculator), ``step`` (its subtask does) or
    ``piece`` (its subtasks are steps)."""
    if len(path) == 1:
        return "root"
    if "tooluse" in want:
        return "call"
    subs = want.get("subtasks") or []
    return "step" if subs and "tooluse" in subs[0] else "piece"


_THOUGHT_KIND = {"step": "op", "piece": "piece", "call": "steps", "root": "steps"}


def _task(got: Any, want: dict, path: list[int]) -> dict | None:
    role = _role(want, path)
    thought = _field(got, "thought")
    if thought != want["thought"]:
        # a root's thought picks the format (chunked or not); a step's or piece's names what it computes
        return {"kind": _THOUGHT_KIND[role], "path": path, "got": thought, "want": want["thought"]}
    if role == "call":
        use = _field(got, "tooluse")
        got_args = _args(_field(use, "parameters") if use is not None else None)
        want_args = _args(want["tooluse"]["parameters"])
        if use is None or _field(use, "tool_name") != "calculator" or got_args != want_args:
            return {"kind": "call", "path": path, "got": got_args, "want": want_args}
    else:
        found = _tasks(_field(got, "subtasks") or [], want["subtasks"], path)
        if found is not None:
            return found
    conclusion = _field(got, "conclusion")
    if conclusion != want["conclusion"]:
        kind = "answer" if role == "root" else "rewrite"
        return {"kind": kind, "path": path, "got": conclusion, "want": want["conclusion"]}
    return None


def _args(params: Any) -> dict | None:
    """Calculator arguments compared as values (``"7/2"`` and ``7/2`` alike; key order ignored)."""
    if not isinstance(params, dict):
        return None
    out = {}
    for k, v in params.items():
        try:
            out[k] = str(Fraction(str(v))) if k in ("a", "b") else v
        except (ValueError, ZeroDivisionError):
            out[k] = v
    return out

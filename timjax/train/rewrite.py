"""Arithmetic solved by rewriting: one operation per step, each step writing the whole expression again.

The rewrite format of the corpus (``corpus.DocFormat.rewrite``, a training config's
``data.rewrite_operations``; issue 23). The older format makes the model
parse the precedence tree in its head to plan its subtasks; here every step is local. The model finds
one operation, calls the calculator on it, and copies the expression with only that span replaced:

    3 + 4 * -5 - (6 - 2) * 3  ->  3 + -20 - (6 - 2) * 3  ->  3 + -20 - 4 * 3  ->  3 + -20 - 12  ->  -17 - 12  ->  -29

Which operation comes next is decided by a rule that needs only the text in view:

* the innermost-leftmost group: the first ``)`` and the ``(`` that opens it (no ``)``: the whole text);
* in it, the leftmost ``*`` or ``/``; if there is none, the leftmost ``+`` or ``-``;
* a ``-`` at the start, after an operator or after ``(`` belongs to the literal behind it (``3 - -5``);
  before a ``(`` it negates the group;
* the step that reduces a group's last operation also removes the group's parentheses, and a negation in
  front of the group flips the result's sign.

The copy keeps the text's own style (spaces, ``( 3 + 4 )``), so the model rewrites what the user typed,
not a canonical form of it. A fraction result is written ``(7/2)`` or ``(-7/2)``: bare, ``x / 7/2`` would
read as two divisions. The same token, without spaces, is read back as one literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise

# a number with its sign, or a fraction literal "(p/q)" / "(-p/q)" exactly as this module writes it
_FRACTION = re.compile(r"\((-?\d+)/(\d+)\)")
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "op", "(", ")", "neg" (a unary minus before a group)
    start: int
    end: int
    value: Fraction | None = None
    op: str = ""


class NoRewrite(ValueError):
    """A group holding one number and no operation (``-(-(42/7))`` typed tight): no step writes it."""


@dataclass(frozen=True)
class Step:
    """One reduction: ``a op b = result``, and the whole expression after it (``text``): the span
    ``span`` of the text before it replaced by the number ``shown`` (``result``, negated when the step
    also removes a negation in front of the group). The last step's text is the value as an answer
    writes it (``-29``, ``7/2``)."""

    a: Fraction
    op: str
    b: Fraction
    result: Fraction
    text: str
    final: bool
    span: tuple[int, int]
    shown: Fraction


def apply_op(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    raise ValueError(f"unknown operator {op!r}")


def fmt_num(v: Fraction) -> str:
    """An integer as digits, a fraction as ``p/q`` in lowest terms (the calculator's and the answer's form)."""
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def format_number(v: Fraction) -> str:
    """A value as the rewritten expression holds it: ``-20``, ``(7/2)``, ``(-7/2)``."""
    return str(v.numerator) if v.denominator == 1 else f"({v.numerator}/{v.denominator})"


def lex(text: str) -> list[Token]:
    """The expression's tokens with their spans; a bad character raises naming it."""
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        unary = not out or out[-1].kind in ("op", "(", "neg")
        if m := _FRACTION.match(text, i):
            v = Fraction(int(m[1]), int(m[2]))
            if out and out[-1].kind == "neg":  # "-(7/2)": a negated fraction literal, one number
                out[-1] = Token("num", out[-1].start, m.end(), -v)
            else:
                out.append(Token("num", i, m.end(), v))
            i = m.end()
            continue
        if (m := _INT.match(text, i)) and (c.isdigit() or unary):
            out.append(Token("num", i, m.end(), Fraction(int(m[0]))))
            i = m.end()
            continue
        if c == "-" and unary:
            j = i + 1
            while j < n and text[j].isspace():
                j += 1
            if j < n and text[j] == "(":
                out.append(Token("neg", i, i + 1))
                i += 1
                continue
            raise ValueError(f"expression {text!r}: a '-' at {i} is neither an operator nor a sign")
        if c in "+-*/":
            out.append(Token("op", i, i + 1, op=c))
        elif c in "()":
            out.append(Token(c, i, i + 1))
        else:
            raise ValueError(f"expression {text!r}: unexpected {c!r} at {i}")
        i += 1
    return out


def next_step(text: str) -> Step | None:
    """The next reduction of ``text``, or None when it is a single number."""
    toks = lex(text)
    if len(toks) == 1 and toks[0].kind == "num":
        return None
    close = next((k for k, t in enumerate(toks) if t.kind == ")"), None)
    if close is None:
        lo, hi = 0, len(toks)
    else:
        opens = [k for k in range(close) if toks[k].kind == "("]
        if not opens:
            raise ValueError(f"expression {text!r}: unbalanced ')'")
        lo, hi = opens[-1] + 1, close
    group = toks[lo:hi]
    ops = [k for k, t in enumerate(group) if t.kind == "op"]
    if len(group) == 1 and group[0].kind == "num":
        raise NoRewrite(f"expression {text!r}: a group holds only {text[group[0].start : group[0].end]!r}")
    if not ops or any(t.kind not in ("num", "op") for t in group) or len(group) != 2 * len(ops) + 1:
        raise ValueError(f"expression {text!r}: cannot read {text[group[0].start : group[-1].end]!r} as operations")
    k = next((k for k in ops if group[k].op in "*/"), ops[0])
    left, tok, right = group[k - 1], group[k], group[k + 1]
    result = apply_op(left.value, tok.op, right.value)
    start, end, shown = left.start, right.end, result
    if len(ops) == 1 and close is not None:  # the group's last operation: its parentheses go too,
        a, b = lo - 1, close  # and a negation in front of it, and groups that held only this one
        while True:
            if a >= 1 and toks[a - 1].kind == "neg":
                a, shown = a - 1, -shown
            if a >= 1 and toks[a - 1].kind == "(" and b + 1 < len(toks) and toks[b + 1].kind == ")":
                a, b = a - 1, b + 1
                continue
            break
        start, end = toks[a].start, toks[b].end
    new = text[:start] + format_number(shown) + text[end:]
    after = lex(new)
    final = len(after) == 1
    if final:  # the last step's conclusion is the value as the answer writes it; the value read back,
        # not ``shown``: "-((-80/8)*216/6)" becomes "-(-2160/6)", which reads as one fraction literal
        new = fmt_num(after[0].value)
    return Step(left.value, tok.op, right.value, result, new, final, (start, end), shown)


def rewrites(text: str) -> list[Step]:
    """Every step from ``text`` down to its value."""
    out: list[Step] = []
    while (s := next_step(text)) is not None:
        out.append(s)
        if s.final:
            break
        text = s.text
    return out


def top_level_terms(text: str) -> list[tuple[int, int]]:
    """The spans of the expression's top-level additive terms: the text between the ``+`` and ``-``
    operators outside every parenthesis (``3 * 4 - (5 + 6) + -7`` -> ``3 * 4``, ``(5 + 6)``, ``-7``)."""
    spans, start, depth, end = [], None, 0, 0
    for t in lex(text):
        if t.kind == "op" and t.op in "+-" and depth == 0:
            spans.append((start, end))
            start = None
            continue
        depth += (t.kind == "(") - (t.kind == ")")
        start = t.start if start is None else start
        end = t.end
    if start is None:
        raise ValueError(f"expression {text!r}: it ends with an operator")
    spans.append((start, end))
    return spans


def chunks(text: str, k: int) -> list[str]:
    """The expression cut into pieces of ``k`` top-level terms, as typed: the first piece starts at the
    first term, each later one at the end of the term before it, so it begins with its operator
    (``1 + 2 - 3 + 4 - 5``, k=2 -> ``1 + 2``, `` - 3 + 4``, `` - 5``). The value is the fold of the
    pieces: each piece applied to the value of those before it (top-level ``+``/``-`` associate left)."""
    if k < 1:
        raise ValueError(f"chunks: k must be >= 1, got {k}")
    spans = top_level_terms(text)
    cuts = [spans[i - 1][1] for i in range(k, len(spans), k)]
    edges = [spans[0][0], *cuts, spans[-1][1]]
    return [text[a:b] for a, b in pairwise(edges)]


def evaluate(text: str) -> Fraction:
    """The value by rewriting (what ``rewrites`` ends on)."""
    steps = rewrites(text)
    return Fraction(steps[-1].text) if steps else lex(text)[0].value

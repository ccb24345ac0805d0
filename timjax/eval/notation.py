"""Arithmetic in ordinary notation, from a code path of its own (issue 23): the evaluation set that is not
drawn from the training corpus's generator.

A problem is a random syntax tree (``Lit``, ``Minus``, ``BinOp``) over ``+ - * /`` with 3 to 8 integer
leaves of 1 to 4 digits, unary minus on literals (``-5``, so ``3 - -5`` and ``4 * -2`` occur) and on groups
(``-(3 + 4)``). Its own printer writes the tree as a person types it: precedence and left-associativity
with the fewest parentheses that keep the value, parentheses with or without inner spaces, and spaces
around every operator, none, or around ``+``/``-`` only (``2*3 + 4``). Its own evaluator computes the exact
answer with ``fractions.Fraction``: division may give a fraction, written ``p/q`` (the calculator takes
and returns that form). Nothing here imports ``timjax.train.corpus``'s expression code; only the
``Problem`` record is shared, so ``timjax eval`` runs these like any other problems.

Families are named by their number of leaves, ``notation-3`` .. ``notation-8``; a fixed seed gives the same
problems on every machine (``random.Random`` seeded by a string).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Union

from pydantic import BaseModel, Field

from timjax.train.corpus import Problem

MIN_TERMS, MAX_TERMS = 3, 8


@dataclass(frozen=True)
class Lit:
    value: int  # >= 0; a negative literal is Minus(Lit)


@dataclass(frozen=True)
class Minus:
    child: Node


@dataclass(frozen=True)
class BinOp:
    op: Literal["+", "-", "*", "/"]
    left: Node
    right: Node


Node = Union[Lit, Minus, BinOp]

PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class Style(BaseModel):
    """How one expression is typed."""

    spaces: Literal["all", "none", "additive"] = "all"  # around every operator / none / only + and -
    paren_spaces: bool = False  # "( 3 + 4 )" instead of "(3 + 4)"


class NotationParams(BaseModel):
    """What a notation problem is drawn from (defaults: the issue-23 evaluation set)."""

    terms: int = Field(5, ge=MIN_TERMS, le=MAX_TERMS, description="leaves of the syntax tree")
    max_digits: int = Field(4, ge=1, le=6, description="digits of a literal (1..max_digits, uniform)")
    p_neg_literal: float = Field(0.2, ge=0, le=1, description="a literal is negative")
    p_neg_group: float = Field(0.08, ge=0, le=1, description="a compound operand is negated: -( ... )")
    op_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.25, 0.15)  # + - * /
    max_value_digits: int = Field(9, ge=1, description="every intermediate numerator/denominator fits this")


# ----------------------------------------------------------------------------------------- tree


def evaluate_tree(n: Node) -> Fraction:
    """The exact value (``ZeroDivisionError`` on a zero divisor)."""
    if isinstance(n, Lit):
        return Fraction(n.value)
    if isinstance(n, Minus):
        return -evaluate_tree(n.child)
    a, b = evaluate_tree(n.left), evaluate_tree(n.right)
    if n.op == "+":
        return a + b
    if n.op == "-":
        return a - b
    if n.op == "*":
        return a * b
    return a / b


def leaves(n: Node) -> int:
    if isinstance(n, Lit):
        return 1
    if isinstance(n, Minus):
        return leaves(n.child)
    return leaves(n.left) + leaves(n.right)


def tree_depth(n: Node) -> int:
    """Binary-operator nesting: a literal 0, ``3 + 4`` 1, ``3 + 4 * 5`` 2 (unary minus adds nothing)."""
    if isinstance(n, Lit):
        return 0
    if isinstance(n, Minus):
        return tree_depth(n.child)
    return 1 + max(tree_depth(n.left), tree_depth(n.right))


def _values_fit(n: Node, limit: int) -> bool:
    """Every intermediate value's numerator and denominator below ``limit``; no zero divisor."""
    try:
        v = evaluate_tree(n)
    except ZeroDivisionError:
        return False
    if abs(v.numerator) >= limit or v.denominator >= limit:
        return False
    if isinstance(n, Minus):
        return _values_fit(n.child, limit)
    if isinstance(n, BinOp):
        return _values_fit(n.left, limit) and _values_fit(n.right, limit)
    return True


def random_tree(rng: random.Random, p: NotationParams) -> Node:
    """A tree with exactly ``p.terms`` leaves whose values stay within ``p.max_value_digits``."""
    limit = 10**p.max_value_digits
    for _ in range(10_000):
        t = _draw(rng, p.terms, p, top=True)
        if _values_fit(t, limit):
            return t
    raise RuntimeError(f"notation: no tree within {p.max_value_digits} digits for {p}")


def _draw(rng: random.Random, k: int, p: NotationParams, top: bool = False) -> Node:
    if k == 1:
        d = rng.randint(1, p.max_digits)
        lit = Lit(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        return Minus(lit) if lit.value and rng.random() < p.p_neg_literal else lit  # never "-0"
    split = rng.randint(1, k - 1)
    op = rng.choices("+-*/", p.op_weights)[0]
    node = BinOp(op, _draw(rng, split, p), _draw(rng, k - split, p))
    if not top and rng.random() < p.p_neg_group:
        return Minus(node)
    return node


# ----------------------------------------------------------------------------------------- printer


def _needs_parens(child: Node, op: str, right: bool) -> bool:
    """A binary child needs parentheses when it binds looser than its parent, or as the right operand of
    ``-`` or ``/`` at the same precedence. The right operand of ``+``/``*`` at the same precedence does not
    (``a + (b - c)`` is ``a + b - c``, ``a * (b / c)`` is ``a * b / c`` in exact arithmetic)."""
    if not isinstance(child, BinOp):
        return False  # literals and unary minus bind tightest
    if PREC[child.op] < PREC[op]:
        return True
    return right and PREC[child.op] == PREC[op] and op in "-/"


def render_tree(n: Node, style: Style = Style()) -> str:
    """The expression as typed in ``style`` (see the module docstring)."""
    lp, rp = ("( ", " )") if style.paren_spaces else ("(", ")")

    def sep(op: str) -> str:
        spaced = style.spaces == "all" or (style.spaces == "additive" and op in "+-")
        return f" {op} " if spaced else op

    def r(x: Node) -> str:
        if isinstance(x, Lit):
            return str(x.value)
        if isinstance(x, Minus):
            inner = r(x.child)
            return f"-{inner}" if isinstance(x.child, Lit) else f"-{lp}{inner}{rp}"
        left, right = r(x.left), r(x.right)
        if _needs_parens(x.left, x.op, False):
            left = f"{lp}{left}{rp}"
        if _needs_parens(x.right, x.op, True):
            right = f"{lp}{right}{rp}"
        return f"{left}{sep(x.op)}{right}"

    return r(n)


def format_value(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


# ----------------------------------------------------------------------------------------- problems

TEMPLATES = ("Calculate {}.", "What is {}?", "Compute {}.")


def random_style(rng: random.Random) -> Style:
    return Style(
        spaces=rng.choices(("all", "none", "additive"), (0.5, 0.25, 0.25))[0], paren_spaces=rng.random() < 0.5
    )


def notation_problem(rng: random.Random, p: NotationParams) -> Problem:
    tree = random_tree(rng, p)
    style = random_style(rng)
    text = render_tree(tree, style)
    answer = format_value(evaluate_tree(tree))
    data = {
        "expr": text,
        "terms": p.terms,
        "tree_depth": tree_depth(tree),
        "style": style.model_dump(),
        "fraction": "/" in answer,
    }
    return Problem("notation", rng.choice(TEMPLATES).format(text), answer, f"notation:{text}", p.terms, data)


def notation_problems(n: int, terms: int, *, seed: int = 23, params: NotationParams | None = None) -> list[Problem]:
    """The first ``n`` problems of family ``notation-<terms>`` for ``seed`` (distinct by text)."""
    p = (params or NotationParams()).model_copy(update={"terms": terms})
    NotationParams.model_validate(p.model_dump())  # terms out of 3..8 raises naming the field
    rng = random.Random(f"notation:{seed}:{terms}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        prob = notation_problem(rng, p)
        if prob.key not in seen:
            seen.add(prob.key)
            out.append(prob)
    return out

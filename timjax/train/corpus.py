"""The synthetic TIM corpus: problems that need recursive decomposition and tools, with verifiable answers.

Two kinds of problem:

* **arithmetic**: integer expressions as a person types them (``Calculate -(12 - 5) * (3 + 4).``): ``+ - * /``,
  parentheses only where precedence needs them, unary minus, negative literals. Division is exact only: a
  divisor is always a literal that divides the running value (so every value is an integer and the answer
  is checked exactly). ``depth`` is the nesting depth of operator chains (``3 + 4 * 5`` is depth 2);
  ``breadth`` the most operands in one chain (``3 + 4 - 5 + 6`` is one chain of 4).
* **lookup**: 2-3 hop questions over the knowledge base of the ``lookup`` tool
  (``Who is the mother of the boss of Ada Stone?``).

Each problem becomes one complete TIM document in the exact layout of ``tim_schema(tools=...)``:

* an expression node with operands ``o1 op o2 op ... ok`` is one task: its compound operands are solved
  first as subtasks (recursively), then each operator is one subtask that calls the calculator on two
  integers (the running value and the next operand); a node of two literals calls the calculator itself.
  Every conclusion is just the value, so a pruned subtask list leaves what the parent needs in view.
* a lookup question is one task whose subtasks are the hops, each a ``lookup`` call; each hop's entity is
  the previous hop's conclusion.

With ``rewrite`` (``DocFormat``, ``timjax.train.rewrite``), an arithmetic problem is instead one task of
steps that each compute one operation and write the whole expression again with that operation's span
replaced by its value, in the question's own style, so no step needs the precedence tree in its head.

A calculator call is one operation on two integers (``{"op": "sub", "a": 12, "b": 5}``), the thought before
it states the operation as typed (``Compute 12 - 5.``).

Tool results are the real servers' outputs, encoded by ``timjax.tools.encoding.encode_result`` (the exact
text the runtime writes after ``"tool_result"``); see ``timjax.train.tools_adapter``.

Splits: a problem's identity is its canonical form (``Problem.key``); it is in the held-out split iff a hash
of the key falls below ``heldout_fraction``, so train and held-out never share a problem whatever the
sizes, and a fixed seed reproduces the corpus exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Literal

from timjax.base.errors import ParameterError
from timjax.train import rewrite as rw
from timjax.train.rewrite import apply_op, fmt_num
from timjax.train.tools_adapter import Raw, ToolBackend, default_backend

Split = Literal["train", "heldout"]

# ----------------------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class Chain:
    """``operands[0] ops[0] operands[1] ops[1] ...``, all operators of one precedence class."""

    kind: Literal["add", "mul"]
    operands: tuple[Expr, ...]
    ops: tuple[str, ...]  # len(operands) - 1 operators, '+'/'-' or '*'/'/'


@dataclass(frozen=True)
class Neg:
    child: Expr  # a compound expression (a negated literal is a Num)


Expr = Num | Chain | Neg


def depth(e: Expr) -> int:
    if isinstance(e, Num):
        return 0
    if isinstance(e, Neg):
        return 1 + depth(e.child)
    return 1 + max(depth(o) for o in e.operands)


def widest_chain(e: Expr) -> int:
    """The most operands of one chain in ``e`` (``3 + 4`` has 2, ``3 + 4 - 5`` 3; a literal 0)."""
    if isinstance(e, Neg):
        return widest_chain(e.child)
    if isinstance(e, Chain):
        return max([len(e.operands)] + [widest_chain(o) for o in e.operands])
    return 0


def value(e: Expr) -> Fraction:
    if isinstance(e, Num):
        return Fraction(e.value)
    if isinstance(e, Neg):
        return -value(e.child)
    acc = value(e.operands[0])
    for op, o in zip(e.ops, e.operands[1:]):
        acc = apply_op(acc, op, value(o))
    return acc


def _needs_parens(child: Expr, parent: Chain) -> bool:
    # an operand that is itself a chain of the same class, or a sum inside a product, needs parentheses
    return isinstance(child, Chain) and (child.kind == parent.kind or parent.kind == "mul")


def render(e: Expr, *, spaced_parens: bool = False, tight: bool = False, additive: bool = False) -> str:
    """The expression as typed: binary operators spaced (``tight``: not, ``3*4+-5``; ``additive``: only
    ``+`` and ``-``, ``3*4 + -5``), parentheses only where needed."""
    lp, rp = ("( ", " )") if spaced_parens else ("(", ")")
    sp = "" if tight else " "
    msp = "" if additive else sp

    def r(x: Expr) -> str:
        if isinstance(x, Num):
            return str(x.value)
        if isinstance(x, Neg):
            return f"-{lp}{r(x.child)}{rp}"
        parts, gap = [], msp if x.kind == "mul" else sp
        for i, o in enumerate(x.operands):
            s = r(o)
            if _needs_parens(o, x):
                s = f"{lp}{s}{rp}"
            parts.append(s if i == 0 else f"{x.ops[i - 1]}{gap}{s}")
        return gap.join(parts)

    return r(e)


@dataclass(frozen=True)
class ArithParams:
    depth: int = 3
    breadth: int = 3  # most operands per chain
    max_literal: int = 20
    p_binary: float = 0.7  # a chain has two operands (else 3 .. breadth)
    p_literal: float = 0.6  # an operand off the deepest path is a literal
    p_negative_literal: float = 0.08
    p_neg: float = 0.12  # a compound operand is negated: -( ... )
    p_div: float = 0.35  # a literal operand of a product becomes an exact divisor
    max_abs_value: int = 99_999
    digits_uniform: bool = False  # a literal's digit count is uniform in 1 .. digits of max_literal
    # a literal operand of a product that is not an exact divisor becomes a divisor 2..12 anyway: values
    # may then be fractions "p/q" (the calculator's form); 0 keeps every value an integer
    p_fraction: float = 0.0


def _literal(rng: random.Random, p: ArithParams) -> Num:
    if p.digits_uniform:  # 4-digit literals among small ones, not 90% of them (only drawn when on)
        d = rng.randint(1, len(str(p.max_literal)))
        v = rng.randint(10 ** (d - 1), min(10**d - 1, p.max_literal))
    else:
        v = rng.randint(1, p.max_literal)
    return Num(-v if rng.random() < p.p_negative_literal else v)


def _chain(rng: random.Random, d: int, p: ArithParams, parent_kind: str | None) -> Expr:
    """A random expression of exactly depth ``d`` (>= 1)."""
    if d >= 2 and rng.random() < p.p_neg:
        return Neg(_chain(rng, d - 1, p, None))
    kind = rng.choice(("add", "mul"))
    k = 2 if p.breadth <= 2 or rng.random() < p.p_binary else rng.randint(3, p.breadth)
    deep = rng.randrange(k)
    operands = []
    for i in range(k):
        od = d - 1 if i == deep else (0 if rng.random() < p.p_literal else rng.randint(0, d - 1))
        operands.append(_literal(rng, p) if od == 0 else _chain(rng, od, p, kind))
    if kind == "add":
        ops = [rng.choice("+-") for _ in range(k - 1)]
    else:
        ops = []
        acc = value(operands[0])
        for i in range(1, k):
            op = "*"
            if isinstance(operands[i], Num) and rng.random() < p.p_div and acc.denominator == 1:
                divs = [q for q in range(2, 13) if acc.numerator % q == 0]
                if divs:
                    operands[i] = Num(rng.choice(divs))
                    op = "/"
            if op == "*" and p.p_fraction > 0 and isinstance(operands[i], Num) and rng.random() < p.p_fraction:
                operands[i], op = Num(rng.randint(2, 12)), "/"
            ops.append(op)
            acc = apply_op(acc, op, value(operands[i]))
    return Chain(kind, tuple(operands), tuple(ops))


def _values_ok(e: Expr, p: ArithParams) -> bool:
    if isinstance(e, Num):
        return abs(e.value) <= p.max_abs_value
    if isinstance(e, Neg):
        return _values_ok(e.child, p)
    acc = value(e.operands[0])
    for op, o in zip(e.ops, e.operands[1:]):
        if not _values_ok(o, p):
            return False
        acc = apply_op(acc, op, value(o))
        if (acc.denominator != 1 and not p.p_fraction) or max(abs(acc.numerator), acc.denominator) > p.max_abs_value:
            return False
    return _values_ok(e.operands[0], p)


def random_expression(rng: random.Random, p: ArithParams) -> Expr:
    for _ in range(1000):
        e = _chain(rng, p.depth, p, None)
        if depth(e) == p.depth and _values_ok(e, p):
            return e
    raise RuntimeError(f"could not draw an expression with {p}")


def parse_expression(text: str) -> Expr:
    """Parse a typed expression back into the tree (the canonical form ``render`` writes)."""
    toks = text.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def atom() -> Expr:
        t = take()
        if t == "(":
            e = chain()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {text!r}")
            return e
        if t == "-" and peek() == "(":
            take()
            e = chain()
            take()
            return Neg(e)
        if t.lstrip("-").isdigit():
            return Num(int(t))
        raise ValueError(f"unexpected {t!r} in {text!r}")

    def product() -> Expr:
        ops, xs = [], [atom()]
        while peek() in ("*", "/"):
            ops.append(take())
            xs.append(atom())
        return xs[0] if not ops else Chain("mul", tuple(xs), tuple(ops))

    def chain() -> Expr:
        ops, xs = [], [product()]
        while peek() in ("+", "-"):
            ops.append(take())
            xs.append(product())
        return xs[0] if not ops else Chain("add", tuple(xs), tuple(ops))

    e = chain()
    if pos != len(toks):
        raise ValueError(f"trailing input in {text!r}")
    return e


# ----------------------------------------------------------------------------------------- problems

ARITH_TEMPLATES = ("Calculate {}.", "What is {}?", "Compute {}.")


@dataclass(frozen=True)
class Problem:
    kind: Literal["arith", "lookup"]
    question: str
    answer: str
    key: str  # canonical identity: the split is a function of it
    depth: int  # arithmetic: expression depth; lookup: number of hops
    data: dict = field(default_factory=dict, compare=False)  # arith: {"expr"}; lookup: {"start", "relations"}

    def to_json(self) -> dict:
        return asdict(self)


def split_of(key: str, heldout_fraction: float) -> Split:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "train"


def fmt_int(v: Fraction) -> str:
    if v.denominator != 1:
        raise ValueError(f"{v} is not an integer")
    return str(v.numerator)


def _calc_arg(v: Fraction) -> int | str:
    return v.numerator if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def arith_problem(
    rng: random.Random,
    p: ArithParams,
    *,
    p_tight: float = 0.0,
    flat: bool = False,
    sum_terms: int = 0,
    p_additive: float = 0.0,
) -> Problem:
    """``p_tight``: share of questions typed without spaces around operators, ``p_additive`` (of the
    others) with spaces around ``+``/``-`` only (each drawn only when > 0, so a corpus without them
    draws exactly as before); ``flat``: a flat expression (``flat_expression``);
    ``sum_terms``: a long sum of up to that many compound operands (``sum_expression``)."""
    if sum_terms:
        e = sum_expression(rng, p, sum_terms)
    else:
        e = flat_expression(rng, p) if flat else random_expression(rng, p)
    canonical = render(e)
    spaced = rng.random() < 0.5
    tight = p_tight > 0 and rng.random() < p_tight
    additive = not tight and p_additive > 0 and rng.random() < p_additive
    typed = render(e, spaced_parens=spaced, tight=tight, additive=additive)
    q = rng.choice(ARITH_TEMPLATES).format(typed)
    return Problem("arith", q, fmt_num(value(e)), "arith:" + canonical, depth(e), {"expr": canonical})


def lookup_problem(rng: random.Random, tools: ToolBackend, hops: int) -> Problem:
    start, relations, answer = tools.random_chain(rng, hops)
    phrase = start
    for rel in relations:
        phrase = f"the {tools.relation_phrase(rel)} of {phrase}"
    q = f"{tools.question_word(relations[-1])} is {phrase}?"
    key = "lookup:" + json.dumps([start, list(relations)])
    return Problem("lookup", q, answer, key, hops, {"start": start, "relations": list(relations)})


def flat_expression(rng: random.Random, p: ArithParams) -> Expr:
    """A sum of 3 .. ``p.breadth`` terms without parentheses, each term a literal or a product of two
    (``12 - 3 * -4 + 8 / 2 - 7``): precedence and left-associativity with nothing to bracket them."""
    for _ in range(1000):
        k = rng.randint(3, max(3, p.breadth))
        terms: list[Expr] = []
        for _ in range(k):
            if rng.random() < 0.4:
                terms.append(_literal(rng, p))
                continue
            a, b = _literal(rng, p), _literal(rng, p)
            op = "*"
            divs = [q for q in range(2, 13) if a.value % q == 0]
            if divs and rng.random() < p.p_div:
                b, op = Num(rng.choice(divs)), "/"
            elif p.p_fraction > 0 and rng.random() < p.p_fraction:
                b, op = Num(rng.randint(2, 12)), "/"
            terms.append(Chain("mul", (a, b), (op,)))
        e = Chain("add", tuple(terms), tuple(rng.choice("+-") for _ in range(k - 1)))
        if _values_ok(e, p):
            return e
    raise RuntimeError(f"could not draw a flat expression with {p}")


def sum_expression(rng: random.Random, p: ArithParams, n_max: int) -> Expr:
    """A long sum: 3 .. ``n_max`` operands, each an expression of depth 1-3 (``p.depth`` is ignored): the
    shape of the beyond-context family (``timjax.eval.long``), whose tree outgrows the context while each
    operand's subtask list is pruned once solved."""
    from dataclasses import replace

    for _ in range(1000):
        k = rng.randint(3, max(3, n_max))
        operands = tuple(random_expression(rng, replace(p, depth=rng.randint(1, 3))) for _ in range(k))
        e = Chain("add", operands, tuple(rng.choice("+-") for _ in range(k - 1)))
        if _values_ok(e, p):
            return e
    raise RuntimeError(f"could not draw a sum of up to {n_max} operands with {p}")


@dataclass(frozen=True)
class CorpusSpec:
    """What to draw. ``mix``: (kind, depth-or-hops, weight) triples."""

    seed: int = 0
    mix: tuple[tuple[str, int, float], ...] = (
        ("arith", 1, 1.0),
        ("arith", 2, 2.0),
        ("arith", 3, 3.0),
        ("lookup", 2, 1.5),
        ("lookup", 3, 1.5),
    )
    breadth: int = 3
    max_literal: int = 20
    heldout_fraction: float = 0.05
    # share of operator chains with two operands (the rest have 3 .. breadth). Training may lower it: the
    # tiny TIM's depth-3 errors were all in chains of three operands, where the next operand is picked
    # between literals and subtask values. The split does not depend on it (it hashes the problem).
    p_binary: float = ArithParams.p_binary
    # notation options (issue 23); the defaults draw exactly the corpus the shipped stages were trained on.
    # A mix entry ("flat", N, w) draws flat sums of 3..N terms (flat_expression); ("sum", N, w) long sums
    # of 3..N compound operands (sum_expression).
    p_negative_literal: float = ArithParams.p_negative_literal
    max_abs_value: int = ArithParams.max_abs_value
    p_tight: float = 0.0  # share of questions typed without spaces around operators
    digits_uniform: bool = False  # ArithParams.digits_uniform
    p_fraction: float = 0.0  # ArithParams.p_fraction: division giving fractions "p/q"
    # share of arithmetic documents written under another calculator contract (CONTRACT_ORDERS x
    # CONTRACT_RESULTS, drawn uniformly); the problem carries it in data["contract"]
    p_tool_contract: float = 0.0
    p_additive: float = 0.0  # share of (non-tight) questions spaced around + and - only: "2*3 + 4"


# consecutive draws without a new problem after which the stream counts as used up: a live group of a
# 5% split hits about every 20 draws, so 20,000 misses in a row never happen by chance
MAX_MISSES = 20_000


def iter_problems(
    spec: CorpusSpec, split: Split, tools: ToolBackend | None = None, *, stream: int = 0
) -> Iterator[Problem]:
    """An endless deterministic stream of distinct problems of one split (``stream`` picks an independent
    stream of the same distribution, e.g. to draw evaluation problems separately from training ones)."""
    tools = tools or default_backend()
    rng = random.Random(f"{spec.seed}:{stream}")
    weights = [w for _, _, w in spec.mix]
    seen: set[str] = set()
    misses = 0
    while True:
        kind, d, _ = rng.choices(spec.mix, weights)[0]
        if kind in ("arith", "flat", "sum"):
            flat = kind == "flat"
            ap = ArithParams(
                depth=2 if kind != "arith" else d,
                breadth=d if flat else spec.breadth,
                max_literal=spec.max_literal,
                p_binary=spec.p_binary,
                p_negative_literal=spec.p_negative_literal,
                max_abs_value=spec.max_abs_value,
                digits_uniform=spec.digits_uniform,
                p_fraction=spec.p_fraction,
            )
            prob = arith_problem(
                rng,
                ap,
                p_tight=spec.p_tight,
                flat=flat,
                sum_terms=d if kind == "sum" else 0,
                p_additive=spec.p_additive,
            )
            if spec.p_tool_contract > 0 and rng.random() < spec.p_tool_contract:  # drawn only when on
                order, form = rng.choice(CONTRACT_ORDERS), rng.choice(CONTRACT_RESULTS)
                prob.data["contract"] = {"order": list(order), "result": form}
        elif kind == "lookup":
            prob = lookup_problem(rng, tools, d)
        else:  # e.g. an eval family name (notation-5) handed to a corpus mix: never lookups in disguise
            raise ParameterError(f"corpus mix: unknown kind {kind!r}; use arith, flat, sum or lookup")
        if prob.key in seen or split_of(prob.key, spec.heldout_fraction) != split:
            misses += 1
            if misses >= MAX_MISSES:  # every group of the mix is used up (a small KB has few lookups)
                groups = ", ".join(f"{k}-{depth}" for k, depth, _ in spec.mix)
                raise ParameterError(
                    f"corpus: only {len(seen)} distinct {split} problems of {groups} exist "
                    f"(no new one in {MAX_MISSES:,} draws); ask for fewer"
                )
            continue
        misses = 0
        seen.add(prob.key)
        yield prob


def problems(
    spec: CorpusSpec,
    split: Split,
    n: int,
    *,
    kind: str | None = None,
    depth: int | None = None,
    tools: ToolBackend | None = None,
    stream: int = 0,
    progress: bool = False,
) -> list[Problem]:
    """The first ``n`` problems of a split (optionally of one kind and depth); ``progress``: a bar (a
    training corpus of tens of thousands takes minutes, each problem solved with real tool calls)."""
    if kind is not None or depth is not None:
        spec = CorpusSpec(
            **{
                **asdict(spec),
                "mix": tuple(
                    m for m in spec.mix if (kind is None or m[0] == kind) and (depth is None or m[1] == depth)
                ),
            }
        )
        if not spec.mix:
            raise ValueError(f"no problems of kind={kind!r} depth={depth!r} in the corpus mix")
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=n, desc="problems", unit="problem", disable=not progress, mininterval=2.0) as bar:
        for prob in iter_problems(spec, split, tools, stream=stream):
            out.append(prob)
            bar.update()
            if len(out) == n:
                break
    return out


# ----------------------------------------------------------------------------------------- documents


def dumps_doc(obj) -> str:
    """Serialise a document exactly as the grammar lays it out (``json.dumps`` separators, key order as
    given, ``Raw`` values verbatim)."""
    if isinstance(obj, Raw):
        return str(obj)
    if isinstance(obj, dict):
        return "{" + ", ".join(json.dumps(k, ensure_ascii=False) + ": " + dumps_doc(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(dumps_doc(v) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def _tool_task(thought: str, tooluse: dict, conclusion: str) -> dict:
    return {"thought": thought, "tooluse": tooluse, "conclusion": conclusion}


def _calc_step(tools: ToolBackend, a: Fraction, op: str, b: Fraction) -> tuple[dict, Fraction]:
    expr = f"{fmt_num(a)} {op} {fmt_num(b)}"
    tooluse, result = tools.calculate(_calc_arg(a), op, _calc_arg(b))
    if result != apply_op(a, op, b):
        raise RuntimeError(f"calculator returned {result} for {expr}")
    return _tool_task(f"Compute {expr}.", tooluse, fmt_num(result)), result


def arith_task(e: Expr, tools: ToolBackend, *, restate: bool = False) -> tuple[dict, Fraction]:
    """The task solving ``e`` and its value.

    A chain solves its compound operands as subtasks, then applies its operators one calculator step at a
    time. With ``restate``, a chain of three or more operands with a compound one first restates itself
    with the solved values (``Compute 65 * 5 * -2.``) as a subtask of its own that holds the steps: the
    next operand is then always in that thought, beside the running value, never to be picked between
    the parent's literals and the subtasks' conclusions (the tiny TIM's depth-3 errors were all that
    pick), and the steps form one more subtask list that pruning forgets."""
    if isinstance(e, Neg):
        child, v = arith_task(e.child, tools, restate=restate)
        step, r = _calc_step(tools, Fraction(0), "-", v)
        return {"thought": f"Compute -({render(e.child)}).", "subtasks": [child, step], "conclusion": fmt_num(r)}, r
    subtasks: list[dict] = []
    vals: list[Fraction] = []
    for o in e.operands:
        if isinstance(o, Num):
            vals.append(Fraction(o.value))
        else:
            t, v = arith_task(o, tools, restate=restate)
            subtasks.append(t)
            vals.append(v)
    if not subtasks and len(e.operands) == 2:
        step, r = _calc_step(tools, vals[0], e.ops[0], vals[1])
        return step, r
    if restate and subtasks and len(e.operands) > 2:
        solved = Chain(e.kind, tuple(Num(int(v) if v.denominator == 1 else v) for v in vals), e.ops)
        combine, acc = arith_task(solved, tools)
        subtasks.append(combine)
    else:
        acc = vals[0]
        for op, v in zip(e.ops, vals[1:]):
            step, acc = _calc_step(tools, acc, op, v)
            subtasks.append(step)
    return {"thought": f"Compute {render(e)}.", "subtasks": subtasks, "conclusion": fmt_num(acc)}, acc


REWRITE_THOUGHT = "Rewrite it one operation at a time."
CHUNK_THOUGHT = "Rewrite it a few terms at a time."
CALL_THOUGHT = "Use the calculator."


def question_expression(question: str) -> str:
    """The expression as the question typed it (``Calculate 3*(4 + 5).`` -> ``3*(4 + 5)``)."""
    for t in ARITH_TEMPLATES:
        head, _, tail = t.partition("{}")
        if question.startswith(head) and question.endswith(tail):
            return question[len(head) : len(question) - len(tail)]
    raise ValueError(f"not an arithmetic question of the corpus: {question!r}")


def rewrite_task(text: str, tools: ToolBackend, fallback: Expr | None) -> tuple[dict, Fraction]:
    """The task solving ``text`` in the rewrite format (``timjax.train.rewrite``): one subtask per
    operation, its conclusion the whole expression after it, in the question's own style; the last
    subtask's conclusion is the value.

    Each step holds its calculator call in a subtask list of its own (``Compute 59 * 9.`` -> [``Use the
    calculator.`` + call] -> the rewritten expression), so pruning forgets the call and keeps the step's
    thought and conclusion: the state stays in view whatever the buffer, while the call's result is
    needed only to write the step's own conclusion (buffer >= 1 keeps it until then; buffer 0 prunes it
    first). A text the rewrite reads as one number (``-(1/4)`` typed tight) or cannot write
    (``rewrite.NoRewrite``) is solved as ``arith_task`` solves ``fallback``, its expression (None: it
    raises ``ValueError``)."""
    try:
        steps = rw.rewrites(text)
    except rw.NoRewrite:
        steps = []
    if not steps:
        if fallback is None:
            raise ValueError(f"expression {text!r}: no rewrite step writes it")
        return arith_task(fallback, tools)
    subtasks = []
    for s in steps:
        call, _ = _calc_step(tools, s.a, s.op, s.b)
        thought, call["thought"] = call["thought"], CALL_THOUGHT
        subtasks.append({"thought": thought, "subtasks": [call], "conclusion": s.text})
    v = Fraction(steps[-1].text)
    return {"thought": REWRITE_THOUGHT, "subtasks": subtasks, "conclusion": fmt_num(v)}, v


def lookup_task(prob: Problem, tools: ToolBackend) -> tuple[dict, str]:
    entity = prob.data["start"]
    rels = prob.data["relations"]
    plan = ", then ".join(tools.relation_phrase(r) for r in rels)
    hops = []
    for rel in rels:
        tooluse, result = tools.lookup(entity, rel)
        hops.append(_tool_task(f"Find the {tools.relation_phrase(rel)} of {entity}.", tooluse, result))
        entity = result
    return {"thought": f"Start from {prob.data['start']}: {plan}.", "subtasks": hops, "conclusion": entity}, entity


# calculator contracts a document may be written under (issue 23): the order of the call's parameters (the
# grammar writes them in the input schema's order) and the result's form, as a server that returns
# {"result": x}, {"value": x} or a bare number reads after the runtime's canonical encoding
CONTRACT_ORDERS = (("op", "a", "b"), ("a", "b", "op"), ("a", "op", "b"))


def chunked_task(text: str, tools: ToolBackend, fallback: Expr, k: int) -> tuple[dict, Fraction]:
    """The rewrite format with the expression taken ``k`` top-level terms at a time
    (``rewrite.chunks``) when it has more: one subtask per piece, whose thought is the piece after the
    value so far (``Compute -17 - 5 * 2 + 8.``), whose subtasks are that expression's rewrite steps and
    whose conclusion is its value. A long sum is then never copied whole: each step rewrites one piece, and
    pruning forgets a solved piece's steps, so the working memory holds the question, one thought and
    value per piece, and the piece in hand, however long the sum. Fewer terms: ``rewrite_task``."""
    if k < 2:  # a piece of one term may be one number, which no step writes
        raise ValueError(f"chunk_terms must be >= 2, got {k}")
    try:
        pieces = rw.chunks(text, k)
        if len(pieces) >= 2:
            subtasks, acc = [], None
            for piece in pieces:
                expr = piece if acc is None else rw.format_number(acc) + piece
                steps, acc = rewrite_task(expr, tools, None)
                subtasks.append({**steps, "thought": f"Compute {expr}."})
            return {"thought": CHUNK_THOUGHT, "subtasks": subtasks, "conclusion": fmt_num(acc)}, acc
    except ValueError:  # a piece no step writes (a group of one number typed tight): the whole, unchunked
        pass
    return rewrite_task(text, tools, fallback)


CONTRACT_RESULTS = ("result", "value", "bare")


class ContractTools:
    """``tools`` whose calculator calls are written under ``contract`` (``{"order", "result"}``)."""

    def __init__(self, tools: ToolBackend, contract: dict):
        self.tools, self.order, self.form = tools, tuple(contract["order"]), contract["result"]

    def calculate(self, a, op: str, b) -> tuple[dict, Fraction]:
        from timjax.tools.encoding import encode_result, encode_value

        tooluse, result = self.tools.calculate(a, op, b)
        x = _calc_arg(result)
        if self.form == "value":
            tooluse["tool_result"] = Raw(encode_result({"value": x}))
        elif self.form == "bare":
            tooluse["tool_result"] = Raw(encode_value(x))
        tooluse["parameters"] = {k: tooluse["parameters"][k] for k in self.order}
        return tooluse, result

    def __getattr__(self, name):
        return getattr(self.tools, name)


def contract_specs(specs: Sequence, order: Sequence[str]) -> list:
    """The tool specs with the calculator's parameters listed in ``order`` (what a server whose function
    takes them in that order lists)."""
    out = []
    for s in specs:
        if s.name == "calculator":
            props = s.input_schema["properties"]
            schema = {**s.input_schema, "properties": {k: props[k] for k in order}, "required": list(order)}
            s = s.model_copy(update={"input_schema": schema})
        out.append(s)
    return out


@dataclass(frozen=True)
class DocFormat:
    """How an arithmetic document is written: ``restate`` (``arith_task``) or ``rewrite``
    (``rewrite_task``, which wins when both are set). Lookups are written one way."""

    restate: bool = False
    rewrite: bool = False
    # with rewrite: an expression of more top-level terms is rewritten this many at a time (chunked_task)
    chunk_terms: int = 0


def document(
    prob: Problem,
    tools: ToolBackend | None = None,
    *,
    restate: bool = False,
    rewrite: bool = False,
    chunk_terms: int = 0,
) -> dict:
    """The complete TIM response (a dict whose ``tool_result`` values are ``Raw`` encoded text);
    ``restate``, ``rewrite``, ``chunk_terms``: see ``DocFormat``; a problem with ``data["contract"]``
    calls the calculator under it."""
    tools = tools or default_backend()
    if prob.data.get("contract"):
        tools = ContractTools(tools, prob.data["contract"])
    if prob.kind == "arith" and rewrite:
        text, fallback = question_expression(prob.question), _parsed_or_none(prob.data["expr"])
        if chunk_terms:
            task, v = chunked_task(text, tools, fallback, chunk_terms)
        else:
            task, v = rewrite_task(text, tools, fallback)
        answer = fmt_num(v)
    elif prob.kind == "arith":
        task, v = arith_task(parse_expression(prob.data["expr"]), tools, restate=restate)
        answer = fmt_num(v)
    else:
        task, answer = lookup_task(prob, tools)
    if answer != prob.answer:
        raise RuntimeError(f"document answer {answer!r} differs from the problem's {prob.answer!r}: {prob.question}")
    return {"reasoning": [task], "answer": answer}


def _parsed_or_none(text: str) -> Expr | None:
    """The corpus's reading of ``text`` (a rewrite's fallback, rarely used), None for a text typed by
    another printer (``5*6`` beside ``8 / 2``): the rewrite reads those itself."""
    try:
        return parse_expression(text)
    except ValueError:
        return None


def document_text(
    prob: Problem,
    tools: ToolBackend | None = None,
    *,
    restate: bool = False,
    rewrite: bool = False,
    chunk_terms: int = 0,
) -> str:
    return dumps_doc(document(prob, tools, restate=restate, rewrite=rewrite, chunk_terms=chunk_terms))


def check_answer(prob_answer: str, response_answer) -> bool:
    """The verifier: the response's answer equals the problem's (integers compared as numbers)."""
    got = str(response_answer).strip()
    if got == prob_answer:
        return True
    try:
        return Fraction(got) == Fraction(prob_answer)
    except (ValueError, ZeroDivisionError):
        return False


def solved(problem: Problem, result) -> bool:
    """A generation result (``timjax.generate``'s) solved ``problem``: a complete tree whose answer the
    verifier accepts. The reward of GRPO and the accuracy of ``timjax eval``."""
    return (
        result.finish_reason == "stop"
        and result.response is not None
        and check_answer(problem.answer, result.response.answer)
    )


# problem groups KIND-DEPTH the corpus draws (``timjax eval`` adds its own families to these)
GROUP_RANGES = {"arith": (1, 6), "lookup": (1, 4)}


def parse_groups(text: str | Sequence[str], ranges: dict[str, tuple[int, int]] = GROUP_RANGES) -> tuple:
    """``"arith-3,lookup-2"`` -> ``(("arith", 3), ("lookup", 2))``; a bad entry raises naming it and the
    groups ``ranges`` allows."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in (i.strip() for i in items):
        kind, _, depth = item.partition("-")
        lo, hi = ranges.get(kind, (1, 0))
        if not depth.isdigit() or not lo <= int(depth) <= hi:
            names = ", ".join(f"{k}-{a}..{k}-{b}" for k, (a, b) in ranges.items())
            raise ValueError(f"--groups: {item!r} is not one of {names}")
        out.append((kind, int(depth)))
    if not out:
        raise ValueError("--groups: no group given")
    return tuple(out)


def load_problems_jsonl(path: str) -> list[Problem]:
    """``{"question", "answer"}`` lines (other fields kept in ``data``) as problems of kind 'external'."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                q, a = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected a JSON object with 'question' and 'answer' ({e})") from e
            kind = row.get("kind", "external")
            out.append(Problem(kind, str(q), str(a), f"{kind}:{q}", int(row.get("depth", 0)), dict(row)))
    return out


def save_problems_jsonl(probs: Sequence[Problem], path: str) -> None:
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(
                {"question": p.question, "answer": p.answer, "kind": p.kind, "depth": p.depth}, ensure_ascii=False
            )
            + "\n"
            for p in probs
        )
    os.replace(tmp, path)


def iter_tasks_with_tools(doc: dict):
    """The ``tooluse`` objects of a parsed document, in document order."""

    def walk(tasks):
        for t in tasks:
            if "tooluse" in t:
                yield t["tooluse"]
            yield from walk(t.get("subtasks") or [])

    yield from walk(doc["reasoning"])

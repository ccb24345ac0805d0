"""The beyond-context family (issue 23): problems whose whole reasoning tree is at least K times the
model's context C, while the working memory that pruning leaves fits in C.

A problem is one long sum: a top-level chain of depth-3 expressions (``(9 + 8 * 7) * 5 - ... + ...``),
drawn with the training corpus's expression generator (this family tests the context, not the
notation). Operands are added one at a time until the reference tree (the corpus's own document for
the problem, restated format, replayed through the runtime's grammar and tokenizer) is at least
``K * C`` tokens. The same replay runs the runtime's prune buffer and working-memory bookkeeping, and the
problem is kept only if its peak working memory with buffers 1 and 2 stays within ``fit * C``: so with
pruning off the run must stop at the limit (reported as finish ``length``), and with pruning on a model
that writes the reference tree solves it inside C positions.

With the chunked rewrite format (``DocFormat(rewrite=True, chunk_terms=k)``, ``corpus.chunked_task``)
the sum is flat instead: terms are literals or products and quotients of two (``12 - 3 * -4 + 8 / 2``),
the shape whose plain rewrite would copy the whole sum at every step, and which the chunked format
solves ``k`` terms at a time. Terms are added until the reference tree in that format is ``K * C``.

Family name ``long-K``; ``Problem.data`` holds ``tree_tokens`` (reference tree length, prompt excluded),
``context`` (C), ``peak_buf1``/``peak_buf2`` (reference peak working memory, prompt included) and
``tree_depth``.
"""

from __future__ import annotations

import dataclasses
import random
from functools import lru_cache

from timjax.base.errors import ParameterError
from timjax.train.corpus import (
    ArithParams,
    Chain,
    DocFormat,
    Problem,
    depth,
    document_text,
    flat_expression,
    fmt_int,
    random_expression,
    render,
    value,
)

MAX_OPERANDS = 16
MAX_FLAT_TERMS = 64
RESTATED = DocFormat(restate=True)  # the shipped tiny TIM's format


def peak_working(doc, buffer: int | None) -> int:
    """Peak working-memory tokens (prompt included) of a replayed document under ``buffer`` (None: off),
    from the runtime's own ``PruneBuffer`` / ``WorkingMemory``."""
    if buffer is None:
        return len(doc.prompt) + len(doc.tokens)
    from timjax.train.runtime_view import memory_after

    return memory_after(doc, buffer).stats().peak_working_len


@lru_cache(maxsize=2)
def _replayer(tokenizer_dir: str):
    from timjax.train.runtime_view import Replayer
    from timjax.train.tokenizer import load_tokenizer
    from timjax.train.tools_adapter import default_backend, training_schema

    tools = default_backend(0)
    return Replayer(load_tokenizer(tokenizer_dir), training_schema(tools), None), tools


def long_problems(
    n: int,
    k: int,
    context: int,
    tokenizer_dir: str,
    *,
    seed: int = 23,
    fit: float = 0.95,
    operand_depth: int = 3,
    attempts: int = 50,
    fmt: DocFormat = RESTATED,
) -> list[Problem]:
    """``n`` problems of family ``long-<k>`` for context ``context`` with the tokenizer in ``tokenizer_dir``
    (a model directory), their reference trees written in ``fmt``; raises ``ParameterError`` naming ``k``
    when no such tree fits the context."""
    if k < 1:
        raise ParameterError(f"long family: k must be >= 1, got {k}")
    replayer, tools = _replayer(str(tokenizer_dir))
    rng = random.Random(f"long:{seed}:{k}:{context}")
    params = ArithParams(depth=operand_depth, breadth=3)
    draw = _draw_flat if fmt.chunk_terms else _draw_one
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        prob = draw(rng, params, k, k * context, replayer, tools, fmt)
        if prob is not None and max(prob.data["peak_buf1"], prob.data["peak_buf2"]) <= fit * context:
            prob.data["context"] = context
            out.append(prob)
            misses = 0
            continue
        misses += 1
        if misses >= attempts:
            raise ParameterError(
                f"long family: no tree of >= {k} x {context} tokens whose pruned working memory fits "
                f"{fit:.0%} of the context in {attempts} draws; use a smaller k or a larger context"
            )
    return out


def _draw_one(
    rng: random.Random, params: ArithParams, k: int, target: int, replayer, tools, fmt: DocFormat
) -> Problem | None:
    """A sum of depth-``params.depth`` operands, grown one operand at a time until its tree is ``target``."""
    operands = [random_expression(rng, params), random_expression(rng, params)]
    ops = [rng.choice("+-")]
    while len(operands) <= MAX_OPERANDS:
        prob = _measured(Chain("add", tuple(operands), tuple(ops)), params, k, target, replayer, tools, fmt)
        if prob is not None:
            return prob
        operands.append(random_expression(rng, params))
        ops.append(rng.choice("+-"))
    return None


def _draw_flat(
    rng: random.Random, params: ArithParams, k: int, target: int, replayer, tools, fmt: DocFormat
) -> Problem | None:
    """A flat sum of literals and two-factor terms (``corpus.flat_expression``'s terms), grown a few terms
    at a time until its tree is ``target``."""
    flat = ArithParams(depth=2, breadth=8, max_literal=99, p_negative_literal=0.1)
    terms, ops = [], []
    while len(terms) < MAX_FLAT_TERMS:
        more = flat_expression(rng, flat)
        terms += more.operands
        ops += [rng.choice("+-")] * bool(ops) + list(more.ops)
        prob = _measured(Chain("add", tuple(terms), tuple(ops)), params, k, target, replayer, tools, fmt)
        if prob is not None:
            return prob
    return None


def _measured(e: Chain, params: ArithParams, k: int, target: int, replayer, tools, fmt: DocFormat) -> Problem | None:
    """The problem of ``e`` with its reference tree's figures, if its value is an integer in range and the
    tree (the corpus's document in ``fmt``, replayed) is at least ``target`` tokens."""
    v = value(e)
    if v.denominator != 1 or abs(v) > params.max_abs_value:
        return None
    text = render(e)
    prob = Problem("long", f"Calculate {text}.", fmt_int(v), f"long:{text}", k, {"expr": text})
    ref = Problem("arith", prob.question, prob.answer, prob.key, 0, {"expr": text})
    doc = replayer.replay(prob.question, document_text(ref, tools, **dataclasses.asdict(fmt)))
    if len(doc.tokens) < target:
        return None
    prob.data.update(
        tree_tokens=len(doc.tokens),
        peak_buf1=peak_working(doc, 1),
        peak_buf2=peak_working(doc, 2),
        tree_depth=depth(e),
        operands=len(e.operands),
    )
    return prob

"""The rewrite format (issue 23): one operation per step, the whole expression written again each step."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timjax.eval.notation import NotationParams, evaluate_tree, random_style, random_tree, render_tree
from timjax.train import rewrite as rw
from timjax.train.corpus import (
    ArithParams,
    CorpusSpec,
    DocFormat,
    check_answer,
    document,
    document_text,
    iter_tasks_with_tools,
    problems,
    question_expression,
    random_expression,
    render,
    value,
)
from timjax.train.tools_adapter import default_backend, training_schema


def test_a_known_expression_rewrites_group_first_then_products_then_sums():
    steps = rw.rewrites("3 + 4 * -5 - (6 - 2) * 3")
    assert [s.text for s in steps] == ["3 + 4 * -5 - 4 * 3", "3 + -20 - 4 * 3", "3 + -20 - 12", "-17 - 12", "-29"]
    assert [(s.a, s.op, s.b) for s in steps][:2] == [(6, "-", 2), (4, "*", -5)]
    assert [s.final for s in steps] == [False] * 4 + [True]


@pytest.mark.parametrize(
    "text, states",
    [
        ("2--(3+4)*2", ["2--7*2", "2--14", "16"]),  # a negated group; '-' after an operator is a sign
        ("-( 3 + 4 ) / 2", ["-7 / 2", "-7/2"]),  # spaced parentheses; a fraction answer is bare p/q
        ("7/2/3", ["(7/2)/3", "7/6"]),  # a fraction inside the expression is parenthesized
        ("1 - (2 - (3 - 4))", ["1 - (2 - -1)", "1 - 3", "-2"]),  # innermost group first
        ("-(7/2)*2", ["-7"]),  # "(p/q)" without spaces is one literal, as the rewrites write it
        ("8 - (-3/4)", ["35/4"]),
        ("-((-80/8)*216/6)", ["360"]),  # the last rewrite reads as one literal
        ("1+-(-(42/7))", None),  # a group of one number: no step writes it
    ],
)
def test_rewrites_keep_the_typed_style_and_write_fractions_unambiguously(text, states):
    if states is None:
        with pytest.raises(rw.NoRewrite, match="a group holds only"):
            rw.rewrites(text)
        return
    assert [s.text for s in rw.rewrites(text)] == states


def test_a_single_number_needs_no_step_and_bad_text_names_what_is_wrong():
    assert rw.rewrites("-42") == []
    assert rw.evaluate("-42") == -42
    with pytest.raises(ValueError, match=r"unexpected '\$'"):
        rw.lex("3 $ 4")
    with pytest.raises(ValueError, match="unbalanced"):
        rw.next_step("3 + 4)")
    with pytest.raises(ValueError, match="cannot read"):
        rw.next_step("3 + + 4")


def _check_rewrites(text: str, want: Fraction) -> None:
    steps = rw.rewrites(text)
    assert rw.evaluate(text) == want
    if not steps:  # "-(1/4)" typed tight is one fraction literal: nothing to compute
        assert [t.value for t in rw.lex(text)] == [want]
        return
    assert Fraction(steps[-1].text) == want and steps[-1].final
    prev = text
    for s in steps:
        assert s.final == (s is steps[-1])
        assert rw.apply_op(s.a, s.op, s.b) == s.result and s.shown in (s.result, -s.result)
        if s.final:
            break
        # only the reduced span changed: it held one operation (and maybe its group's parentheses and
        # negation), and what came in is one number, its value
        lo, hi = s.span
        assert s.text == prev[:lo] + rw.format_number(s.shown) + prev[hi:]
        removed = rw.lex(prev[lo:hi])
        assert [t.op for t in removed if t.kind == "op"] == [s.op], (prev, s.text)
        assert [t.value for t in rw.lex(rw.format_number(s.shown))] == [s.shown]
        prev = s.text


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 4), style=st.integers(0, 5))
def test_rewriting_corpus_expressions_in_every_style_reaches_their_value(seed, d, style):
    rng = random.Random(seed)
    p = ArithParams(
        depth=d,
        breadth=4,
        max_literal=9999,
        digits_uniform=True,
        p_negative_literal=0.2,
        p_fraction=0.2,
        max_abs_value=10**8,
    )
    e = random_expression(rng, p)
    text = render(e, spaced_parens=style & 1, tight=style == 2, additive=style >= 4)
    try:
        _check_rewrites(text, value(e))
    except rw.NoRewrite:  # only a doubly negated group typed tight: "-(-(42/7))"
        assert re.search(r"-\(-\(-?\d+/\d+\)\)", text), text


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), terms=st.integers(3, 8))
def test_rewriting_the_notation_sets_expressions_reaches_their_value(seed, terms):
    # the evaluation set's own printer: whatever it types, the rewrite rule reads it
    rng = random.Random(seed)
    tree = random_tree(rng, NotationParams(terms=terms))
    _check_rewrites(render_tree(tree, random_style(rng)), evaluate_tree(tree))


SPEC_RW = CorpusSpec(
    seed=11,
    mix=(("arith", 3, 1.0), ("flat", 6, 1.0), ("lookup", 2, 0.3)),
    max_literal=9999,
    digits_uniform=True,
    p_negative_literal=0.2,
    max_abs_value=10**8,
    p_tight=0.25,
    p_additive=0.3,
    p_fraction=0.2,
    p_tool_contract=0.3,
)


def test_additive_spacing_is_drawn_only_when_asked():
    qs = [question_expression(p.question) for p in problems(SPEC_RW, "train", 200) if p.kind == "arith"]
    assert any("*" in q and " + " in q or " - " in q for q in qs)
    additive = [q for q in qs if (" + " in q or " - " in q) and any(f"{c}*" in q or f"{c}/" in q for c in "0123456789")]
    assert additive, "no question spaced around + and - only"
    plain = CorpusSpec(**{**SPEC_RW.__dict__, "p_additive": 0.0})
    same_seed_old = [p.question for p in problems(plain, "train", 20)]
    assert same_seed_old != [p.question for p in problems(SPEC_RW, "train", 20)]


def test_rewrite_documents_validate_answer_right_and_copy_the_question():
    tools = default_backend()
    schema = training_schema(tools)
    probs = [p for p in problems(SPEC_RW, "train", 40) if p.kind == "arith"]
    for p in probs:
        text = document_text(p, tools, rewrite=True)
        resp = schema.parse(text)
        assert resp.answer == p.answer and check_answer(p.answer, resp.answer)
        doc = json.loads(text)
        task = doc["reasoning"][0]
        assert task["thought"] == "Rewrite it one operation at a time."
        states = [question_expression(p.question)] + [t["conclusion"] for t in task["subtasks"]]
        assert states[-1] == p.answer == task["conclusion"]
        assert [s.text for s in rw.rewrites(states[0])] == states[1:]
        # every step is one real calculator call whose result is the step's value
        for call, s in zip(iter_tasks_with_tools(doc), rw.rewrites(states[0])):
            assert (
                Fraction(
                    str(
                        next(iter(call["tool_result"].values()))
                        if isinstance(call["tool_result"], dict)
                        else call["tool_result"]
                    )
                )
                == s.result
            )
    lookup = next(p for p in problems(SPEC_RW, "train", 200) if p.kind == "lookup")
    assert document(lookup, tools, rewrite=True) == document(lookup, tools)  # lookups are written one way


def test_pruned_views_with_buffer_one_keep_the_latest_rewrite_in_view():
    from timjax.api import default_model_path
    from timjax.train.data import _problem_segments, _replayer_for
    from timjax.train.runtime_view import Replayer, pruned_segments
    from timjax.train.tokenizer import load_tokenizer

    tools = default_backend()
    tok = load_tokenizer(str(default_model_path()))
    replayer = Replayer(tok, training_schema(tools), None)
    p = next(
        p
        for p in problems(SPEC_RW, "train", 60)
        if p.kind == "arith" and len(rw.rewrites(question_expression(p.question))) >= 4
    )
    text = document_text(p, tools, rewrite=True)
    doc = _replayer_for(p, replayer, tools).replay(p.question, text)
    subtasks = json.loads(text)["reasoning"][0]["subtasks"]
    segs = pruned_segments(doc, 1)
    # a prune as each step's call list completes from the second on, one as the whole list completes,
    # then the last stretch
    assert len(segs) == len(subtasks) + 1
    views = [tok.decode(s.ids.tolist()) for s in segs]
    for k in range(1, len(subtasks)):
        thought = json.dumps(subtasks[k]["thought"])
        seg = next(v for v in views if thought in v)
        before = seg[: seg.index(thought)]
        # the state the step reads is in view (the steps' thoughts and conclusions are never pruned)
        assert all(json.dumps(t["conclusion"]) in before for t in subtasks[:k])
        call = lambda j: json.dumps(subtasks[j]["subtasks"][0]["tooluse"]["parameters"])
        # buffer 1: the previous step's call is still in view, the one before it is forgotten
        assert call(k - 1) in before
        if k >= 2:
            assert json.dumps(subtasks[k - 2]["subtasks"][0]["tooluse"]["tool_result"]) not in before
    # the training data give every rewrite document buffer 1's views when buffer 0 (or none) was drawn
    for buf in (0, False):
        got = _problem_segments(p, buf, replayer, tools, DocFormat(rewrite=True))
        assert len(got) == 1 + len(segs)
        assert [s.ids.tolist() for s in got[1:]] == [s.ids.tolist() for s in segs]
    assert len(_problem_segments(p, False, replayer, tools, DocFormat())) == 1


# ----------------------------------------------------------------------------------------- chunks


@pytest.mark.parametrize(
    "text, k, pieces",
    [
        ("1 + 2 - 3 + 4 - 5", 2, ["1 + 2", " - 3 + 4", " - 5"]),
        ("3 * 4 - (5 + 6) + -7", 2, ["3 * 4 - (5 + 6)", " + -7"]),  # a group is one term; "-7" a literal
        ("-(3+4)*2-5--6+7", 2, ["-(3+4)*2-5", "--6+7"]),  # a negated group starts a term
        ("1-2*3", 2, ["1-2*3"]),
    ],
)
def test_chunks_cut_at_top_level_plus_and_minus_as_typed(text, k, pieces):
    assert rw.chunks(text, k) == pieces


def _fold(pieces):
    acc = rw.evaluate(pieces[0])
    for piece in pieces[1:]:
        acc = rw.evaluate(rw.format_number(acc) + piece)
    return acc


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), terms=st.integers(3, 8), k=st.integers(2, 4))
def test_chunks_of_any_typed_expression_fold_to_its_value(seed, terms, k):
    rng = random.Random(seed)
    tree = random_tree(rng, NotationParams(terms=terms))
    text = render_tree(tree, random_style(rng))
    pieces = rw.chunks(text, k)
    assert "".join(pieces) == text.strip()
    assert len(pieces) == -(-len(rw.top_level_terms(text)) // k)
    try:
        assert _fold(pieces) == evaluate_tree(tree)
    except rw.NoRewrite:  # a piece holding only a doubly negated group typed tight: "-(-(42/7))"
        assert re.search(r"-\(-\(", text), text


def test_chunked_documents_solve_k_terms_at_a_time_and_short_ones_stay_plain():
    from timjax.api import default_model_path
    from timjax.train.data import _replayer_for
    from timjax.train.runtime_view import Replayer
    from timjax.train.tokenizer import load_tokenizer

    tools = default_backend()
    schema = training_schema(tools)
    replayer = Replayer(load_tokenizer(str(default_model_path())), schema, None)
    probs = [p for p in problems(SPEC_RW, "train", 60) if p.kind == "arith"]
    chunked = 0
    for p in probs:
        text = question_expression(p.question)
        doc = document(p, tools, rewrite=True, chunk_terms=3)
        written = document_text(p, tools, rewrite=True, chunk_terms=3)
        assert schema.parse(written).answer == p.answer
        _replayer_for(p, replayer, tools).replay(p.question, written)  # the grammar takes every token
        root = doc["reasoning"][0]
        if len(rw.top_level_terms(text)) <= 3:
            assert doc == document(p, tools, rewrite=True)
            continue
        chunked += 1
        assert root["thought"] == "Rewrite it a few terms at a time."
        pieces, acc = rw.chunks(text, 3), None
        for piece, task in zip(pieces, root["subtasks"], strict=True):
            expr = piece if acc is None else rw.format_number(acc) + piece
            assert task["thought"] == f"Compute {expr}."
            assert [s["conclusion"] for s in task["subtasks"]] == [s.text for s in rw.rewrites(expr)]
            acc = Fraction(task["conclusion"])
        assert root["conclusion"] == p.answer
    assert chunked >= 5
    with pytest.raises(ValueError, match="chunk_terms must be >= 2"):
        document(probs[0], tools, rewrite=True, chunk_terms=1)


def test_chunking_keeps_a_long_sums_working_memory_flat_where_rewriting_it_whole_grows():
    from timjax.api import default_model_path
    from timjax.train.corpus import ArithParams, Chain, Problem, flat_expression, fmt_num
    from timjax.train.runtime_view import Replayer, memory_after
    from timjax.train.tokenizer import load_tokenizer

    tools = default_backend()
    replayer = Replayer(load_tokenizer(str(default_model_path())), training_schema(tools), None)
    rng = random.Random(3)
    terms, ops, peaks = [], [], {0: [], 4: []}
    for _ in range(4):  # 8, 16, 24, 32 terms
        more = flat_expression(rng, ArithParams(depth=2, breadth=8, max_literal=99))
        while len(more.operands) != 8:
            more = flat_expression(rng, ArithParams(depth=2, breadth=8, max_literal=99))
        terms, ops = terms + list(more.operands), ops + ["+"] * bool(ops) + list(more.ops)
        e = Chain("add", tuple(terms), tuple(ops))
        q = f"Calculate {render(e)}."
        p = Problem("arith", q, fmt_num(value(e)), "k", 2, {"expr": render(e)})
        for k, peak in peaks.items():
            doc = replayer.replay(q, document_text(p, tools, rewrite=True, chunk_terms=k))
            peak.append(memory_after(doc, 1).stats().peak_working_len)
    # whole rewrites copy the sum at every step and keep each copy: memory grows with the square of the
    # terms; pieces of 4 add one thought and value per piece, and the question's own length
    assert peaks[0][-1] > 4 * peaks[0][0]
    assert peaks[4][-1] < 2 * peaks[4][0] and all(b < a for a, b in zip(peaks[0], peaks[4]))

"""The synthetic TIM corpus: determinism, split disjointness, schema validity, real tool results."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction

import pytest
from _train_helpers import SPEC, small_problems

from timjax.train.corpus import (
    ArithParams,
    CorpusSpec,
    check_answer,
    depth,
    document,
    document_text,
    iter_tasks_with_tools,
    parse_expression,
    problems,
    random_expression,
    render,
    split_of,
    value,
    widest_chain,
)
from timjax.train.tools_adapter import default_backend, tool_servers, training_schema


def test_same_seed_same_corpus_other_seed_other_corpus():
    a = [(p.question, document_text(p)) for p in problems(SPEC, "train", 40)]
    b = [(p.question, document_text(p)) for p in problems(CorpusSpec(seed=0), "train", 40)]
    c = [(p.question, document_text(p)) for p in problems(CorpusSpec(seed=1), "train", 40)]
    assert a == b
    assert a != c


def test_train_and_heldout_never_share_a_problem():
    train = problems(SPEC, "train", 400)
    held = problems(SPEC, "heldout", 40)
    held_other_stream = problems(SPEC, "heldout", 40, stream=1)
    keys = {p.key for p in train}
    assert not keys & {p.key for p in held + held_other_stream}
    assert all(split_of(p.key, SPEC.heldout_fraction) == "heldout" for p in held + held_other_stream)
    assert len(keys) == len(train)  # distinct within a split too


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_expressions_have_the_asked_depth_and_parse_back(d):
    rng = random.Random(d)
    for _ in range(50):
        e = random_expression(rng, ArithParams(depth=d))
        assert depth(e) == d
        for spaced in (False, True):
            assert parse_expression(render(e, spaced_parens=spaced)) == e
        assert value(e).denominator == 1  # division is exact only


def test_precedence_and_unary_minus_are_typed_as_a_person_types_them():
    e = parse_expression("-( 12 - 5 ) * ( 3 + 4 ) + 36 / 4 - -2")
    assert value(e) == Fraction(-7 * 7 + 9 + 2)
    assert render(e) == "-(12 - 5) * (3 + 4) + 36 / 4 - -2"


def test_every_document_validates_against_the_schema_and_answers_right():
    schema = training_schema(default_backend())
    for p in small_problems():
        resp = schema.parse(document_text(p))
        assert check_answer(p.answer, resp.answer)
        assert resp.answer == p.answer


def test_tool_results_equal_what_the_mcp_servers_answer():
    from timjax.tools.runner import ToolRunner

    probs = [p for p in small_problems()][:25]
    with ToolRunner(tool_servers()) as runner:
        n = 0
        for p in probs:
            session = runner.session()  # one inference's calls
            doc = json.loads(document_text(p))
            for tu in iter_tasks_with_tools(doc):
                pending = session.submit(tu["tool_name"], json.dumps(tu["parameters"]))
                rec = None
                while rec is None:
                    rec = session.poll(pending)
                assert rec.status == "ok", rec.error
                assert json.loads(rec.result) == tu["tool_result"]
                # and byte for byte as the document holds it
                assert json.dumps(tu["tool_result"], separators=(", ", ": ")) == rec.result
                n += 1
    assert n > 50


def test_lookup_questions_follow_the_kb():
    tools = default_backend()
    for p in problems(SPEC, "train", 30, kind="lookup"):
        entity = p.data["start"]
        for rel in p.data["relations"]:
            entity = str(tools.kb.facts[entity][rel])
        assert entity == p.answer
        assert len(p.data["relations"]) == p.depth


def test_check_answer_compares_numbers_exactly():
    assert check_answer("-12", "-12") and check_answer("12", " 12 ") and check_answer("6", "12/2")
    assert not check_answer("12", "13") and not check_answer("12", "twelve")
    assert check_answer("Ira Holm", "Ira Holm") and not check_answer("Ira Holm", "Ira")


def test_document_tree_shape_for_a_known_expression():
    from timjax.train.corpus import Problem

    p = Problem("arith", "Calculate (3 + 4) * 5.", "35", "arith:(3 + 4) * 5", 2, {"expr": "(3 + 4) * 5"})
    doc = document(p)
    root = doc["reasoning"][0]
    assert root["thought"] == "Compute (3 + 4) * 5."
    assert [t["thought"] for t in root["subtasks"]] == ["Compute 3 + 4.", "Compute 7 * 5."]
    assert root["subtasks"][1]["tooluse"]["parameters"] == {"op": "mul", "a": 7, "b": 5}
    assert root["conclusion"] == "35" and doc["answer"] == "35"


def test_asking_for_more_problems_than_a_group_has_is_an_error_naming_it():
    """The knowledge base holds few distinct 2-hop questions: asking for more held-out ones than exist
    names the group and the count instead of drawing forever."""
    import re

    from timjax.base.errors import ParameterError

    spec = CorpusSpec(seed=0, mix=(("lookup", 2, 1.0),))
    with pytest.raises(ParameterError, match=r"only \d+ distinct heldout problems of lookup-2") as err:
        problems(spec, "heldout", 10_000)
    n = int(re.search(r"only (\d+)", str(err.value)).group(1))
    got = problems(spec, "heldout", n)  # exactly that many exist, all distinct and held out
    assert len({p.key for p in got}) == n and all(split_of(p.key, spec.heldout_fraction) == "heldout" for p in got)


def test_p_binary_sets_the_share_of_wide_chains_and_the_split_does_not_move():
    def wide_share(p_binary: float) -> tuple[float, list]:
        spec = CorpusSpec(seed=5, mix=(("arith", 2, 1.0),), p_binary=p_binary)
        probs = problems(spec, "train", 300)
        wide = sum(widest_chain(parse_expression(p.data["expr"])) >= 3 for p in probs)
        return wide / len(probs), probs

    assert [widest_chain(parse_expression(t)) for t in ("7", "3 + 4", "2 * (3 + 4 - 5)", "-(1 - 2 - 3 - 4)")] == [
        0,
        2,
        3,
        4,
    ]
    narrow, _ = wide_share(1.0)
    default, _ = wide_share(CorpusSpec().p_binary)
    wide, probs = wide_share(0.3)
    assert narrow == 0.0
    assert default + 0.15 < wide  # more three-operand chains when asked for
    # the same problem lands in the same split whatever the distribution that drew it
    assert all(split_of(p.key, SPEC.heldout_fraction) == "train" for p in probs)
    assert CorpusSpec().p_binary == ArithParams().p_binary  # held-out evaluation draws as before


def _walk(task: dict):
    yield task
    for t in task.get("subtasks", ()):
        yield from _walk(t)


def test_restated_chain_solves_its_operands_then_combines_them_in_one_thought():
    from timjax.train.corpus import Problem

    expr = "(9 + 8 * 7) * 5 * -(20 / 10)"
    p = Problem("arith", f"Calculate {expr}.", "-650", f"arith:{expr}", 3, {"expr": expr})
    root = document(p, restate=True)["reasoning"][0]
    assert [t["thought"] for t in root["subtasks"]] == [
        "Compute 9 + 8 * 7.",  # two operands: solved as before, its step beside the value
        "Compute -(20 / 10).",
        "Compute 65 * 5 * -2.",  # the literal 5 sits between the two solved values, as in the question
    ]
    combine = root["subtasks"][2]
    assert [t["thought"] for t in combine["subtasks"]] == ["Compute 65 * 5.", "Compute 325 * -2."]
    assert combine["conclusion"] == root["conclusion"] == "-650"
    # without restating, the steps hang off the root and pick 5 out of the question themselves
    plain = document(p)["reasoning"][0]
    assert [t["thought"] for t in plain["subtasks"][2:]] == ["Compute 65 * 5.", "Compute 325 * -2."]


def test_restated_documents_chain_steps_only_over_literals_and_keep_every_answer():
    """With ``restate``, every chain of three or more operands runs its calculator steps over literals only
    (a compound one first restates itself with the solved values, so each next operand is in the thought
    above its step), the steps reproduce its value, answers never change, and trees whose chains all have
    two operands are the same text as before."""
    from timjax.train.corpus import Chain, Num

    tools = default_backend()
    probs = problems(CorpusSpec(seed=3, mix=(("arith", 3, 1.0), ("arith", 4, 1.0)), p_binary=0.4), "train", 60)
    restated = 0
    for p in probs:
        doc = document(p, tools, restate=True)
        assert doc["answer"] == document(p, tools)["answer"] == p.answer
        for task in _walk(doc["reasoning"][0]):
            e = parse_expression(task["thought"].removeprefix("Compute ").removesuffix("."))
            if not isinstance(e, Chain) or len(e.operands) < 3:
                continue
            if not all(isinstance(o, Num) for o in e.operands):
                restated += 1
                task = task["subtasks"][-1]  # the restatement
                solved = parse_expression(task["thought"].removeprefix("Compute ").removesuffix("."))
                assert all(isinstance(o, Num) for o in solved.operands) and solved.ops == e.ops, task["thought"]
                e = solved
            steps = task["subtasks"]
            assert all("tooluse" in t for t in steps) and len(steps) == len(e.operands) - 1
            assert [t["tooluse"]["parameters"]["b"] for t in steps] == [o.value for o in e.operands[1:]]
            assert str(value(e)) == task["conclusion"] == steps[-1]["conclusion"]
    assert restated > 20
    narrow = problems(CorpusSpec(seed=3, mix=(("arith", 3, 1.0),), p_binary=1.0), "train", 30)
    assert all(document_text(p, tools, restate=True) == document_text(p, tools) for p in narrow)


# ----------------------------------------------------------------------------------------- notation options (issue 23)

# sha256 (first 16 hex) of each shipped stage's first 120 train problems (question, answer) and the first 15
# documents, computed with the corpus of commit d55b287, before the notation options existed
STAGE_DIGESTS = {
    "tiny_tim_stage1": "b12dd95d13c667e8",
    "tiny_tim": "b12dd95d13c667e8",
    "tiny_tim_stage3": "9f0fb59512b2337d",
    "tiny_tim_stage4": "5f9c6fe4d8c48615",
    "tiny_tim_stage5": "5f9c6fe4d8c48615",
    "tiny_tim_stage6": "17ef2aa9b7046d9d",
    "tiny_tim_stage7": "d5d89b9de1330f69",
    "tiny_tim_stage8": "b2403bc458fe713b",
}


@pytest.mark.parametrize("name", sorted(STAGE_DIGESTS))
def test_shipped_stages_draw_the_corpus_they_were_trained_on(name):
    import hashlib
    from pathlib import Path

    from dataclasses import asdict

    from timjax.train.sft import corpus_spec, doc_format, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "timjax" / "train" / "configs" / f"{name}.json")
    h = hashlib.sha256()
    for i, p in enumerate(problems(corpus_spec(cfg.data), "train", 120)):
        h.update(p.question.encode())
        h.update(p.answer.encode())
        if i < 15:
            h.update(document_text(p, **asdict(doc_format(cfg.data))).encode())
    assert h.hexdigest()[:16] == STAGE_DIGESTS[name]


def _py(expr: str) -> Fraction:
    """Python's parser reads the typed text (an independent check of the printer)."""
    import ast

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return Fraction(n.value)
        if isinstance(n, ast.UnaryOp):
            return -ev(n.operand)
        a, b = ev(n.left), ev(n.right)
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Div: a / b if b else None}[type(n.op)]

    return ev(ast.parse(expr, mode="eval"))


def test_notation_options_draw_flat_tight_negative_and_four_digit_problems():
    spec = CorpusSpec(
        seed=3,
        mix=(("flat", 8, 1.0), ("arith", 3, 1.0)),
        max_literal=9999,
        digits_uniform=True,
        max_abs_value=10**8,
        p_negative_literal=0.2,
        p_tight=0.5,
    )
    probs = problems(spec, "train", 120)
    flat = [p for p in probs if "(" not in p.data["expr"] and p.depth == 2]
    assert len(flat) > 30
    terms = {len(parse_expression(p.data["expr"]).operands) for p in flat}
    assert max(terms) >= 7 and min(terms) >= 3  # flat sums of 3..8 terms
    typed = [re.sub(r"^(Calculate|Compute|What is) ", "", p.question)[:-1] for p in probs]
    for p, t in zip(probs, typed):
        assert _py(t) == Fraction(p.answer), p.question  # tight or spaced, the typed text means the answer
    assert any(" " not in t for t in typed) and any(" " in t for t in typed)
    assert any("- -" in p.data["expr"] or "* -" in p.data["expr"] for p in probs)
    lits = [abs(int(t)) for p in probs for t in re.findall(r"\d+", p.data["expr"])]
    assert max(lits) >= 1000 and min(lits) < 10
    for p in flat[:10]:  # documents build with the real calculator and reach the answer
        assert document(p)["answer"] == p.answer


def test_train_config_refuses_rows_longer_than_its_context():
    from timjax.train.sft import TrainConfig

    with pytest.raises(ValueError, match="data.seq_lens.*max_position_embeddings"):
        TrainConfig(out_dir="x", model={"max_position_embeddings": 512}, data={"seq_lens": [256, 1024]})


def test_fraction_option_writes_p_over_q_steps_the_runtime_grammar_accepts():
    from timjax.api import default_model_path
    from timjax.train.runtime_view import Replayer
    from timjax.train.tokenizer import load_tokenizer

    spec = CorpusSpec(seed=2, mix=(("arith", 3, 1.0), ("flat", 6, 1.0)), p_fraction=0.3)
    fr = [p for p in problems(spec, "train", 60) if "/" in p.answer]
    assert len(fr) >= 5
    tools = default_backend()
    replayer = Replayer(load_tokenizer(str(default_model_path())), training_schema(tools), None)
    for p in fr[:3]:
        doc = document(p, tools, restate=True)
        assert Fraction(doc["answer"]) == _py(p.data["expr"])  # the steps' "p/q" values reach the exact answer
        calls = list(iter_tasks_with_tools(doc))
        assert any(isinstance(c["parameters"]["a"], str) and "/" in c["parameters"]["a"] for c in calls)
        replayed = replayer.replay(p.question, document_text(p, tools, restate=True))  # raises if the grammar refuses
        assert len(replayed.tokens) > 50


def test_sum_kind_draws_long_sums_of_compound_operands():
    probs = problems(CorpusSpec(seed=4, mix=(("sum", 6, 1.0),)), "train", 30)
    sizes = {len(parse_expression(p.data["expr"]).operands) for p in probs}
    assert min(sizes) >= 3 and max(sizes) == 6
    for p in probs:
        assert _py(p.data["expr"]) == Fraction(p.answer)
        assert p.depth >= 2
    assert document(probs[0], restate=True)["answer"] == probs[0].answer


def test_tool_contract_documents_match_what_variant_servers_write_and_their_grammar():
    from timjax.api import default_model_path
    from timjax.eval.tool_variants import variant_tools
    from timjax.tools.runner import ToolRunner
    from timjax.train.data import _replayer_for
    from timjax.train.runtime_view import Replayer
    from timjax.train.tokenizer import load_tokenizer

    spec = CorpusSpec(seed=5, mix=(("arith", 2, 1.0),), p_tool_contract=1.0, p_fraction=0.5)
    probs = problems(spec, "train", 40)
    assert {tuple(p.data["contract"]["order"]) for p in probs} == {("op", "a", "b"), ("a", "b", "op"), ("a", "op", "b")}
    # each result form reads as the runtime reads the eval's variant server for the same call
    for form, variant in (("value", "result-value"), ("bare", "result-bare"), ("result", "own")):
        p = next(p for p in probs if p.data["contract"]["result"] == form)
        call = next(iter_tasks_with_tools(json.loads(document_text(p))))
        assert list(call["parameters"]) == p.data["contract"]["order"]
        with ToolRunner(variant_tools(variant)) as runner:
            out = runner.submit("calculator", call["parameters"]).result(timeout=30)
        assert json.loads(out.text) == call["tool_result"], form
    # the grammar holds the parameters to the schema's order: only the contract's replayer accepts them
    tools = default_backend()
    shipped = Replayer(load_tokenizer(str(default_model_path())), training_schema(tools), None)
    p = next(p for p in probs if p.data["contract"]["order"][0] == "a")
    text = document_text(p, tools)
    assert len(_replayer_for(p, shipped, tools).replay(p.question, text).tokens) > 20
    with pytest.raises(ValueError, match="diverged"):
        shipped.replay(p.question, text)


def test_a_mix_of_an_unknown_kind_is_refused():
    from timjax.base.errors import ParameterError

    with pytest.raises(ParameterError, match="unknown kind 'notation'"):
        problems(CorpusSpec(mix=(("notation", 5, 1.0),)), "train", 1)

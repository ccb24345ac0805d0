"""The ordinary-notation evaluation set (timjax.eval.notation): printer, evaluator, families, seeds; and the
calculator contract variants (timjax.eval.tool_variants)."""

from __future__ import annotations

import ast
from fractions import Fraction

import pytest

from timjax.eval.notation import (
    BinOp,
    Lit,
    Minus,
    Style,
    evaluate_tree,
    leaves,
    notation_problems,
    render_tree,
)


def py_value(text: str) -> Fraction:
    """An independent reading of the rendered text: Python's own parser, '/' as exact division."""

    def ev(n: ast.AST) -> Fraction:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return Fraction(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: a.__add__, ast.Sub: a.__sub__, ast.Mult: a.__mul__, ast.Div: a.__truediv__}
            return ops[type(n.op)](b)
        raise AssertionError(f"unexpected node {ast.dump(n)} in {text!r}")

    return ev(ast.parse(text, mode="eval"))


def test_every_family_round_trips_through_pythons_parser():
    for terms in range(3, 9):
        for p in notation_problems(60, terms, seed=5):
            assert py_value(p.data["expr"]) == Fraction(p.answer), p.question
            assert p.kind == "notation" and p.depth == terms  # timjax eval groups it as notation-<terms>
            assert p.question.endswith((".", "?")) and p.data["expr"] in p.question


@pytest.mark.parametrize(
    "tree, style, text, val",
    [
        (BinOp("*", BinOp("+", Lit(1), Lit(2)), Lit(3)), Style(), "(1 + 2) * 3", 9),
        (BinOp("+", Lit(1), BinOp("*", Lit(2), Lit(3))), Style(), "1 + 2 * 3", 7),
        (BinOp("-", BinOp("-", Lit(1), Lit(2)), Lit(3)), Style(), "1 - 2 - 3", -4),
        (BinOp("-", Lit(1), BinOp("-", Lit(2), Lit(3))), Style(), "1 - (2 - 3)", 2),
        (BinOp("+", Lit(1), BinOp("-", Lit(2), Lit(3))), Style(), "1 + 2 - 3", 0),
        (BinOp("/", Lit(8), BinOp("*", Lit(2), Lit(2))), Style(), "8 / (2 * 2)", 2),
        (BinOp("/", BinOp("/", Lit(8), Lit(2)), Lit(2)), Style(), "8 / 2 / 2", 2),
        (BinOp("*", Lit(7), BinOp("/", Lit(1), Lit(2))), Style(), "7 * 1 / 2", Fraction(7, 2)),
        (BinOp("-", Lit(3), Minus(Lit(5))), Style(), "3 - -5", 8),
        (BinOp("*", Lit(4), Minus(Lit(2))), Style(spaces="none"), "4*-2", -8),
        (BinOp("*", Minus(BinOp("+", Lit(3), Lit(4))), Lit(2)), Style(), "-(3 + 4) * 2", -14),
        (BinOp("*", BinOp("+", Lit(1), Lit(2)), Lit(3)), Style(paren_spaces=True), "( 1 + 2 ) * 3", 9),
        (BinOp("+", BinOp("*", Lit(2), Lit(3)), Lit(4)), Style(spaces="additive"), "2*3 + 4", 10),
        (BinOp("-", Lit(10), Minus(Lit(5))), Style(spaces="none"), "10--5", 15),
    ],
)
def test_precedence_and_minimal_parentheses(tree, style, text, val):
    assert render_tree(tree, style) == text
    assert evaluate_tree(tree) == val
    assert py_value(text) == val


def test_seeds_reproduce_and_differ():
    a = [p.question for p in notation_problems(30, 6, seed=1)]
    assert a == [p.question for p in notation_problems(30, 6, seed=1)]
    assert a != [p.question for p in notation_problems(30, 6, seed=2)]
    assert len(set(a)) == 30


def test_the_set_holds_what_the_issue_lists():
    probs = [p for t in range(3, 9) for p in notation_problems(50, t)]
    exprs = [p.data["expr"] for p in probs]
    assert any("- -" in e or "--" in e for e in exprs)  # negative literal after minus
    assert any("* -" in e or "*-" in e for e in exprs)
    assert any("( " in e for e in exprs) and any("(" in e and "( " not in e for e in exprs)
    assert any(" " not in e for e in exprs)  # no spaces at all
    assert any("/" in p.answer for p in probs) and any("/" not in p.answer for p in probs)
    assert any(len(tok) == 4 for e in exprs for tok in e.replace("(", " ").replace(")", " ").split() if tok.isdigit())
    # precedence without parentheses: flat expressions whose value differs when read left to right
    assert sum(py_value(e) != _left_to_right(e) for e in exprs if "(" not in e) >= 10


def _left_to_right(expr: str) -> Fraction:
    """The flat expression folded strictly left to right (what a model ignoring precedence computes)."""
    import re

    toks = re.findall(r"(?:(?<=[-+*/])|^)-\d+|\d+|[-+*/]", expr.replace(" ", ""))
    acc = Fraction(toks[0])
    for op, x in zip(toks[1::2], toks[2::2]):
        y = Fraction(x)
        if op == "/" and y == 0:
            return Fraction(-(10**30))  # a left-to-right reading that divides by zero differs anyway
        acc = {"+": lambda: acc + y, "-": lambda: acc - y, "*": lambda: acc * y, "/": lambda: acc / y}[op]()
    return acc


def test_leaf_counts_and_bad_terms():
    for p in notation_problems(10, 8):
        assert p.data["terms"] == 8
    assert leaves(BinOp("+", Minus(Lit(1)), BinOp("*", Lit(2), Lit(3)))) == 3
    with pytest.raises(ValueError, match="terms"):
        notation_problems(1, 9)


def test_tool_variants_change_the_contract_not_the_arithmetic():
    from timjax.eval.tool_variants import VARIANTS, variant_tools
    from timjax.tools.runner import ToolRunner

    seen = {}
    for name in ("own", "order-a-b-op", "desc-terse", "result-value", "result-bare", "result-pretty"):
        with ToolRunner(variant_tools(name)) as runner:
            spec = next(s for s in runner.specs if s.name == "calculator")
            out = runner.submit("calculator", {"op": "div", "a": 7, "b": 2}).result(timeout=30)
            seen[name] = (list(spec.input_schema["properties"]), spec.description, out.text)
    assert seen["own"][0] == ["op", "a", "b"] and seen["order-a-b-op"][0] == ["a", "b", "op"]
    assert seen["desc-terse"][1] != seen["own"][1]
    assert seen["own"][2] == '{"result": "7/2"}'
    assert seen["result-value"][2] == '{"value": "7/2"}'
    assert seen["result-bare"][2] == '"7/2"'
    assert seen["result-pretty"][2] == '{"result": "7/2"}'  # the runtime compacts the pretty-printed text
    assert VARIANTS["result-pretty"].result == "pretty"


def test_saved_problems_read_back_into_the_same_groups_and_depths(tmp_path):
    from timjax.eval.run import depth_name, group_name, save_problems
    from timjax.train.corpus import load_problems_jsonl

    probs = notation_problems(5, 4) + notation_problems(5, 7)
    save_problems(probs, str(tmp_path / "p.jsonl"))
    back = load_problems_jsonl(str(tmp_path / "p.jsonl"))
    assert [(b.question, b.answer) for b in back] == [(p.question, p.answer) for p in probs]
    assert [group_name(b) for b in back] == [group_name(p) for p in probs]
    assert [depth_name(b) for b in back] == [depth_name(p) for p in probs]

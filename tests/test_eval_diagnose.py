"""The rewrite-trace diagnosis of wrong answers (timjax.eval.diagnose): the corpus's own rewrite document
follows the trace, and each kind of fault planted in it is found at the step where it was planted."""

import copy

import pytest

from timjax.eval.diagnose import first_divergence
from timjax.eval.run import divergence_counts
from timjax.train import corpus
from timjax.train.corpus import Problem

QUESTION = "Calculate 3 + 4 * -5 - (6 - 2) * 3."


@pytest.fixture(scope="module")
def doc():
    prob = Problem("arith", QUESTION, "-29", "k", 2, {"expr": corpus.question_expression(QUESTION)})
    return corpus.document(prob, rewrite=True)


def _steps(d):
    return d["reasoning"][0]["subtasks"]


def test_the_corpus_rewrite_document_follows_the_trace(doc):
    assert [s["conclusion"] for s in _steps(doc)] == [
        "3 + 4 * -5 - 4 * 3",
        "3 + -20 - 4 * 3",
        "3 + -20 - 12",
        "-17 - 12",
        "-29",
    ]
    assert first_divergence(QUESTION, doc) is None


def _planted(doc, edit):
    d = copy.deepcopy(doc)
    edit(d)
    return first_divergence(QUESTION, d)


def test_each_planted_fault_is_named_at_its_step(doc):
    def wrong_op(d):  # the group and precedence ignored: 3 + 4 first
        _steps(d)[0]["thought"] = "Compute 3 + 4."

    def wrong_call(d):
        _steps(d)[1]["subtasks"][0]["tooluse"]["parameters"]["b"] = 5

    def wrong_copy(d):  # an operand copied twice, as stage 8 did
        _steps(d)[2]["conclusion"] = "3 + -20 - 12 - 12"

    def stops(d):
        del _steps(d)[3:]

    def goes_on(d):
        _steps(d).append(copy.deepcopy(_steps(d)[-1]))

    def bad_answer(d):
        d["answer"] = "-28"

    assert _planted(doc, wrong_op) == {"kind": "op", "step": 0, "got": "Compute 3 + 4.", "want": "Compute 6 - 2."}
    assert _planted(doc, wrong_call) == {"kind": "call", "step": 1, "got": ["4", "*", "5"], "want": ["4", "*", "-5"]}
    assert _planted(doc, wrong_copy) == {
        "kind": "rewrite",
        "step": 2,
        "got": "3 + -20 - 12 - 12",
        "want": "3 + -20 - 12",
    }
    assert _planted(doc, stops)["kind"] == "steps" and _planted(doc, stops)["step"] == 3
    assert _planted(doc, goes_on)["kind"] == "steps" and _planted(doc, goes_on)["step"] == 5
    assert _planted(doc, bad_answer) == {"kind": "answer", "step": None, "got": "-28", "want": "-29"}


def test_a_missing_or_other_format_tree_is_format_and_counts_add_up(doc):
    restated = corpus.document(Problem("arith", QUESTION, "-29", "k", 2, {"expr": "3 + 4 * -5 - (6 - 2) * 3"}))
    assert first_divergence(QUESTION, None)["kind"] == "format"
    assert first_divergence(QUESTION, restated)["kind"] in ("steps", "op")
    failures = [{"rewrite_divergence": {"kind": k}} for k in ("op", "rewrite", "op")] + [{"question": "lookup"}]
    assert divergence_counts(failures) == {"op": 2, "rewrite": 1}

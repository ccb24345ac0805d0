"""The rewrite-trace diagnosis of wrong answers (timjax.eval.diagnose): the corpus's own documents follow
the trace, and each kind of fault planted in one is found where it was planted."""

import copy

import pytest

from timjax.eval.diagnose import first_divergence
from timjax.eval.run import divergence_counts
from timjax.train import corpus
from timjax.train.corpus import DocFormat, Problem

QUESTION = "Calculate 3 + 4 * -5 - (6 - 2) * 3."
LONG = "Compute 12 - 3 * -4 + 8 / 2 - 7 + 5*6 - 9."
CHUNKED = DocFormat(rewrite=True, chunk_terms=3)
REWRITE = DocFormat(rewrite=True)


def _doc(question, answer, **fmt):
    text = corpus.question_expression(question)
    return corpus.document(Problem("arith", question, answer, "k", 2, {"expr": text}), **fmt)


@pytest.fixture(scope="module")
def doc():
    return _doc(QUESTION, "-29", rewrite=True)


def _steps(d):
    return d["reasoning"][0]["subtasks"]


def test_the_corpus_rewrite_documents_follow_the_trace(doc):
    assert [s["conclusion"] for s in _steps(doc)] == [
        "3 + 4 * -5 - 4 * 3",
        "3 + -20 - 4 * 3",
        "3 + -20 - 12",
        "-17 - 12",
        "-29",
    ]
    assert first_divergence(QUESTION, doc) is None
    assert first_divergence(LONG, _doc(LONG, "42", rewrite=True, chunk_terms=3), CHUNKED) is None


def _planted(doc, edit, question=QUESTION, fmt=REWRITE):
    d = copy.deepcopy(doc)
    edit(d)
    return first_divergence(question, d, fmt)


def test_each_planted_fault_is_named_where_it_was_planted(doc):
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

    assert _planted(doc, wrong_op) == {"kind": "op", "path": [0, 0], "got": "Compute 3 + 4.", "want": "Compute 6 - 2."}
    call = _planted(doc, wrong_call)
    assert call["kind"] == "call" and call["path"] == [0, 1, 0]
    assert (call["got"]["b"], call["want"]["b"]) == ("5", "-5")
    assert _planted(doc, wrong_copy) == {
        "kind": "rewrite",
        "path": [0, 2],
        "got": "3 + -20 - 12 - 12",
        "want": "3 + -20 - 12",
    }
    assert {k: _planted(doc, stops)[k] for k in ("kind", "path")} == {"kind": "steps", "path": [0, 3]}
    assert {k: _planted(doc, goes_on)[k] for k in ("kind", "path")} == {"kind": "steps", "path": [0, 5]}
    assert _planted(doc, bad_answer) == {"kind": "answer", "path": None, "got": "-28", "want": "-29"}


def test_a_chunked_tree_names_a_wrongly_copied_piece():
    long_doc = _doc(LONG, "42", rewrite=True, chunk_terms=3)

    def wrong_piece(d):  # the second piece picked up from the wrong term
        _steps(d)[1]["thought"] = "Compute 28 + 5*6 - 9."

    def wrong_value(d):  # the first piece's value copied wrongly into its conclusion
        _steps(d)[0]["conclusion"] = "82"

    piece = _planted(long_doc, wrong_piece, LONG, CHUNKED)
    assert piece == {
        "kind": "piece",
        "path": [0, 1],
        "got": "Compute 28 + 5*6 - 9.",
        "want": "Compute 28 - 7 + 5*6 - 9.",
    }
    assert _planted(long_doc, wrong_value, LONG, CHUNKED)["kind"] == "rewrite"
    # the unchunked trace of the same question starts differently: the root's thought picks the format
    assert first_divergence(LONG, long_doc)["kind"] == "steps"


def test_a_missing_or_other_format_tree_is_named_and_counts_add_up(doc):
    restated = _doc(QUESTION, "-29")
    assert first_divergence(QUESTION, None)["kind"] == "format"
    assert first_divergence("What is the capital of Bopin?", doc)["kind"] == "format"
    assert first_divergence(QUESTION, restated)["path"] == [0]
    failures = [{"rewrite_divergence": {"kind": k}} for k in ("op", "rewrite", "op")] + [{"question": "lookup"}]
    assert divergence_counts(failures) == {"op": 2, "rewrite": 1}

"""The beyond-context family (timjax.eval.long), the eval's context limit, groups and settings, the plot's
binning."""

from __future__ import annotations

import pytest

from timjax.api import default_model_path
from timjax.eval.run import Setting, evaluate, parse_groups, settings_from_labels

C = 768  # a small context keeps the run short; the shipped model is evaluated at C = 1024


@pytest.fixture(scope="module")
def long_probs():
    from timjax.eval.long import long_problems

    return long_problems(2, 2, C, str(default_model_path()), seed=1)


def test_long_trees_are_twice_the_context_and_their_pruned_memory_fits(long_probs):
    for p in long_probs:
        assert p.kind == "long" and p.depth == 2
        assert p.data["tree_tokens"] >= 2 * C
        assert max(p.data["peak_buf1"], p.data["peak_buf2"]) <= 0.95 * C
        assert p.data["context"] == C


def test_chunked_long_sums_are_twice_the_context_in_their_own_format():
    from timjax.eval.long import long_problems
    from timjax.eval.run import doc_format

    fmt = doc_format("chunked-4")
    assert fmt.rewrite and fmt.chunk_terms == 4
    probs = long_problems(2, 2, C, str(default_model_path()), seed=1, fmt=fmt)
    for p in probs:
        assert p.data["tree_tokens"] >= 2 * C and max(p.data["peak_buf1"], p.data["peak_buf2"]) <= 0.95 * C
        assert "(" not in p.question and p.data["operands"] >= 8  # a flat sum of literals and products
    with pytest.raises(ValueError, match="--format"):
        doc_format("chunked-1")
    assert doc_format("rewrite").rewrite and not doc_format("restate").rewrite


def test_long_family_refuses_what_cannot_fit():
    from timjax.base.errors import ParameterError
    from timjax.eval.long import long_problems

    with pytest.raises(ParameterError, match="smaller k or a larger context"):
        long_problems(1, 4, 256, str(default_model_path()), attempts=5)


def test_without_pruning_a_long_tree_stops_at_the_context_and_is_reported(long_probs):
    import timjax

    model = timjax.load(default_model_path(), dtype="float32")
    rep = evaluate(model, long_probs[:1], [Setting("off", None)], context=C, max_new_tokens=4 * C, progress=False)
    s = rep.settings[0]
    assert rep.context == C
    assert s.overall.context_limit == 1 and s.overall.accuracy == 0.0
    assert s.samples[0]["finish"] == "length" and s.samples[0]["peak"] <= C + 1
    assert s.samples[0]["tree_tokens"] == long_probs[0].data["tree_tokens"]
    assert "max_seq_len" in s.failures[0]["error"]
    assert s.groups["long-2"].n == 1 and "long d" in next(iter(s.by_depth))


def test_groups_and_tool_variant_settings():
    assert parse_groups("notation-3,notation-8,long-2,arith-3") == (
        ("notation", 3),
        ("notation", 8),
        ("long", 2),
        ("arith", 3),
    )
    with pytest.raises(ValueError, match="notation-3..notation-8"):
        parse_groups("notation-9")
    ss = settings_from_labels(["off", "buf2"], ["shipped", "result-value"])
    assert [s.label for s in ss] == ["off@shipped", "buf2@shipped", "off@result-value", "buf2@result-value"]
    assert [s.tools for s in ss] == [None, None, "result-value", "result-value"]
    with pytest.raises(ValueError, match="--tool-variants"):
        settings_from_labels(["buf2"], ["result-xml"])


def test_plot_bins_by_reference_length_else_the_longest_run():
    from timjax.eval.plot import accuracy_by_length, tree_lengths

    sample = lambda ok, tokens, ref=None: {"ok": ok, "tokens": tokens, "tree_tokens": ref, "group": "long-2"}
    report = {
        "context": 100,
        "settings": [
            {"label": "off", "samples": [sample(True, 40), sample(False, 100, 250)]},
            {"label": "buf1", "samples": [sample(True, 60), sample(True, 240, 250)]},
        ],
    }
    assert tree_lengths(report) == [0.6, 2.5]
    acc = accuracy_by_length([report])
    assert acc["long: off"] == [(0.625, 1.0, 1), (2.75, 0.0, 1)]
    assert acc["long: buf1"][1] == (2.75, 1.0, 1)

"""timjax eval on a tiny run: the report's figures are consistent, the table and JSON are written, and
outside problems load from JSON lines."""

from __future__ import annotations

import json

import pytest
from _train_helpers import tiny_random_tim

from timjax.eval.run import (
    Setting,
    doc_format,
    evaluate,
    heldout_problems,
    settings_from_labels,
    write_report,
)
from timjax.train.corpus import (
    CorpusSpec,
    load_problems_jsonl,
    problems,
    save_problems_jsonl,
)


def test_heldout_problems_are_heldout_and_grouped():
    probs = heldout_problems(2)
    assert [(p.kind, p.depth) for p in probs] == [
        (k, d) for k, d in [("arith", 1), ("arith", 2), ("arith", 3), ("lookup", 2), ("lookup", 3)] for _ in range(2)
    ]
    train_keys = {p.key for p in problems(CorpusSpec(), "train", 300)}
    assert not train_keys & {p.key for p in probs}


def test_jsonl_problems_round_trip_and_bad_lines_name_the_file(tmp_path):
    probs = heldout_problems(1)
    path = tmp_path / "p.jsonl"
    save_problems_jsonl(probs, str(path))
    back = load_problems_jsonl(str(path))
    assert [(p.question, p.answer, p.kind, p.depth) for p in back] == [
        (p.question, p.answer, p.kind, p.depth) for p in probs
    ]
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_problems_jsonl(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="unknown setting"):
        settings_from_labels(["buf9"])


def test_eval_on_a_tiny_model_reports_every_setting(tmp_path):
    import timjax

    model = timjax.load(tiny_random_tim(), dtype="float32")
    probs = heldout_problems(1, groups=(("arith", 1), ("lookup", 2)))
    settings = [Setting("off", None), Setting("buf0", 0), Setting("buf0-shift", 0, "shift")]
    rep = evaluate(
        model, probs, settings, max_new_tokens=48, progress=False, say=lambda *a: None, trace=doc_format("rewrite")
    )
    assert [s.label for s in rep.settings] == ["off", "buf0", "buf0-shift"]
    for s in rep.settings:
        o = s.overall
        assert o.n == 2 and sum(g.n for g in s.groups.values()) == 2
        assert o.invalid + o.unfinished <= 2 and 0 <= o.accuracy <= 1
        assert o.peak_working_tokens > 0 and s.tokens_per_s > 0
        # every wrong answer is listed with its group (a random model gets at least one wrong)
        assert len(s.failures) == round(o.n * (1 - o.accuracy)) >= 1
        assert {f["group"] for f in s.failures} <= {"arith-1", "lookup-2"}
        # a wrong arithmetic answer says where it left the rewrite trace; a lookup has no such trace
        arith = [f for f in s.failures if f["group"] == "arith-1"]
        assert all(f["rewrite_divergence"]["kind"] for f in arith)
        assert sum(s.divergence.values()) == len(arith)
        assert all("rewrite_divergence" not in f for f in s.failures if f["group"] == "lookup-2")
    assert rep.settings[0].overall.pruned_share == 0
    table = rep.table()
    assert "buf0-shift" in table and "acc arith-1" in table
    write_report(rep, str(tmp_path / "new" / "r.json"))  # a missing --json folder is created
    assert json.loads((tmp_path / "new" / "r.json").read_text())["n_problems"] == 2


def test_groups_parse_and_bad_groups_name_the_entry():
    from timjax.eval.run import parse_groups

    assert parse_groups("arith-4, lookup-2") == (("arith", 4), ("lookup", 2))
    probs = heldout_problems(2, groups=parse_groups("arith-4"))
    assert [(p.kind, p.depth) for p in probs] == [("arith", 4), ("arith", 4)]
    for bad in ("arith-0", "arith-7", "lookup-5", "maths-2", "arith"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_groups(bad)

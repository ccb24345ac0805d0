"""GRPO: group-normalised advantages, the sampled-token mask of a real generation, one step end to end."""

from __future__ import annotations

import itertools
import json
import re

import jax
import numpy as np
import pytest
from _train_helpers import replayer, small_problems, tiny_random_tim

from timjax.train.corpus import document_text
from timjax.train.grpo import GRPOConfig, group_advantages, run_grpo
from timjax.train.runtime_view import TOOL, runtime_doc_from_tokens


def test_group_advantages_are_normalised_within_groups():
    adv = group_advantages([1, 0, 0, 0, 1, 1, 1, 1], 4)
    np.testing.assert_allclose(adv[:4], [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3)], rtol=1e-5)
    np.testing.assert_array_equal(adv[4:], 0)  # a group that agrees teaches nothing
    assert abs(adv[:4].mean()) < 1e-6


def test_labels_of_real_tokens_match_the_replay():
    rp = replayer()
    for p in small_problems()[:15]:
        doc = rp.replay(p.question, document_text(p))
        counts, k = [], 0
        while k < len(doc.kinds):  # the runtime's result_tokens per call
            if doc.kinds[k] == TOOL:
                n = 0
                while k < len(doc.kinds) and doc.kinds[k] == TOOL:
                    n, k = n + 1, k + 1
                counts.append(n)
            k += 1
        got = runtime_doc_from_tokens(rp, doc.prompt, doc.tokens, counts)
        assert got.kinds == doc.kinds
        assert [l for _, l in got.lists] == [l for _, l in doc.lists]


def test_one_grpo_step_runs_end_to_end_and_updates_the_policy(tmp_path):
    flip = itertools.cycle([1.0, 0.0])
    cfg = GRPOConfig(
        model_dir=str(tiny_random_tim()),
        out_dir=str(tmp_path),
        steps=1,
        problems_per_step=1,
        group_size=2,
        max_new_tokens=40,
        lr=1e-2,
        groups="arith-2",
    )
    import timjax

    before = timjax.load(cfg.model_dir, dtype="float32").params()
    seen = []

    def reward(p, r):
        seen.append((p.kind, p.depth))
        return next(flip)

    out = run_grpo(cfg, say=lambda *a: None, reward_fn=reward)
    assert set(seen) == {("arith", 2)}  # `groups` picks the problems
    st = out["history"][0]
    assert st["rollouts"] == 2 and st["groups_with_signal"] == 1 and st["updated"]
    assert np.isfinite(st["loss"])
    changed = [
        not np.allclose(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(out["params"]))
    ]
    assert any(changed)
    assert json.loads(open(tmp_path / "grpo_log.jsonl").readline())["step"] == 0
    timjax.load(out["hf_dir"], dtype="float32")


def test_grpo_draws_from_the_notation_corpus_sft_trained_on():
    from timjax.train.corpus import question_expression
    from timjax.train.grpo import GRPOConfig, problem_pool

    data = {"mix": [["flat", 8, 1.0]], "p_tight": 1.0, "max_literal": 9999, "digits_uniform": True, "p_fraction": 0.5}
    pool = problem_pool(GRPOConfig(model_dir="m", out_dir="o", data=data, corpus_seed=3), 30)
    texts = [question_expression(p.question) for p in pool]
    assert all(" " not in t for t in texts)  # every question typed tight
    assert max(len(t.split("+")) + len(t.split("-")) for t in texts) >= 6  # flat sums of many terms
    assert any("/" in p.answer for p in pool) and any(
        len(n) == 4 for t in texts for n in t.replace("-", "+").split("+")
    )
    assert [p.key for p in pool] != [p.key for p in problem_pool(GRPOConfig(model_dir="m", out_dir="o", data=data), 30)]
    # groups narrow the corpus's mix, flat-N included; the default corpus is the shipped one
    narrowed = problem_pool(GRPOConfig(model_dir="m", out_dir="o", data=data, groups="arith-2"), 10)
    tight = [not re.search(r"[\d)] [-+*/]", question_expression(p.question)) for p in narrowed]
    assert {p.depth for p in narrowed} == {2} and all(tight)
    plain = problem_pool(GRPOConfig(model_dir="m", out_dir="o", groups="arith-2"), 10)
    assert not any(re.search(r"[\d)] [-+*/]", question_expression(p.question)) is None for p in plain)
    with pytest.raises(ValueError, match="--groups: 'notation-5'"):
        problem_pool(GRPOConfig(model_dir="m", out_dir="o", groups="notation-5"), 1)

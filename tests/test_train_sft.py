"""SFT: packed attention is per-sequence causal attention, the loss goes down, a resumed run equals an
uninterrupted one, the result exports to a loadable Hugging Face checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import tokenizer_dir

from timjax.qwen3.model import causal_attention
from timjax.train.sft import (
    DataSpec,
    ModelSpec,
    TrainConfig,
    load_config,
    packed_attention,
    train,
)

TINY_MODEL = ModelSpec(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=1024,
)


def tiny_config(out_dir, **kw) -> TrainConfig:
    data = DataSpec(
        n_problems=24,
        tokenizer_dir=str(tokenizer_dir()),
        seq_lens=[384],
        mix=[("arith", 1, 1.0), ("arith", 2, 1.0), ("lookup", 2, 1.0)],
    )
    base = dict(
        out_dir=str(out_dir),
        model=TINY_MODEL,
        data=data,
        tokens_per_batch=1536,
        steps=4,
        lr=3e-3,
        warmup_steps=2,
        save_every=2,
        log_every=1,
        export=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_packed_attention_is_causal_attention_within_each_sequence():
    rng = np.random.default_rng(0)
    T, Hq, Hkv, hd = 12, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(1, T, h, hd)), jnp.float32) for h in (Hq, Hkv, Hkv))
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3])
    out, _ = packed_attention(q, k, v, 0, None, segments=seg)
    for a, b in ((0, 5), (5, 9)):
        ref, _ = causal_attention(q[:, a:b], k[:, a:b], v[:, a:b], 0, None)
        np.testing.assert_allclose(np.asarray(out[:, a:b]), np.asarray(ref), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_loss_goes_down(tmp_path):
    s = train(tiny_config(tmp_path, steps=8, lr=1e-2), progress=False, say=lambda *a: None)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "log.jsonl")]
    assert s["step"] == 8 and len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path):
    quiet = dict(progress=False, say=lambda *a: None)
    full = train(tiny_config(tmp_path / "a"), **quiet)
    first = train(tiny_config(tmp_path / "b"), stop_after=2, **quiet)
    assert first["step"] == 2
    resumed = train(tiny_config(tmp_path / "b"), **quiet)
    assert resumed["step"] == 4
    for x, y in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and the interruption really happened: the first half differs from the end state
    assert not all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(full["params"]))
    )


def test_export_loads_with_timjax_and_config_errors_name_the_file(tmp_path):
    import timjax

    s = train(tiny_config(tmp_path, steps=1, export=True), progress=False, say=lambda *a: None)
    model = timjax.load(s["hf_dir"], dtype="float32")
    assert model.tokenizer is not None and model.config.num_hidden_layers == 2
    assert (tmp_path / "curve.png").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"out_dir": "x", "steps": "many"}))
    from timjax.base.errors import TimjaxError

    with pytest.raises(TimjaxError, match="bad.json.*steps"):
        load_config(bad)


def test_until_step_stops_and_exports_with_the_full_schedule_and_data_only_builds_the_cache(tmp_path):
    quiet = dict(progress=False, say=lambda *a: None)
    d = train(tiny_config(tmp_path / "d"), data_only=True, **quiet)
    assert d["step"] == 0 and (tmp_path / "d" / "data.npz").is_file()
    assert not (tmp_path / "d" / "checkpoints").exists()
    s = train(tiny_config(tmp_path / "d", steps=6, export=True), until_step=3, **quiet)
    logged = [json.loads(l) for l in open(tmp_path / "d" / "log.jsonl")]
    assert s["step"] == 3 and [r["step"] for r in logged] == [1, 2, 3]
    # the learning rate at step 3 is the 6-step schedule's (a 3-step schedule would have decayed by then)
    from timjax.train.sft import make_optimizer

    _, sched6 = make_optimizer(tiny_config(tmp_path, steps=6))
    assert logged[-1]["lr"] == pytest.approx(float(sched6(2)))
    assert (tmp_path / "d" / "hf" / "config.json").is_file()


def test_retokenize_carries_embedding_rows_over_by_token_string(tmp_path):
    import timjax
    from timjax.api import load_tokenizer
    from timjax.train.sft import transfer_embeddings

    quiet = dict(progress=False, say=lambda *a: None)
    src = train(tiny_config(tmp_path / "a", steps=1, export=True), **quiet)
    cfg = tiny_config(tmp_path / "b", steps=1, export=True, init_from=src["hf_dir"], retokenize=True).model_copy(
        update={"data": DataSpec(n_problems=24, seq_lens=[384, 768], vocab_size=400, mix=[("lookup", 2, 1.0)])}
    )
    out = train(cfg, **quiet)
    old_tok, new_tok = load_tokenizer(src["hf_dir"]), load_tokenizer(out["tokenizer_dir"])
    old = timjax.load(src["hf_dir"], dtype="float32").params()["embed"]
    new_vocab = new_tok.get_vocab()
    # the tokenizer trained here spells the KB's names, so it differs from the source's
    assert new_vocab != old_tok.get_vocab()
    params = transfer_embeddings({"embed": old}, old_tok, new_tok, 448, jax.random.key(0))
    shared = [(t, i) for t, i in new_vocab.items() if t in old_tok.get_vocab() and i < 448]
    assert len(shared) > 50
    for t, i in shared:
        np.testing.assert_array_equal(np.asarray(params["embed"][i]), np.asarray(old[old_tok.get_vocab()[t]]))
    assert params["embed"].shape == (448, old.shape[1])
    assert timjax.load(out["hf_dir"], dtype="float32").config.vocab_size % 64 == 0


def test_a_fine_tune_with_more_layers_starts_from_the_checkpoints_function(tmp_path):
    import timjax
    from timjax.base.errors import TimjaxError
    from timjax.qwen3.model import logits

    quiet = {"progress": False, "say": lambda *a: None}
    src = train(tiny_config(tmp_path / "a", steps=1, export=True), **quiet)
    deeper = TINY_MODEL.model_copy(update={"num_hidden_layers": TINY_MODEL.num_hidden_layers + 1})
    cfg = tiny_config(tmp_path / "b", steps=1, export=True, init_from=src["hf_dir"], model=deeper, lr=0.0)
    out = train(cfg, **quiet)
    grown = timjax.load(out["hf_dir"], dtype="float32")
    assert grown.config.num_hidden_layers == TINY_MODEL.num_hidden_layers + 1
    ids = np.arange(3, 40)
    np.testing.assert_allclose(
        logits(grown, ids),
        logits(timjax.load(src["hf_dir"], dtype="float32"), ids),
        rtol=1e-4,
        atol=1e-4,
    )
    wider = TINY_MODEL.model_copy(update={"hidden_size": 2 * TINY_MODEL.hidden_size})
    with pytest.raises(TimjaxError, match="model.hidden_size"):
        train(tiny_config(tmp_path / "c", init_from=src["hf_dir"], model=wider), **quiet)

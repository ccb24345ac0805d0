"""Numerical parity of the timjax Qwen3 forward with transformers' Qwen3ForCausalLM."""

import json

import numpy as np
import pytest
import torch
from conftest import make_hf_model, timjax_from_hf

import timjax
from timjax.base.config import ConfigError, Qwen3Config

CONFIGS = {
    # untied, GQA 2, head_dim != hidden/heads (64/4 = 16 vs 24)
    "untied-gqa2-hd24": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
    # tied embeddings, GQA 4, other rope_theta
    "tied-gqa4": dict(
        tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=1_000_000.0
    ),
    # multi-head (GQA 1), three layers
    "mha-3layers": dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, num_hidden_layers=3, rope_theta=500.0
    ),
    # GQA 4 with one kv head, wide head_dim, untied
    "gqa4-onekv-hd48": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=48,
        hidden_size=96,
        intermediate_size=160,
        rope_theta=50000.0,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_logits_match_transformers(name):
    hf = make_hf_model(seed=3, **CONFIGS[name])
    model = timjax_from_hf(hf, "float32")
    ids = np.random.RandomState(7).randint(0, hf.config.vocab_size, size=(2, 23))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = timjax.logits(model, ids)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4
    # the [T] form returns [T, V]
    np.testing.assert_allclose(timjax.logits(model, ids[0]), out[0], atol=1e-5)


def test_bfloat16_argmax_agrees():
    # Tied embeddings (as in Qwen3-0.6B) give the random model peaked predictions; with untied random
    # heads the top-2 logits are near ties and even transformers' bf16 disagrees with its own fp32.
    kw = dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        head_dim=32,
        tie_word_embeddings=True,
    )
    hf32 = make_hf_model(seed=5, **kw)
    hf16 = make_hf_model(seed=5, dtype="bfloat16", **kw)
    ids = np.random.RandomState(2).randint(0, 1024, size=(8, 64))
    with torch.no_grad():
        ref = hf16(torch.tensor(ids)).logits.float().numpy()
    out = timjax.logits(timjax_from_hf(hf32, "bfloat16"), ids)
    agree = (out.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.99, agree


def test_weights_are_bf16_with_float32_norms():
    model = timjax_from_hf(make_hf_model(), "bfloat16")
    p = model.params()
    assert p["embed"].dtype == np.dtype("bfloat16") and p["layers"]["q_proj"].dtype == np.dtype("bfloat16")
    assert p["final_norm"].dtype == np.float32 and p["layers"]["k_norm"].dtype == np.float32
    assert p["layers"]["q_proj"].shape[0] == model.config.num_hidden_layers  # stacked over layers


def test_logits_rejects_bad_input(tiny_pair):
    _, model = tiny_pair
    with pytest.raises(ValueError, match="out of range"):
        timjax.logits(model, [1, 2, 999])
    with pytest.raises(ValueError, match="shape"):
        timjax.logits(model, np.zeros((1, 2, 3), int))
    with pytest.raises(ValueError, match="shape"):
        timjax.logits(model, [])


def _hf_config(**kw):
    raw = make_hf_model().config.to_dict()
    raw.update(kw)
    return raw


def test_config_accepts_both_rope_spellings():
    raw = _hf_config()
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=12345.0, rope_scaling=None)
    assert Qwen3Config.from_hf_dict(raw).rope_theta == 12345.0
    raw = _hf_config(rope_parameters={"rope_type": "default", "rope_theta": 777.0})
    raw.pop("rope_theta", None)
    cfg = Qwen3Config.from_hf_dict(raw)
    assert cfg.rope_theta == 777.0 and cfg.head_dim == 16


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("model_type", "qwen3_moe", "model_type='qwen3_moe'"),
        ("architectures", ["Qwen3MoeForCausalLM"], "architectures"),
        (
            "rope_parameters",
            {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
            "rope_parameters.rope_type='yarn'",
        ),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling.rope_type='linear'"),
        ("use_sliding_window", True, "use_sliding_window=True"),
        ("num_key_value_heads", 3, "num_key_value_heads=3"),
        ("head_dim", None, "head_dim"),
    ],
)
def test_config_refuses_unsupported(tmp_path, field, value, needle):
    raw = _hf_config(**{field: value})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        Qwen3Config.from_file(tmp_path)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_config_round_trips_through_hf_dict():
    cfg = Qwen3Config.from_hf_dict(_hf_config(eos_token_id=[3, 4], tie_word_embeddings=True))
    again = Qwen3Config.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg and hash(again) == hash(cfg) and again.eos_token_ids == (3, 4)

"""Growing a checkpoint's depth for a fine-tune (timjax.train.grow): the grown model computes what the
checkpoint did, its old layers keep their weights and order, and a config that changes anything else
about the shape is refused naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timjax.base.config import Qwen3Config
from timjax.base.errors import TimjaxError
from timjax.qwen3.model import forward, init_params
from timjax.train.grow import check_shape, grow_layers, insert_positions
from timjax.train.sft import ModelSpec

CFG = Qwen3Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
)


def _logits(params, n_layers):
    cfg = CFG.model_copy(update={"num_hidden_layers": n_layers})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), tokens.shape)
    return np.asarray(forward(params, cfg, tokens, positions)[0])


def test_a_grown_model_computes_what_the_checkpoint_did_and_its_new_layers_can_learn():
    params = init_params(CFG, "float32", jax.random.key(1), std=0.2)
    grown = grow_layers(params, 2, jax.random.key(2))
    assert grown["layers"]["q_proj"].shape[0] == 5
    np.testing.assert_allclose(_logits(grown, 5), _logits(params, 3), rtol=1e-5, atol=1e-5)
    # the new layers are not copies of the zero output: once o_proj moves, the function changes
    slot = insert_positions(3, 2)[0]
    nudged = {**grown, "layers": dict(grown["layers"])}
    nudged["layers"]["o_proj"] = grown["layers"]["o_proj"].at[slot].set(0.1)
    assert np.abs(_logits(nudged, 5) - _logits(params, 3)).max() > 1e-3


def test_old_layers_keep_their_weights_in_order_around_the_new_ones():
    params = init_params(CFG, "float32", jax.random.key(1))
    slots = insert_positions(3, 2)
    assert len(set(slots)) == 2 and all(0 < s < 5 for s in slots)
    grown = grow_layers(params, 2, jax.random.key(2))
    old = [i for i in range(5) if i not in slots]
    for name, w in params["layers"].items():
        np.testing.assert_array_equal(np.asarray(grown["layers"][name])[old], np.asarray(w))
    for s in slots:
        assert not np.asarray(grown["layers"]["down_proj"][s]).any()
        assert np.asarray(grown["layers"]["q_proj"][s]).std() > 0
    assert insert_positions(4, 2) == [1, 4]
    assert grow_layers(params, 0, jax.random.key(2)) is params


def test_check_shape_names_the_field_a_fine_tune_may_not_change():
    same = ModelSpec(**{f: getattr(CFG, f) for f in ModelSpec.model_fields if f != "max_position_embeddings"})
    assert check_shape(CFG, same, "ckpt") == 0
    assert check_shape(CFG, same.model_copy(update={"num_hidden_layers": 5}), "ckpt") == 2
    with pytest.raises(TimjaxError, match=r"model.hidden_size=64: init_from ckpt has 32"):
        check_shape(CFG, same.model_copy(update={"hidden_size": 64}), "ckpt")
    with pytest.raises(TimjaxError, match=r"model.num_hidden_layers=2: .*can add layers, not drop them"):
        check_shape(CFG, same.model_copy(update={"num_hidden_layers": 2}), "ckpt")

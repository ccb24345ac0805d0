"""A fine-tune that starts from a checkpoint with more layers than it has (issue 23).

The tiny TIM's copy errors (stage 8, ``bench/RESULTS.md``) ask for more capacity than 4 layers. Training a
deeper model from scratch would throw away what the shipped stages learned (the TIM schema, the tools,
spelled names), so the new layers are inserted into the trained stack as identities: each new layer's
output projections (``o_proj``, ``down_proj``) are zero, so its attention and MLP add nothing to the
residual stream and the grown model computes exactly what the checkpoint did. Their input projections are
drawn at random; the gradient reaches them once the output projections move off zero.

New layers are spread evenly through the stack (4 -> 6 gives ``[old0, new, old1, old2, new, old3]``); the
old layers keep their order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from timjax.base.errors import TimjaxError

# the per-layer weights whose output lands on the residual stream: zero makes a layer an identity
_OUTPUTS = ("o_proj", "down_proj")
# the shape of the model a fine-tune may not change (the number of layers may grow)
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
)


def check_shape(ckpt_cfg, model_spec, source: str) -> int:
    """The layers to add to ``ckpt_cfg``'s model for the config's ``model`` section; a field that differs
    otherwise (or fewer layers) raises naming it."""
    for name in SHAPE_FIELDS:
        want, have = getattr(model_spec, name), getattr(ckpt_cfg, name)
        if float(want) != float(have):
            raise TimjaxError(
                f"model.{name}={want}: init_from {source} has {have}; a fine-tune keeps the checkpoint's shape "
                "(only model.num_hidden_layers may grow)"
            )
    add = model_spec.num_hidden_layers - ckpt_cfg.num_hidden_layers
    if add < 0:
        raise TimjaxError(
            f"model.num_hidden_layers={model_spec.num_hidden_layers}: init_from {source} has "
            f"{ckpt_cfg.num_hidden_layers} layers; a fine-tune can add layers, not drop them"
        )
    return add


def insert_positions(old: int, add: int) -> list[int]:
    """The grown stack's index of each new layer, inserted in turn (4 + 2 -> [1, 4])."""
    # new layer j goes after old layer round((j + 1) * old / (add + 1)); index in the grown stack
    after = [round((j + 1) * old / (add + 1)) for j in range(add)]
    return [a + j for j, a in enumerate(after)]


def grow_layers(params: dict, add: int, key: jax.Array, *, std: float = 0.02) -> dict:
    """``params`` with ``add`` identity layers inserted into the stacked ``layers`` (see the module doc)."""
    if add == 0:
        return params
    layers = params["layers"]
    old = next(iter(layers.values())).shape[0]
    slots = insert_positions(old, add)
    keys = jax.random.split(key, len(layers))
    grown = {}
    for k, (name, w) in zip(keys, sorted(layers.items())):
        w = np.asarray(w)
        if name in _OUTPUTS:
            fresh = np.zeros((add,) + w.shape[1:], w.dtype)
        elif name.endswith("norm"):
            fresh = np.ones((add,) + w.shape[1:], w.dtype)
        else:
            fresh = (std * np.asarray(jax.random.normal(k, (add,) + w.shape[1:], jnp.float32))).astype(w.dtype)
        rows = list(w)
        for j, s in enumerate(slots):
            rows.insert(s, fresh[j])
        grown[name] = jnp.asarray(np.stack(rows))
    return {**params, "layers": grown}

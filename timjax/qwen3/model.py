"""Qwen3 in Flax NNX.

The computation is a set of plain functions over an explicit parameter pytree (``forward``), so the
runtime can jit them over ``model.params()`` with the KV cache donated; ``Qwen3`` is the NNX module that
holds those parameters (stacked along a leading layer axis, see ``timjax.qwen3.params``) and offers a
convenient ``__call__`` for the full-sequence reference forward.

Numerics follow transformers' ``Qwen3ForCausalLM``: RMSNorm in float32 as ``w * x_norm``; per-head
q/k RMSNorm before rotate-half RoPE; grouped-query attention with float32 scores and softmax; SwiGLU MLP;
float32 logits.

Attention is a seam: ``forward`` takes an ``attend(q, k, v, layer, cache) -> (out, cache)`` callable.
``causal_attention`` is the dense reference; the paged runtime (``timjax.runtime.steps``) passes one that writes
K/V into the page pool and calls the kernels in ``timjax.kernels``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from timjax.base.config import Qwen3Config
from timjax.qwen3.params import FLOAT32_PARAMS, param_shapes

Params = dict[str, Any]
# attend(q [B,T,Hq,hd], k [B,T,Hkv,hd], v [B,T,Hkv,hd], layer index (traced int), cache) -> (o [B,T,Hq,hd], cache)
Attend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def as_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf).astype(x.dtype)


def rope_freqs(head_dim: int, theta: float) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    angles = positions[..., None].astype(jnp.float32) * rope_freqs(head_dim, theta)  # [..., hd/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, H, hd]; cos/sin: [B, T, hd/2]."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def causal_attention(q, k, v, layer, cache, *, lengths: jax.Array | None = None):
    """Dense causal GQA over the chunk itself (no cache). ``lengths`` [B] masks right padding."""
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("bthgk,bshk->bhgts", qg, k, preferred_element_type=jnp.float32) * hd**-0.5
    allowed = jnp.tril(jnp.ones((T, T), dtype=bool))
    if lengths is not None:
        allowed = allowed[None] & (jnp.arange(T)[None, None, :] < lengths[:, None, None])
        allowed = allowed[:, None, None]
    scores = jnp.where(allowed, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bshk->bthgk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, hd).astype(q.dtype), cache


def forward_hidden(
    params: Params, cfg: Qwen3Config, tokens: jax.Array, positions: jax.Array, attend: Attend, cache: Any = None
) -> tuple[jax.Array, Any]:
    """Embeddings through every layer to the final norm. tokens, positions: int32 [B, T]."""
    x = params["embed"][tokens]  # [B, T, D]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    eps = cfg.rms_norm_eps

    def layer(carry, lp):
        x, cache, i = carry
        h = rms_norm(x, lp["attn_norm"], eps)
        q = jnp.einsum("btd,dhk->bthk", h, lp["q_proj"])  # [B, T, Hq, hd]
        k = jnp.einsum("btd,dhk->bthk", h, lp["k_proj"])  # [B, T, Hkv, hd]
        v = jnp.einsum("btd,dhk->bthk", h, lp["v_proj"])
        q = apply_rope(rms_norm(q, lp["q_norm"], eps), cos, sin)
        k = apply_rope(rms_norm(k, lp["k_norm"], eps), cos, sin)
        o, cache = attend(q, k, v, i, cache)
        x = x + jnp.einsum("bthk,hkd->btd", o, lp["o_proj"])
        h = rms_norm(x, lp["mlp_norm"], eps)
        gate = jnp.einsum("btd,df->btf", h, lp["gate_proj"])
        up = jnp.einsum("btd,df->btf", h, lp["up_proj"])
        x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, lp["down_proj"])
        return (x, cache, i + 1), None

    (x, cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), params["layers"])
    return rms_norm(x, params["final_norm"], eps), cache


def lm_head(params: Params, x: jax.Array) -> jax.Array:
    """Float32 logits [..., V] from final hidden states [..., D]."""
    if "lm_head" in params:
        return jnp.einsum("...d,dv->...v", x, params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)


def forward(
    params: Params,
    cfg: Qwen3Config,
    tokens: jax.Array,
    positions: jax.Array,
    attend: Attend = causal_attention,
    cache: Any = None,
) -> tuple[jax.Array, Any]:
    x, cache = forward_hidden(params, cfg, tokens, positions, attend, cache)
    return lm_head(params, x), cache


@partial(jax.jit, static_argnames=("cfg",))
def _dense_logits(params: Params, cfg: Qwen3Config, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    attend = partial(causal_attention, lengths=lengths)
    return forward(params, cfg, tokens, positions, attend)[0]


class _Layers(nnx.Module):
    """Per-layer weights stacked along a leading [L] axis (see ``timjax.qwen3.params.param_shapes``)."""

    def __init__(self, arrays: dict[str, jax.Array]):
        for name, value in arrays.items():
            setattr(self, name, nnx.Param(value))


class Qwen3(nnx.Module):
    """Qwen3ForCausalLM. Build with random weights (``rngs``) or from a params dict (``params``).
    ``mesh``: the device mesh the params are sharded over (``timjax.runtime.sharding``), None on one device;
    ``place_batch``: how ``__call__`` places token rows on that mesh (``timjax.runtime.sharding`` passes its batch
    rule: the model layer does not import the sharding layer above it)."""

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype="bfloat16",
        rngs: nnx.Rngs | None = None,
        params: Params | None = None,
        tokenizer: Any = None,
        mesh: Any = None,
        place_batch: Any = None,
    ):
        self.config = config
        self.mesh = mesh
        self.place_batch = place_batch
        self.dtype = as_dtype(dtype)
        self.tokenizer = tokenizer
        if params is None:
            params = init_params(config, self.dtype, rngs.params() if rngs is not None else jax.random.key(0))
        else:
            params = cast_params(params, self.dtype)
            check_param_shapes(config, params)
        self.embed = nnx.Param(params["embed"])
        self.layers = _Layers(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (what the jitted steps take)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        if self.place_batch is not None:  # batch rows over the mesh's data-parallel axis
            tokens = self.place_batch(tokens)
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        return _dense_logits(self.params(), self.config, tokens, lengths)


def _split_path(params: Params, path: str):
    node = params
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    return node, leaf


def cast_params(params: Params, dtype) -> Params:
    """Weights to ``dtype``; norm weights stay float32."""
    dtype = as_dtype(dtype)
    out: Params = {"layers": {}}
    for group, tree in params.items():
        items = tree.items() if group == "layers" else [(None, tree)]
        for name, arr in items:
            path = f"layers.{name}" if name else group
            target = jnp.float32 if path in FLOAT32_PARAMS else dtype
            arr = jnp.asarray(arr, dtype=target)
            if name:
                out["layers"][name] = arr
            else:
                out[group] = arr
    return out


def check_param_shapes(cfg: Qwen3Config, params: Params) -> None:
    for path, shape in param_shapes(cfg).items():
        node, leaf = _split_path(params, path)
        if leaf not in node:
            raise ValueError(f"parameter {path} missing")
        if tuple(node[leaf].shape) != tuple(shape):
            raise ValueError(f"parameter {path}: expected shape {tuple(shape)}, found {tuple(node[leaf].shape)}")


def init_params(cfg: Qwen3Config, dtype, key: jax.Array, *, std: float = 0.02) -> Params:
    """Random weights (normal(0, std); norm weights near 1) for tests and benchmarks."""
    dtype = as_dtype(dtype)
    params: Params = {"layers": {}}
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    for k, (path, shape) in zip(keys, shapes.items()):
        if path in FLOAT32_PARAMS:
            value = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            value = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        node, leaf = _split_path(params, path)
        node[leaf] = value
    return params


def random_model(cfg: Qwen3Config, *, dtype="bfloat16", seed: int = 0, tokenizer: Any = None) -> Qwen3:
    from timjax.base.validation import check_random_model

    check_random_model(cfg, dtype, seed)
    return Qwen3(cfg, dtype=dtype, rngs=nnx.Rngs(params=seed), tokenizer=tokenizer)


def logits(model: Qwen3, token_ids) -> np.ndarray:
    """The full-sequence reference forward: float32 logits [T, V] for [T] ids, [B, T, V] for [B, T]."""
    from timjax.base.validation import check_logits

    check_logits(model, token_ids)
    ids = np.asarray(token_ids)
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty list or array of shape [T] or [B, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise ValueError(f"token id out of range [0, {model.config.vocab_size}): min {ids.min()}, max {ids.max()}")
    out = np.asarray(model(ids[None] if ids.ndim == 1 else ids))
    return out[0] if ids.ndim == 1 else out

"""Token sampling inside the jit: greedy, temperature, top-k, top-p, a seed per sequence, and an optional
packed token bitmask (int32 ``[B, ceil(V/32)]``; bit j of word i allows token 32i+j)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from timjax.base.buckets import cdiv


@partial(
    jax.tree_util.register_dataclass, data_fields=["temperature", "top_k", "top_p", "seed", "counter"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings (arrays of shape [B]). temperature 0 = greedy; top_k 0 and top_p 1 = off.
    ``counter`` is how many tokens the row has sampled, so (seed, counter) fixes each draw."""

    temperature: jax.Array  # float32 [B]
    top_k: jax.Array  # int32 [B]
    top_p: jax.Array  # float32 [B]
    seed: jax.Array  # uint32 [B]
    counter: jax.Array  # int32 [B]

    @staticmethod
    def host(rows: int) -> dict[str, np.ndarray]:
        """Zeroed host-side buffers to fill per row before a step."""
        return {
            "temperature": np.zeros(rows, np.float32),
            "top_k": np.zeros(rows, np.int32),
            "top_p": np.ones(rows, np.float32),
            "seed": np.zeros(rows, np.uint32),
            "counter": np.zeros(rows, np.int32),
        }


def unpack_bitmask(bitmask: jax.Array, vocab: int) -> jax.Array:
    """int32 [B, W] -> bool [B, vocab]; tokens past 32*W are disallowed."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1).astype(bool)
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    return jnp.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))


def pack_bitmask(allowed: np.ndarray) -> np.ndarray:
    """bool [B, V] -> int32 [B, ceil(V/32)] (host side; the layout llguidance fills)."""
    allowed = np.asarray(allowed, bool)
    B, V = allowed.shape
    padded = np.zeros((B, cdiv(V, 32) * 32), bool)
    padded[:, :V] = allowed
    words = (padded.reshape(B, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.astype(np.uint32).view(np.int32)


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    V = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    n_keep = jnp.maximum(keep_sorted.sum(-1), 1)
    pth = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, params: SamplingParams, bitmask: jax.Array | None = None) -> jax.Array:
    """logits float32 [B, V] -> int32 [B]. Rows whose mask allows nothing return token 0 (the host's
    grammar reports the dead end; the kernel never produces NaNs)."""
    logits = logits.astype(jnp.float32)
    if bitmask is not None:
        logits = jnp.where(unpack_bitmask(bitmask, logits.shape[-1]), logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        temp = jnp.where(params.temperature > 0, params.temperature, 1.0)
        scaled = logits / temp[:, None]
        needs_filter = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda l, k, p: l, scaled, params.top_k, params.top_p)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(params.seed, params.counter)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda l: greedy, logits)

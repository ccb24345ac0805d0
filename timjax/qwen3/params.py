"""The timjax parameter layout and its mapping to Hugging Face Qwen3 tensor names.

timjax keeps every per-layer weight stacked along a leading layer axis ``[L, ...]`` so the forward can
``lax.scan`` over layers (compile time independent of depth), and stores projections in the
orientation the einsums use (``"btd,dhk->bthk"``), not torch's ``[out, in]``.

One table, ``HF_TABLE``, maps each HF tensor name (a regex) to a timjax parameter path and the
transform between the two orientations. Conversion in both directions goes through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from timjax.base.config import Qwen3Config


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape and the logical name of each axis (``timjax.runtime.sharding`` maps names to mesh axes)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]


# Logical axis names. Tensor parallelism splits q_heads / kv_heads / mlp (column-parallel q, k, v, gate, up;
# row-parallel o, down) and vocab; "layers", "embed" and "head_dim" stay whole on every device.
VOCAB, EMBED, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = (
    "vocab",
    "embed",
    "q_heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "layers",
)


def param_specs(cfg: Qwen3Config) -> dict[str, ParamSpec]:
    """Shape and logical axes of every timjax parameter, by its dotted path (the one place both are declared)."""
    L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Hq, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    S = ParamSpec
    specs = {
        "embed": S((V, D), (VOCAB, EMBED)),
        "layers.attn_norm": S((L, D), (LAYERS, EMBED)),
        "layers.q_proj": S((L, D, Hq, hd), (LAYERS, EMBED, Q_HEADS, HEAD_DIM)),
        "layers.k_proj": S((L, D, Hkv, hd), (LAYERS, EMBED, KV_HEADS, HEAD_DIM)),
        "layers.v_proj": S((L, D, Hkv, hd), (LAYERS, EMBED, KV_HEADS, HEAD_DIM)),
        "layers.o_proj": S((L, Hq, hd, D), (LAYERS, Q_HEADS, HEAD_DIM, EMBED)),
        "layers.q_norm": S((L, hd), (LAYERS, HEAD_DIM)),
        "layers.k_norm": S((L, hd), (LAYERS, HEAD_DIM)),
        "layers.mlp_norm": S((L, D), (LAYERS, EMBED)),
        "layers.gate_proj": S((L, D, F), (LAYERS, EMBED, MLP)),
        "layers.up_proj": S((L, D, F), (LAYERS, EMBED, MLP)),
        "layers.down_proj": S((L, F, D), (LAYERS, MLP, EMBED)),
        "final_norm": S((D,), (EMBED,)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = S((D, V), (EMBED, VOCAB))
    return specs


def param_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Shape of every timjax parameter, by its dotted path."""
    return {path: spec.shape for path, spec in param_specs(cfg).items()}


# Norm weights stay float32 whatever the model dtype: they are tiny and the norm is computed in float32.
FLOAT32_PARAMS = frozenset({"layers.attn_norm", "layers.q_norm", "layers.k_norm", "layers.mlp_norm", "final_norm"})


@dataclass(frozen=True)
class Mapping:
    hf_pattern: re.Pattern[str]
    path: str  # timjax parameter path
    to_timjax: Callable[[np.ndarray, Qwen3Config], np.ndarray]  # one HF tensor -> one layer's slice
    to_hf: Callable[[np.ndarray, Qwen3Config], np.ndarray]  # inverse

    @property
    def per_layer(self) -> bool:
        return self.path.startswith("layers.")


def _same(x, cfg):
    return x


def _transpose(x, cfg):
    return x.T


def _heads_in(n_heads_attr: str):
    # torch [H*hd, D] -> [D, H, hd]
    def fwd(x, cfg):
        h = getattr(cfg, n_heads_attr)
        return x.reshape(h, cfg.head_dim, cfg.hidden_size).transpose(2, 0, 1)

    def back(x, cfg):
        return x.transpose(1, 2, 0).reshape(-1, cfg.hidden_size)

    return fwd, back


def _o_fwd(x, cfg):  # torch [D, Hq*hd] -> [Hq, hd, D]
    return x.reshape(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2, 0)


def _o_back(x, cfg):
    return x.transpose(2, 0, 1).reshape(cfg.hidden_size, -1)


_L = r"model\.layers\.(\d+)\."
HF_TABLE: tuple[Mapping, ...] = (
    Mapping(re.compile(r"model\.embed_tokens\.weight"), "embed", _same, _same),
    Mapping(re.compile(r"model\.norm\.weight"), "final_norm", _same, _same),
    Mapping(re.compile(r"lm_head\.weight"), "lm_head", _transpose, _transpose),
    Mapping(re.compile(_L + r"input_layernorm\.weight"), "layers.attn_norm", _same, _same),
    Mapping(re.compile(_L + r"post_attention_layernorm\.weight"), "layers.mlp_norm", _same, _same),
    Mapping(re.compile(_L + r"self_attn\.q_proj\.weight"), "layers.q_proj", *_heads_in("num_attention_heads")),
    Mapping(re.compile(_L + r"self_attn\.k_proj\.weight"), "layers.k_proj", *_heads_in("num_key_value_heads")),
    Mapping(re.compile(_L + r"self_attn\.v_proj\.weight"), "layers.v_proj", *_heads_in("num_key_value_heads")),
    Mapping(re.compile(_L + r"self_attn\.o_proj\.weight"), "layers.o_proj", _o_fwd, _o_back),
    Mapping(re.compile(_L + r"self_attn\.q_norm\.weight"), "layers.q_norm", _same, _same),
    Mapping(re.compile(_L + r"self_attn\.k_norm\.weight"), "layers.k_norm", _same, _same),
    Mapping(re.compile(_L + r"mlp\.gate_proj\.weight"), "layers.gate_proj", _transpose, _transpose),
    Mapping(re.compile(_L + r"mlp\.up_proj\.weight"), "layers.up_proj", _transpose, _transpose),
    Mapping(re.compile(_L + r"mlp\.down_proj\.weight"), "layers.down_proj", _transpose, _transpose),
)


def match_hf_name(name: str) -> tuple[Mapping, int | None] | None:
    """The table row for an HF tensor name and its layer index (None for non-layer tensors)."""
    for m in HF_TABLE:
        hit = m.hf_pattern.fullmatch(name)
        if hit:
            return m, (int(hit.group(1)) if m.per_layer else None)
    return None


def hf_name(path: str, layer: int | None = None) -> str:
    """The HF tensor name of a timjax parameter (and layer)."""
    for m in HF_TABLE:
        if m.path == path:
            pat = m.hf_pattern.pattern
            return pat.replace(r"(\d+)", str(layer)).replace("\\", "") if m.per_layer else pat.replace("\\", "")
    raise KeyError(path)


def hf_shape(path: str, cfg: Qwen3Config) -> tuple[int, ...]:
    """The shape an HF tensor must have for the timjax parameter ``path`` (one layer's worth)."""
    shape = param_shapes(cfg)[path]
    if path.startswith("layers."):
        shape = shape[1:]
    m = next(m for m in HF_TABLE if m.path == path)
    return tuple(m.to_hf(np.empty(shape, dtype=np.uint8), cfg).shape)


def expected_hf_names(cfg: Qwen3Config) -> list[str]:
    """Every HF tensor name a checkpoint of this config must hold."""
    names = []
    for path in param_shapes(cfg):
        if path.startswith("layers."):
            names += [hf_name(path, i) for i in range(cfg.num_hidden_layers)]
        else:
            names.append(hf_name(path))
    return names


def params_from_hf_tensors(cfg: Qwen3Config, tensors: dict[str, np.ndarray]) -> dict:
    """Stack a complete dict of HF tensors (name -> array) into the timjax params layout (numpy)."""
    shapes = param_shapes(cfg)
    out: dict = {
        "layers": {p.split(".", 1)[1]: [None] * cfg.num_hidden_layers for p in shapes if p.startswith("layers.")}
    }
    for name, arr in tensors.items():
        hit = match_hf_name(name)
        if hit is None:
            raise KeyError(f"unexpected tensor {name}")
        m, layer = hit
        value = m.to_timjax(np.asarray(arr), cfg)
        if layer is None:
            out[m.path] = value
        else:
            out["layers"][m.path.split(".", 1)[1]][layer] = value
    for name, stack in out["layers"].items():
        out["layers"][name] = np.stack(stack)
    return out

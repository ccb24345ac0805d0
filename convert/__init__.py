"""Checkpoint conversion between Hugging Face Qwen3 safetensors and the timjax format.

Public API::

    convert_hf_to_timjax(hf_dir, out_dir, *, dtype=None, overwrite=False, progress=True) -> Path  # dtype: as stored
    read_params(path, dtype=None) -> (Qwen3Config, params)      # a timjax dir or an HF dir
    export_timjax_to_hf(src, out_dir, *, dtype=None, max_shard_bytes=5 GiB, overwrite=False,
                        tokenizer_dir=None, progress=True) -> Path  # src: timjax dir or (cfg, params)

``params`` is nested: ``{"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
"layers": {"attn_norm": [L, D], "q_proj": [L, D, Hq, hd], ...}}`` of host numpy arrays, in the layout of
:func:`timjax.qwen3.params.param_shapes` (norms, :data:`timjax.qwen3.params.FLOAT32_PARAMS`, always float32).

Reading HF checkpoints needs no torch: ``model.safetensors`` or ``model.safetensors.index.json`` plus shards,
tensors in BF16/F16/F32. Shards are streamed; memory stays near one layer (plus a layer split across shards).

timjax checkpoint format (``format_version`` 1)
----------------------------------------------
::

    OUT_DIR/
      config.json            the Hugging Face config.json, copied verbatim (validated by Qwen3Config)
      timjax.json            {"format": "timjax", "format_version": 1, "dtype": "bfloat16",
                              "num_hidden_layers": L, "tie_word_embeddings": bool,
                              "params": {path: {"shape": [...], "dtype": ...}},   # stacked shapes, as loaded
                              "checkpoints": {"embed": "params/embed", "final_norm": "params/final_norm",
                                              ["lm_head": "params/lm_head",] "layers": "params/layer_{:05d}"},
                              "source": {...}, "side_files": [...]}
      params/embed/          orbax PyTree checkpoint {"embed": [V, D]}
      params/final_norm/     orbax PyTree checkpoint {"final_norm": [D]} (float32)
      params/lm_head/        orbax PyTree checkpoint {"lm_head": [D, V]} (untied models only)
      params/layer_00000/    orbax PyTree checkpoint of one layer, unstacked:
                             {"attn_norm": [D], "q_proj": [D, Hq, hd], "k_proj": [D, Hkv, hd], "v_proj": ...,
                              "o_proj": [Hq, hd, D], "q_norm": [hd], "k_norm": [hd], "mlp_norm": [D],
                              "gate_proj": [D, F], "up_proj": [D, F], "down_proj": [F, D]}
      params/layer_00001/ ...
      tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, special_tokens_map.json,
      added_tokens.json, chat_template.jinja, generation_config.json   (whichever the source had)

Each orbax item is a plain ``orbax.checkpoint.PyTreeCheckpointer`` save of numpy arrays (restores as
numpy). Layers are stored one item each so neither writing nor reading ever needs a whole stacked
``[L, ...]`` array in memory besides the destination; the loader stacks them. Weights are in ``dtype``
(by default the source tensors' own), norms in float32.

Policies
--------
* Unknown tensors are refused (named in the error). Exceptions: ``rotary_emb.inv_freq`` buffers are
  skipped, and in a tied checkpoint (``tie_word_embeddings=true``) an ``lm_head.weight`` is accepted and
  dropped if it has the embedding's shape and is bit-identical to ``model.embed_tokens.weight``; if it
  differs it is refused (the model would not really be tied).
* Outputs are written to a temp dir beside ``OUT_DIR`` and renamed into place at the end; any failure leaves
  no ``OUT_DIR`` and no temp dir. An existing ``OUT_DIR`` is refused unless ``overwrite``.
* All input problems raise :class:`timjax.base.errors.TimjaxError` subclasses with one-line messages naming the
  file (and tensor).
"""

from .hf_to_timjax import HFPlan, checkpoint_dtype, convert_hf_to_timjax, read_params, scan_hf_checkpoint
from .safetensors_io import TOKENIZER_FILES, resolve_dtype
from .timjax_format import FORMAT_VERSION, TimjaxCheckpoint, flatten_params, nest_params
from .timjax_to_hf import DEFAULT_MAX_SHARD_BYTES, export_timjax_to_hf

__all__ = [
    "checkpoint_dtype",
    "convert_hf_to_timjax",
    "read_params",
    "export_timjax_to_hf",
    "scan_hf_checkpoint",
    "HFPlan",
    "TimjaxCheckpoint",
    "nest_params",
    "flatten_params",
    "resolve_dtype",
    "FORMAT_VERSION",
    "TOKENIZER_FILES",
    "DEFAULT_MAX_SHARD_BYTES",
]

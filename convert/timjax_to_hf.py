"""timjax parameters (a converted dir or an in-memory ``(cfg, params)``) -> Hugging Face safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from timjax.base.config import Qwen3Config
from timjax.base.errors import (
    TensorMissingError,
    TensorShapeError,
    TimjaxError,
    UnexpectedTensorError,
)
from timjax.base.validation import check_export
from timjax.qwen3.params import HF_TABLE, hf_name, hf_shape, param_shapes

from .safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsWriter,
    check_finite,
    copy_side_files,
    dtype_name,
    resolve_dtype,
    staged_output_dir,
)
from .timjax_format import (
    CONFIG_FILE,
    TimjaxCheckpoint,
    flatten_params,
    global_paths,
    layer_paths,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' historical default (5GB)
_ROW = {m.path: m for m in HF_TABLE}


class _Source:
    """Hands out one layer (or one global param) at a time, in timjax orientation."""

    def __init__(
        self,
        cfg: Qwen3Config,
        get_global: Callable[[str], np.ndarray],
        get_layer: Callable[[int], dict[str, np.ndarray]],
        dtype: np.dtype,
        side_dir: Path | None,
    ):
        self.cfg, self.get_global, self._get_layer, self.dtype, self.side_dir = (
            cfg,
            get_global,
            get_layer,
            dtype,
            side_dir,
        )
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def get_layer(self, i: int) -> dict[str, np.ndarray]:
        if self._cached is None or self._cached[0] != i:
            self._cached = None  # drop the previous layer before loading the next
            self._cached = (i, self._get_layer(i))
        return self._cached[1]


def _dir_source(path: Path) -> _Source:
    ckpt = TimjaxCheckpoint(path)
    return _Source(ckpt.cfg, ckpt.read_global, ckpt.read_layer, ckpt.dtype, ckpt.path)


def _memory_source(cfg: Qwen3Config, params: Any, side_dir: Path | None) -> _Source:
    if not isinstance(cfg, Qwen3Config):
        raise TypeError(f"expected (Qwen3Config, params), got ({type(cfg).__name__}, ...)")
    flat = flatten_params(params)
    shapes = param_shapes(cfg)
    for p, s in shapes.items():
        if p not in flat:
            raise TensorMissingError(f"params: missing parameter {p} (expected shape {s})")
        if tuple(flat[p].shape) != s:
            raise TensorShapeError(f"params: parameter {p} has shape {tuple(flat[p].shape)}, expected {s}")
    for p in flat:
        if p not in shapes:
            raise UnexpectedTensorError(f"params: unexpected parameter {p}")
    lp = layer_paths(cfg)
    dt = np.dtype(np.asarray(flat["embed"][:1]).dtype)
    try:
        dt = resolve_dtype(dt)
    except TimjaxError:
        dt = resolve_dtype("float32")
    return _Source(
        cfg,
        lambda p: np.asarray(flat[p]),
        lambda i: {p[len("layers.") :]: np.asarray(flat[p][i]) for p in lp},  # one layer to host at a time
        dt,
        side_dir,
    )


def _plan_shards(specs: list[tuple[str, int]], max_shard_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, n) in enumerate(specs):
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def export_timjax_to_hf(
    src: str | Path | tuple[Qwen3Config, Any],
    out_dir: str | Path,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write a Hugging Face Qwen3 checkpoint (safetensors + config.json + tokenizer files) to ``out_dir``.

    ``src`` is a converted timjax dir or an in-memory ``(cfg, params)`` (params nested as :func:`read_params`
    returns them, or flat with dotted paths; numpy or jax arrays). ``dtype`` defaults to the stored dtype
    (the dtype of ``embed`` for in-memory params); norms are written in it too, like HF checkpoints.
    Files larger than ``max_shard_bytes`` are split into ``model-0000k-of-0000n.safetensors`` with an index.
    Tokenizer files come from ``tokenizer_dir`` or else the timjax dir. Host memory: about one layer.
    """
    from tqdm.auto import tqdm

    check_export(src, out_dir, dtype, max_shard_bytes, overwrite, tokenizer_dir, progress)
    if isinstance(src, (str, Path)):
        source = _dir_source(Path(src))
        protect = [Path(src)]
        if tokenizer_dir is not None:
            source.side_dir = Path(tokenizer_dir)
    else:
        try:
            cfg, params = src
        except (TypeError, ValueError):
            raise TypeError("src must be a timjax checkpoint dir or a (Qwen3Config, params) tuple") from None
        source = _memory_source(cfg, params, Path(tokenizer_dir) if tokenizer_dir is not None else None)
        protect = []
    cfg = source.cfg
    out_dt = source.dtype if dtype is None else resolve_dtype(dtype)
    if max_shard_bytes <= 0:
        raise TimjaxError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    # (hf name, timjax path, layer) in file order: embed, layer by layer, final norm, lm_head.
    entries: list[tuple[str, str, int | None]] = [(hf_name("embed"), "embed", None)]
    for i in range(cfg.num_hidden_layers):
        entries += [(hf_name(p, i), p, i) for p in layer_paths(cfg)]
    entries += [(hf_name(p), p, None) for p in global_paths(cfg) if p != "embed"]
    hf_shapes = {p: hf_shape(p, cfg) for p in param_shapes(cfg)}
    nbytes = [int(np.prod(hf_shapes[p])) * out_dt.itemsize for _, p, _ in entries]
    shards = _plan_shards([(n, b) for (n, _, _), b in zip(entries, nbytes)], max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )

    with (
        staged_output_dir(out_dir, overwrite, protect=protect) as tmp,
        tqdm(total=len(entries), unit="tensor", desc="export", disable=not progress, leave=False) as bar,
    ):
        weight_map = {}
        for fname, idx in zip(names, shards):
            specs = [(entries[k][0], out_dt, hf_shapes[entries[k][1]]) for k in idx]
            w = SafetensorsWriter(tmp / fname, specs, metadata={"format": "pt"}, shown=Path(out_dir) / fname)
            try:
                for k in idx:
                    name, p, layer = entries[k]
                    x = source.get_global(p) if layer is None else source.get_layer(layer)[p[len("layers.") :]]
                    with np.errstate(over="ignore", invalid="ignore"):  # check_finite names the tensor instead
                        y = np.asarray(_ROW[p].to_hf(x, cfg)).astype(out_dt, order="C", copy=False)
                    check_finite(str(src) if isinstance(src, (str, Path)) else "params", p, y, source=np.asarray(x))
                    w.write(name, y)
                    weight_map[name] = fname
                    bar.update(1)
                    del x, y
            except BaseException:
                w.abort()
                raise
            w.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": int(sum(nbytes))}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = cfg.model_copy(update={"torch_dtype": dtype_name(out_dt)}).to_hf_dict()
        hf_cfg["dtype"] = dtype_name(out_dt)  # transformers >= 5 spelling
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if source.side_dir is not None:
            copy_side_files(source.side_dir, tmp)
    return Path(out_dir)

"""Hugging Face Qwen3 safetensors -> timjax parameters (on disk or in memory)."""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from timjax.base.config import Qwen3Config
from timjax.base.errors import (
    MissingFileError,
    TensorMissingError,
    TensorShapeError,
    TimjaxError,
    UnexpectedTensorError,
)
from timjax.base.validation import check_convert, path_like
from timjax.base.validation import dtype as dtype_check
from timjax.qwen3.params import (
    Mapping,
    expected_hf_names,
    hf_shape,
    match_hf_name,
    param_shapes,
)

from .safetensors_io import (
    _ST_TO_NP,
    HFWeights,
    TensorInfo,
    check_dtype,
    check_finite,
    check_readable,
    copy_side_files,
    dtype_name,
    release_memory,
    resolve_dtype,
    staged_output_dir,
)
from .timjax_format import (
    CONFIG_FILE,
    LAYER_DIR,
    META_FILE,
    PARAMS_DIR,
    TimjaxCheckpoint,
    layer_paths,
    make_meta,
    nest_params,
    orbax_checkpointer,
    param_dtype,
    save_item,
)

# Non-parameter buffers some exporters write; derivable, so skipped rather than refused.
_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"


def load_hf_config(hf_dir: Path) -> Qwen3Config:
    if not hf_dir.is_dir():
        raise MissingFileError(
            f"{hf_dir}: "
            + ("not a directory (expected a checkpoint directory)" if hf_dir.exists() else "no such directory")
        )
    check_readable(hf_dir)
    check_readable(hf_dir / CONFIG_FILE)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise MissingFileError(f"{hf_dir}: {CONFIG_FILE} not found (not a Hugging Face checkpoint directory?)")
    return Qwen3Config.from_file(hf_dir / CONFIG_FILE)


class HFPlan:
    """A scanned and validated HF checkpoint: which tensor feeds which parameter (names, shapes, dtypes checked)."""

    def __init__(self, weights: HFWeights, cfg: Qwen3Config):
        self.weights, self.cfg = weights, cfg
        L = cfg.num_hidden_layers
        expected = set(expected_hf_names(cfg))
        shapes = {p: hf_shape(p, cfg) for p in param_shapes(cfg)}
        self.rows: dict[str, tuple[Mapping, int | None]] = {}
        self.tied_lm_head: TensorInfo | None = None  # an lm_head.weight in a tied checkpoint, checked equal to embed
        for name, info in weights.tensors.items():
            hit = match_hf_name(name)
            if name in expected:
                m, layer = hit
                if info.shape != shapes[m.path]:
                    raise TensorShapeError(
                        f"{info.file}: tensor {name} has shape {info.shape}, expected {shapes[m.path]}"
                    )
                check_dtype(info)
                self.rows[name] = (m, layer)
            elif name == _LM_HEAD and cfg.tie_word_embeddings:
                embed_shape = shapes["embed"]
                if info.shape != embed_shape:
                    raise TensorShapeError(
                        f"{info.file}: tensor {name} has shape {info.shape}, expected {embed_shape} "
                        f"(tie_word_embeddings=true: it must equal {_EMBED})"
                    )
                check_dtype(info)
                self.tied_lm_head = info
            elif _IGNORED.fullmatch(name):
                continue
            elif hit is not None and hit[1] is not None and hit[1] >= L:
                raise UnexpectedTensorError(
                    f"{info.file}: unexpected tensor {name}: layer {hit[1]} but {CONFIG_FILE} has num_hidden_layers={L}"
                )
            else:
                raise UnexpectedTensorError(
                    f"{info.file}: unexpected tensor {name} (not a Qwen3ForCausalLM parameter for this {CONFIG_FILE})"
                )
        missing = [n for n in expected_hf_names(cfg) if n not in weights.tensors]
        if missing:
            m, _ = match_hf_name(missing[0])
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            hint = ""
            if missing[0] == _LM_HEAD:
                hint = f"; {CONFIG_FILE} has tie_word_embeddings=false"
            raise TensorMissingError(
                f"{weights.source}: missing tensor {missing[0]} (expected shape {shapes[m.path]}){more}{hint}"
            )

    @property
    def num_tensors(self) -> int:
        return len(self.rows) + (self.tied_lm_head is not None)

    def source_dtypes(self) -> list[str]:
        return sorted({self.weights.tensors[n].dtype for n in self.rows})

    def own_dtype(self) -> np.dtype:
        """The dtype the checkpoint's weights are stored in: the default whenever no dtype is asked for, so a
        float32 checkpoint computes in float32 (and matches transformers) unless the user asks otherwise.
        The tensors decide (a config's ``torch_dtype`` can be stale); if they mix float dtypes, the config's
        dtype when it is one of them, else the widest."""
        stored = [_ST_TO_NP[d] for d in self.source_dtypes() if d in _ST_TO_NP]
        if len(set(stored)) == 1:
            return stored[0]
        try:
            declared = resolve_dtype(self.cfg.torch_dtype)
        except TimjaxError:
            declared = None
        if declared in stored or not stored:
            return declared if declared is not None else np.dtype(np.float32)
        return max(stored, key=lambda d: d.itemsize)

    def stream(
        self, dtype: np.dtype, progress: bool = False, desc: str = "convert"
    ) -> Iterator[tuple[int | None, dict[str, np.ndarray]]]:
        """Yield ``(None, {path: array})`` per global param and ``(i, {name: array})`` per complete layer.

        Arrays are in timjax orientation and dtype (norms float32). Files are read in order; within a file,
        tensors are read layer by layer, each group with its own ``safe_open``; a layer split across files is
        buffered until its last tensor arrives. Host memory: about one layer plus layers split across files.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        n_layer = len(layer_paths(cfg))
        pending: dict[int, dict[str, np.ndarray]] = {}
        tie_ref: dict[str, np.ndarray] = {}  # raw embed / lm_head kept only while checking a tied lm_head
        by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
        for name in self.rows:
            info = self.weights.tensors[name]
            by_file[info.file].append(info)
        if self.tied_lm_head is not None:
            by_file[self.tied_lm_head.file].append(self.tied_lm_head)

        def group_key(info: TensorInfo):
            row = self.rows.get(info.name)
            layer = row[1] if row else None
            return (
                (0, layer, "") if layer is not None else (1, -1, info.name)
            )  # layers in order, then globals one by one

        with tqdm(total=self.num_tensors, unit="tensor", desc=desc, disable=not progress, leave=False) as bar:
            for file in self.weights.files:
                groups: dict[tuple, list[TensorInfo]] = defaultdict(list)
                for info in by_file.get(file, []):
                    groups[group_key(info)].append(info)
                for key in sorted(groups, key=lambda k: (k[0], k[1], k[2])):
                    bar.set_postfix_str(file.name, refresh=False)
                    done: list[tuple[int | None, dict[str, np.ndarray]]] = []
                    for info, x in self.weights.read(groups[key]):
                        bar.update(1)
                        if self.tied_lm_head is not None and info.name in (_LM_HEAD, _EMBED):
                            tie_ref[info.name] = x
                            if len(tie_ref) == 2:
                                self._check_tie(tie_ref.pop(_EMBED), tie_ref.pop(_LM_HEAD))
                            if info.name == _LM_HEAD:
                                continue
                        m, layer = self.rows[info.name]
                        # copy only when needed (transposed view or another dtype): embed is passed through as read
                        with np.errstate(over="ignore", invalid="ignore"):  # check_finite names the tensor instead
                            y = np.asarray(m.to_timjax(x, cfg)).astype(
                                param_dtype(m.path, dtype), order="C", copy=False
                            )
                        check_finite(str(info.file), info.name, y, source=x)
                        del x
                        if layer is None:
                            done.append((None, {m.path: y}))
                        else:
                            buf = pending.setdefault(layer, {})
                            buf[m.path[len("layers.") :]] = y
                            if len(buf) == n_layer:
                                done.append((layer, pending.pop(layer)))
                        del y
                    for item in done:  # the file's memory map is closed by now
                        yield item
                    del done
        assert not pending and not tie_ref, "every tensor was planned"

    def _check_tie(self, embed: np.ndarray, lm_head: np.ndarray) -> None:
        if embed.dtype == lm_head.dtype:
            u = np.dtype(f"u{embed.dtype.itemsize}")
            same = np.array_equal(embed.view(u), lm_head.view(u))
        else:
            same = np.array_equal(embed.astype(np.float32), lm_head.astype(np.float32))
        if not same:
            raise UnexpectedTensorError(
                f"{self.tied_lm_head.file}: unexpected tensor {_LM_HEAD}: {CONFIG_FILE} has tie_word_embeddings=true "
                f"but it differs from {_EMBED}"
            )


def scan_hf_checkpoint(hf_dir: str | Path) -> HFPlan:
    """Read config.json and every safetensors header and validate them (no tensor data is read)."""
    hf_dir = Path(hf_dir)
    cfg = load_hf_config(hf_dir)
    return HFPlan(HFWeights.scan(hf_dir), cfg)


def convert_hf_to_timjax(
    hf_dir: str | Path, out_dir: str | Path, *, dtype: Any = None, overwrite: bool = False, progress: bool = True
) -> Path:
    """Convert a Hugging Face Qwen3 safetensors checkpoint directory into a timjax checkpoint at ``out_dir``.
    ``dtype`` (bfloat16/float16/float32) defaults to the dtype the source tensors are stored in.

    Streams shard by shard and writes layer by layer, so host memory stays near one layer (plus any layer
    split across two shards). Writes into a temp dir beside ``out_dir`` and renames it at the end: on failure
    nothing is left behind. Raises a :class:`timjax.base.errors.TimjaxError` subclass for any problem with the input.
    """
    check_convert(hf_dir, out_dir, dtype, overwrite, progress)
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.exists() and not overwrite:  # fail before scanning
        from timjax.base.errors import OutputExistsError

        raise OutputExistsError(
            f"{out.absolute()}: output directory exists (pass --overwrite / overwrite=True to replace it)"
        )
    plan = scan_hf_checkpoint(hf_dir)
    cfg = plan.cfg
    target = plan.own_dtype() if dtype is None else resolve_dtype(dtype)
    ckptr = orbax_checkpointer()
    with staged_output_dir(out, overwrite, protect=[hf_dir]) as tmp:
        params_dir = tmp / PARAMS_DIR
        params_dir.mkdir()
        seen_layers = 0
        for layer, tree in plan.stream(target, progress=progress, desc=f"convert {hf_dir.name}"):
            if layer is None:
                (path,) = tree
                save_item(ckptr, params_dir / path, tree, shown=out / PARAMS_DIR / path)
            else:
                rel = LAYER_DIR.format(layer)
                save_item(ckptr, params_dir / rel, tree, shown=out / PARAMS_DIR / rel)
                seen_layers += 1
            del tree
            release_memory()
        assert seen_layers == cfg.num_hidden_layers
        shutil.copy2(hf_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        side = copy_side_files(hf_dir, tmp)
        source = {
            "format": "huggingface-safetensors",
            "files": [f.name for f in plan.weights.files],
            "dtypes": plan.source_dtypes(),
            "tied_lm_head_dropped": plan.tied_lm_head is not None,
        }
        (tmp / META_FILE).write_text(json.dumps(make_meta(cfg, target, source, side), indent=2) + "\n")
    return out


def read_params(path: str | Path, dtype: Any = None) -> tuple[Qwen3Config, dict[str, Any]]:
    """Load all parameters, stacked ``[L, ...]`` and nested, as host numpy arrays.

    ``path`` is a converted timjax dir (has ``timjax.json``) or a Hugging Face checkpoint dir (converted in
    memory). ``dtype`` (bfloat16/float16/float32) defaults to the stored dtype for a timjax dir and to the
    dtype its tensors are stored in for an HF dir (``HFPlan.own_dtype``). Norm weights are always float32.
    Returns ``(cfg, {"embed", "final_norm", "lm_head" (untied only), "layers": {"q_proj": [L, ...], ...}})``.
    """
    path_like("path", path)
    dtype_check("dtype", dtype, aliases=True, none=True)
    path = Path(path)
    check_readable(path)
    if (path / META_FILE).is_file():
        ckpt = TimjaxCheckpoint(path)
        return ckpt.cfg, ckpt.read_all(dtype)
    if not path.is_dir():
        raise MissingFileError(
            f"{path}: "
            + ("not a directory (expected a checkpoint directory)" if path.exists() else "no such directory")
        )
    if not (path / CONFIG_FILE).is_file():
        raise MissingFileError(
            f"{path}: neither {META_FILE} nor {CONFIG_FILE} found (not a timjax or Hugging Face checkpoint)"
        )
    plan = scan_hf_checkpoint(path)
    cfg = plan.cfg
    target = plan.own_dtype() if dtype is None else resolve_dtype(dtype)
    flat = {p: None for p in param_shapes(cfg)}
    stacked = {
        p: np.empty(s, dtype=param_dtype(p, target)) for p, s in param_shapes(cfg).items() if p.startswith("layers.")
    }
    for layer, tree in plan.stream(target):
        if layer is None:
            flat.update(tree)
        else:
            for k, x in tree.items():
                stacked[f"layers.{k}"][layer] = x
    flat.update(stacked)
    return cfg, nest_params(flat)


def checkpoint_dtype(path: str | Path) -> str:
    """The name of the dtype a timjax or Hugging Face checkpoint directory stores its weights in: what
    ``timjax.load`` and the CLI compute in when no dtype is given."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return TimjaxCheckpoint(path).meta["dtype"]
    return dtype_name(scan_hf_checkpoint(path).own_dtype())


__all__ = ["checkpoint_dtype", "convert_hf_to_timjax", "read_params", "scan_hf_checkpoint", "HFPlan", "load_hf_config"]

"""The on-disk timjax checkpoint format (see the package docstring) and helpers shared by the converters."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from timjax.base.config import Qwen3Config
from timjax.base.errors import (
    CorruptFileError,
    MissingFileError,
    OutputWriteError,
    TensorMissingError,
    TensorShapeError,
    UnexpectedTensorError,
)
from timjax.qwen3.params import FLOAT32_PARAMS, param_shapes

from .safetensors_io import dtype_name, resolve_dtype

FORMAT_NAME = "timjax"
FORMAT_VERSION = 1
META_FILE = "timjax.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
LAYER_DIR = "layer_{:05d}"


def layer_paths(cfg: Qwen3Config) -> list[str]:
    return [p for p in param_shapes(cfg) if p.startswith("layers.")]


def global_paths(cfg: Qwen3Config) -> list[str]:
    return [p for p in param_shapes(cfg) if not p.startswith("layers.")]


def param_dtype(path: str, dtype: np.dtype) -> np.dtype:
    """The dtype a parameter is kept in: float32 for norms, ``dtype`` otherwise."""
    return np.dtype(np.float32) if path in FLOAT32_PARAMS else np.dtype(dtype)


def nest_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"layers.q_proj": a, "embed": b}`` -> ``{"layers": {"q_proj": a}, "embed": b}``."""
    out: dict[str, Any] = {}
    for path, x in flat.items():
        if path.startswith("layers."):
            out.setdefault("layers", {})[path[len("layers.") :]] = x
        else:
            out[path] = x
    return out


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`nest_params`; also accepts an already flat dict (dotted keys)."""
    flat: dict[str, Any] = {}
    for k, v in params.items():
        if k == "layers" and isinstance(v, Mapping):
            for kk, vv in v.items():
                flat[f"layers.{kk}"] = vv
        else:
            flat[k] = v
    return flat


def empty_params(cfg: Qwen3Config, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Uninitialised host arrays for every parameter (flat paths), norms float32."""
    return {p: np.empty(s, dtype=param_dtype(p, dtype)) for p, s in param_shapes(cfg).items()}


def make_meta(cfg: Qwen3Config, dtype: np.dtype, source: dict[str, Any], side_files: list[str]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtype),
        "num_hidden_layers": cfg.num_hidden_layers,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "params": {
            p: {"shape": list(s), "dtype": dtype_name(param_dtype(p, dtype))} for p, s in param_shapes(cfg).items()
        },
        "checkpoints": {
            **{p: f"{PARAMS_DIR}/{p}" for p in global_paths(cfg)},
            "layers": f"{PARAMS_DIR}/{LAYER_DIR}",
        },
        "source": source,
        "side_files": side_files,
    }


def _restore_args(shardings: Mapping[str, Any] | None, dtype) -> dict[str, Any] | None:
    if shardings is None:
        return None
    import orbax.checkpoint as ocp  # lazy: pulls in jax

    def one(key, sharding):
        dt = None if dtype is None else param_dtype(key if key in FLOAT32_PARAMS else f"layers.{key}", dtype)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dt)
        return ocp.ArrayRestoreArgs(sharding=sharding, dtype=dt)

    return {k: one(k, s) for k, s in shardings.items()}


@contextmanager
def deferred_interrupt():
    """Hold Ctrl-C until the block ends, then raise it.

    An orbax save or restore runs an asyncio loop whose tensorstore callbacks arrive on other threads; a
    KeyboardInterrupt in the middle closes the loop under them, and each late callback prints a
    "RuntimeError: Event loop is closed" traceback, while an unfinished write can land in the temp
    directory after it was removed. Letting the one item finish (a layer: well under a second) gives a
    clean stop: one "interrupted" line and no litter."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)
    if old in (signal.SIG_IGN, None):
        yield
        return
    caught: list = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            if callable(old) and old is not signal.default_int_handler:
                old(*caught[0])
            else:
                raise KeyboardInterrupt


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not ("/orbax/" in record.pathname.replace("\\", "/") and record.levelno >= logging.ERROR)


@contextmanager
def quiet_orbax():
    """Orbax logs every failure of its writer threads with a full traceback (absl logger, ~100 lines for a
    full disk) and then raises it in the caller; we report the raised error as one line, so the log
    records are dropped while our call runs."""
    _install_unraisable_filter()
    _install_late_future_filter()
    logger, flt = logging.getLogger("absl"), _DropOrbaxErrors()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _late_loop_callback(unraisable) -> bool:
    """A tensorstore completion that arrived after orbax's event loop closed (after a failed or interrupted
    save): ``call_soon_threadsafe`` on a closed loop. Harmless, and the one error that matters was raised."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        return False
    names = [f.name for f in traceback.extract_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in names


class _DropOrbaxLateFutures(logging.Filter):
    """asyncio's "Future (or Task) exception was never retrieved" for an orbax write that failed (a full
    disk): the garbage collector reports it, possibly after our call returned, for an error we already
    raised. Which of the two comes depends on which object the collector reaches first."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        late = text.startswith(("Future exception was never retrieved", "Task exception was never retrieved"))
        return not (late and "orbax-checkpoint-tmp" in text)


def _install_late_future_filter() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxLateFutures) for f in logger.filters):
        logger.addFilter(_DropOrbaxLateFutures())


def _install_unraisable_filter() -> None:
    """Drop (only) those late-callback reports; they come on tensorstore's threads, possibly after our call
    returned, so the filter stays installed; anything else goes to the previous hook."""
    if getattr(sys.unraisablehook, "_timjax_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _late_loop_callback(unraisable):
            previous(unraisable)

    hook._timjax_filter = True
    sys.unraisablehook = hook


def os_reason(e: BaseException) -> str:
    """The OS reason inside an orbax/tensorstore error (``... File too large [os_error_code='27']``)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} [errno {e.errno}]"
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
        return f"{os.strerror(int(m.group(1)))} [errno {m.group(1)}]"
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return first if len(first) <= 200 else first[:197] + "..."


def save_item(ckptr, directory: Path, tree: dict[str, np.ndarray], *, shown: Path | None = None) -> None:
    """Save one orbax item; ``shown`` is the path to name in errors (the final one, not the temp dir)."""
    try:
        with quiet_orbax(), deferred_interrupt():
            ckptr.save(Path(directory).absolute(), tree)
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports I/O failures as ValueError
        raise OutputWriteError(
            f"{shown or directory}: cannot write ({os_reason(e)}); the output directory is left as it was"
        ) from None


def orbax_checkpointer():
    import orbax.checkpoint as ocp  # lazy: pulls in jax

    return ocp.PyTreeCheckpointer()


class TimjaxCheckpoint:
    """A converted checkpoint directory; reads one orbax item (a layer or a global param) at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise MissingFileError(f"{self.path}: not a timjax checkpoint ({META_FILE} not found)")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{meta_file}: not valid JSON ({e})") from None
        if self.meta.get("format") != FORMAT_NAME or not isinstance(self.meta.get("format_version"), int):
            raise CorruptFileError(f"{meta_file}: not a timjax checkpoint description")
        if self.meta["format_version"] > FORMAT_VERSION:
            raise CorruptFileError(
                f"{meta_file}: format_version {self.meta['format_version']} is newer than this "
                f"timjax reads ({FORMAT_VERSION}); upgrade timjax"
            )
        if not (self.path / CONFIG_FILE).is_file():
            raise MissingFileError(f"{self.path}: {CONFIG_FILE} not found")
        self.cfg = Qwen3Config.from_file(self.path / CONFIG_FILE)
        self.dtype = resolve_dtype(self.meta["dtype"])
        shapes = param_shapes(self.cfg)
        stored = {p: tuple(v["shape"]) for p, v in self.meta.get("params", {}).items()}
        for p, s in shapes.items():
            if p not in stored:
                raise TensorMissingError(f"{meta_file}: missing parameter {p} (expected shape {s})")
            if stored[p] != s:
                raise TensorShapeError(
                    f"{meta_file}: parameter {p} has shape {stored[p]}, expected {s} from {CONFIG_FILE}"
                )
        for p in stored:
            if p not in shapes:
                raise UnexpectedTensorError(f"{meta_file}: unexpected parameter {p}")
        self._ckptr = None

    def _restore(self, rel: str, shardings: Mapping[str, Any] | None = None, dtype=None) -> dict[str, Any]:
        """One orbax item as host numpy, or, with ``shardings`` ({key: NamedSharding or None = host}), each
        key restored straight into its sharding (tensorstore reads only each device's slice), cast to
        ``dtype`` (norms to float32)."""
        d = self.path / rel
        if not d.is_dir():
            raise MissingFileError(f"{d}: checkpoint item missing")
        if self._ckptr is None:
            self._ckptr = orbax_checkpointer()
        try:
            with quiet_orbax(), deferred_interrupt():
                tree = self._ckptr.restore(d.absolute(), restore_args=_restore_args(shardings, dtype))
        except Exception as e:  # orbax/tensorstore raise assorted types for damaged data
            raise CorruptFileError(
                f"{d}: cannot restore orbax checkpoint ({type(e).__name__}: {e})".splitlines()[0]
            ) from None
        return {
            k: v if shardings is not None and shardings.get(k) is not None else np.asarray(v) for k, v in tree.items()
        }

    def _check(self, where: str, path: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if tuple(x.shape) != tuple(shape):
            raise TensorShapeError(
                f"{self.path / where}: parameter {path} has shape {tuple(x.shape)}, expected {tuple(shape)}"
            )
        return x

    def read_global(self, path: str, *, sharding=None, dtype=None) -> Any:
        rel = self.meta["checkpoints"][path]
        tree = self._restore(rel, None if sharding is None else {path: sharding}, dtype)
        if path not in tree:
            raise TensorMissingError(f"{self.path / rel}: missing parameter {path}")
        return self._check(rel, path, tree[path], param_shapes(self.cfg)[path])

    def read_layer(self, i: int, *, shardings: Mapping[str, Any] | None = None, dtype=None) -> dict[str, Any]:
        """One layer's params, keyed by the path without ``layers.`` (``"q_proj"``...), unstacked.
        ``shardings`` (by key) restores them as sharded device arrays (``timjax.runtime.sharding.load_params``)."""
        rel = self.meta["checkpoints"]["layers"].format(i)
        tree = self._restore(rel, shardings, dtype)
        shapes = param_shapes(self.cfg)
        out = {}
        for p in layer_paths(self.cfg):
            k = p[len("layers.") :]
            if k not in tree:
                raise TensorMissingError(f"{self.path / rel}: missing parameter {p}")
            out[k] = self._check(rel, p, tree[k], shapes[p][1:])
        for k in tree:
            if f"layers.{k}" not in shapes:
                raise UnexpectedTensorError(f"{self.path / rel}: unexpected parameter {k}")
        return out

    def read_all(self, dtype=None) -> dict[str, Any]:
        """All params, stacked and nested, in ``dtype`` (default: as stored), norms float32."""
        target = self.dtype if dtype is None else resolve_dtype(dtype)
        flat = {}
        for p in global_paths(self.cfg):
            flat[p] = self.read_global(p).astype(param_dtype(p, target), copy=False)
        stacked = {p: np.empty(param_shapes(self.cfg)[p], dtype=param_dtype(p, target)) for p in layer_paths(self.cfg)}
        for i in range(self.cfg.num_hidden_layers):
            for k, x in self.read_layer(i).items():
                stacked[f"layers.{k}"][i] = x  # casts on assignment
        flat.update(stacked)
        return nest_params({p: flat[p] for p in param_shapes(self.cfg)})

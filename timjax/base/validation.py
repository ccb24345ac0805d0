"""One validation layer for every parameter of the public API and the CLI.

Each public entry point calls one ``check_*`` function first, before any device work; a bad value raises
:class:`timjax.base.errors.ParameterError` (a ``TimjaxError`` and a ``ValueError``) whose message is one line::

    invalid <parameter>=<value>: <what is allowed>

``<parameter>`` is the keyword (``max_batch``) or, from the CLI, the flag (``--max-batch``). The specs are
tables (:data:`GENERATE`, :data:`CLI`), so the README's "Bad input" table and the property tests read the
same source. This module imports nothing heavy (no JAX): the CLI validates before it loads a model.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from timjax.base.errors import ParameterError

U32_MAX = 2**32 - 1  # seeds are uint32 on the device
I32_MAX = 2**31 - 1  # counts, ids and sizes are int32 on the device
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
}
IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
REPOSITIONS = ("reencode", "shift")


def _show(value: Any) -> str:
    text = " ".join(repr(value).split())  # one line, even for an array
    return text if len(text) <= 60 else text[:57] + "..."


def fail(name: str, value: Any, why: str) -> ParameterError:
    return ParameterError(f"invalid {name}={_show(value)}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _range_text(lo, hi, lo_open=False) -> str:
    if hi is None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"in ({lo}, {hi}]" if lo_open else f"in [{lo}, {hi}]"


# ------------------------------------------------------------------------------------------- checkers


@dataclass(frozen=True)
class Int:
    lo: int | None = 0
    hi: int | None = I32_MAX
    none: bool = False  # None allowed

    def __call__(self, name: str, v: Any) -> None:
        if v is None and self.none:
            return
        if not _is_int(v):
            raise fail(
                name, v, f"expected an integer {_range_text(self.lo, self.hi)}" + (" or None" if self.none else "")
            )
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise fail(name, v, f"must be an integer {_range_text(self.lo, self.hi)}")


@dataclass(frozen=True)
class Float:
    lo: float = 0.0
    hi: float | None = None
    lo_open: bool = False
    none: bool = False

    def __call__(self, name: str, v: Any) -> None:
        if v is None and self.none:
            return
        want = f"a finite number {_range_text(self.lo, self.hi, self.lo_open)}"
        if not _is_real(v) or not math.isfinite(float(v)):
            raise fail(name, v, f"expected {want}")
        x = float(v)
        if x < self.lo or (self.lo_open and x == self.lo) or (self.hi is not None and x > self.hi):
            raise fail(name, v, f"must be {want}")


@dataclass(frozen=True)
class Choice:
    choices: tuple[str, ...]
    aliases: Mapping[str, str] | None = None  # other spellings: suggested in errors, accepted if accept_aliases
    accept_aliases: bool = True

    def _normal(self, v: str) -> str:
        v = v.lower()
        return v[len("torch.") :] if v.startswith("torch.") else v

    def __call__(self, name: str, v: Any) -> None:
        if isinstance(v, str):
            if v in self.choices:
                return
            if self.aliases and self.accept_aliases:
                n = self._normal(v)
                if n in self.choices or n in self.aliases:
                    return
        hint = ""
        if isinstance(v, str):
            aliases = self.aliases or {}
            n = self._normal(v)
            close = (
                [aliases[n]]
                if n in aliases
                else ([n] if n in self.choices else difflib.get_close_matches(n, list(self.choices), n=1))
            )
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        raise fail(name, v, f"choose one of {', '.join(self.choices)}{hint}")


def check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise fail(name, v, "expected True or False")


def check_overlap(name: str, v: Any) -> None:
    if not (isinstance(v, bool) or v == "auto"):
        raise fail(name, v, "expected True, False or 'auto'")


def optional_str(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, str):
        raise fail(name, v, "expected a string or None")


def optional_callable(name: str, v: Any) -> None:
    if v is not None and not callable(v):
        raise fail(name, v, "expected a function or None")


def path_like(name: str, v: Any, *, none: bool = False) -> None:
    if v is None and none:
        return
    if not isinstance(v, (str, os.PathLike)) or str(v) == "":
        raise fail(name, v, "expected a directory path (str or pathlib.Path)")


def stop_strings(name: str, v: Any) -> None:
    if isinstance(v, str):
        raise fail(name, v, "expected a list of strings (a bare string would be split into characters)")
    if not isinstance(v, Sequence):
        raise fail(name, v, "expected a list of strings")
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s:
            raise fail(f"{name}[{i}]", s, "expected a non-empty string")


def dtype(name: str, v: Any, *, aliases: bool = False, none: bool = False) -> None:
    """A weight dtype: bfloat16, float16 or float32 (a name, or a numpy / jax dtype)."""
    if v is None and none:
        return
    if isinstance(v, str):
        return Choice(DTYPE_NAMES, DTYPE_ALIASES, accept_aliases=aliases)(name, v)
    import numpy as np

    try:
        ok = np.dtype(v).name in DTYPE_NAMES
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise fail(name, v, f"choose one of {', '.join(DTYPE_NAMES)}")


# ------------------------------------------------------------------------------------------ generate

GENERATE: dict[str, Callable[[str, Any], None]] = {
    "max_new_tokens": Int(1),
    "temperature": Float(0.0),
    "top_p": Float(0.0, 1.0, lo_open=True),
    "top_k": Int(0),
    "seed": Int(0, U32_MAX),
    "stop": stop_strings,
    "max_batch": Int(1),
    "page_size": Int(1, 64),
    "max_seq_len": Int(1, none=True),
    "kv_tokens": Int(1, none=True),
    "kv_memory_fraction": Float(0.0, 1.0, lo_open=True, none=True),
    "impl": Choice(IMPLS),
    "chat": check_bool,
    "system": optional_str,
    "on_token": optional_callable,
    "progress": check_bool,
    "pruning_buffer": Int(0, none=True),
    "reposition": Choice(REPOSITIONS),
}


def _model_config(model: Any):
    from timjax.base.config import Qwen3Config

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Qwen3Config):
        raise fail("model", model, "expected a timjax model (timjax.load(...) or timjax.random_model(...))")
    return cfg


def _token_ids(name: str, ids: Any) -> None:
    for j, t in enumerate(ids):
        if not _is_int(t):
            raise fail(f"{name}[{j}]", t, "token ids must be integers")


def _prompts(model: Any, prompt: Any) -> int:
    """Check the prompt (or batch of prompts); returns the number of prompts."""
    import numpy as np

    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise fail(
                "prompt",
                prompt,
                f"an array prompt must be 1-D integer token ids, got shape {prompt.shape} "
                f"dtype {prompt.dtype}; pass a list of prompts for a batch",
            )
        return 1
    if isinstance(prompt, str):
        items, batch = [prompt], False
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise fail("prompt", prompt, "empty: pass a string, a list of token ids, or a non-empty list of them")
        batch = not _is_int(prompt[0])
        items = list(prompt) if batch else [prompt]
    else:
        raise fail("prompt", prompt, "expected a string, a list of token ids, or a list of those")
    for i, p in enumerate(items):
        where = f"prompt[{i}]" if batch else "prompt"
        if isinstance(p, str):
            if getattr(model, "tokenizer", None) is None:
                raise fail(
                    where,
                    p,
                    "a text prompt needs a tokenizer: load a checkpoint with tokenizer files, or pass token ids",
                )
        elif isinstance(p, np.ndarray) and p.ndim == 1 and np.issubdtype(p.dtype, np.integer):
            continue
        elif isinstance(p, (list, tuple)):
            _token_ids(where, p)
        else:
            raise fail(where, p, "expected a string or a list of token ids")
    return len(items)


def check_generate(args: Mapping[str, Any]) -> None:
    """Validate ``timjax.generate``'s arguments (``locals()`` at its top); names it does not know are left to
    their owners. Raises :class:`ParameterError` naming the first bad one."""
    model = args["model"]
    inner = getattr(model, "model", None)  # a timjax.Engine serves the call with its own model
    if inner is not None and not hasattr(model, "config"):
        model = inner
    cfg = _model_config(model)
    n = _prompts(model, args["prompt"])
    for name, check in GENERATE.items():
        if name in args:
            check(name, args[name])
    seed = args.get("seed", 0)
    if n > 1 and seed + n - 1 > U32_MAX:
        raise fail(
            "seed",
            seed,
            f"must be in [0, {U32_MAX - n + 1}] for a batch of {n} prompts (prompt i uses seed + i, a uint32)",
        )
    stop_ids = args.get("stop_ids")
    if stop_ids is not None:
        if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Sequence):
            raise fail("stop_ids", stop_ids, "expected a list of token ids or None")
        for i, t in enumerate(stop_ids):
            Int(0, cfg.vocab_size - 1)(f"stop_ids[{i}]", t)
    if args.get("stop") and getattr(model, "tokenizer", None) is None:
        raise fail("stop", args["stop"], "stop strings need a tokenizer; pass stop_ids instead")
    schema = args.get("schema")
    if schema is not None:
        if not callable(getattr(schema, "json_schema", None)):
            raise fail("schema", schema, "expected a timjax.tim.schema.TimSchema (tim_schema(...)) or None")
        if getattr(model, "tokenizer", None) is None:
            raise fail(
                "schema", schema, "TIM generation needs the model's tokenizer (load a checkpoint with tokenizer files)"
            )
    _engine_options(args.get("engine_options"))


# Engine keyword arguments that generate does not take itself (tests/test_engine_open.py checks this list
# against Engine's signature; the engine sits above this module, which must not import it)
ENGINE_OPTIONS = ("max_step_tokens", "check_cache", "max_waiting", "prefix_cache", "overlap")


def _engine_options(options: Any) -> None:
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise fail("engine_options", options, "expected a dict of Engine keyword arguments or None")
    if not options:
        return
    known = list(ENGINE_OPTIONS)
    for key, value in options.items():
        if key in GENERATE:  # generate passes these itself: a second value would be a TypeError in Engine()
            raise fail("engine_options", {key: value}, f"{key!r} is an argument of generate itself: pass {key}=...")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(
                "engine_options", {key: value}, f"unknown Engine option {key!r}{hint}; known: {', '.join(known)}"
            )
        if key in ("max_chunk", "max_step_tokens", "max_waiting"):
            Int(1)(f"engine_options[{key!r}]", value)
        elif key in ("check_cache", "prefix_cache"):
            check_bool(f"engine_options[{key!r}]", value)
        elif key == "overlap":
            check_overlap(f"engine_options[{key!r}]", value)


def check_engine(
    *,
    max_batch: Any,
    page_size: Any,
    max_seq_len: Any = None,
    kv_tokens: Any = None,
    kv_memory_fraction: Any = None,
    impl: Any = "auto",
    reposition: Any = "reencode",
) -> None:
    """The ``Engine`` constructor's arguments (for the engine to call first)."""
    for name, value in dict(
        max_batch=max_batch,
        page_size=page_size,
        max_seq_len=max_seq_len,
        kv_tokens=kv_tokens,
        kv_memory_fraction=kv_memory_fraction,
        impl=impl,
        reposition=reposition,
    ).items():
        GENERATE[name](name, value)


# ------------------------------------------------------------------------------- load, logits, convert


def check_random_model(cfg: Any, dtype_: Any, seed: Any) -> None:
    from timjax.base.config import Qwen3Config

    if not isinstance(cfg, Qwen3Config):
        raise fail("cfg", cfg, "expected a timjax.Qwen3Config (Qwen3Config.from_file(...) or Qwen3Config(...))")
    dtype("dtype", dtype_)
    Int(0, U32_MAX)("seed", seed)


def check_load(path: Any, dtype_: Any, tokenizer: Any) -> None:
    path_like("path", path)
    dtype("dtype", dtype_, none=True)
    check_bool("tokenizer", tokenizer)


def check_logits(model: Any, token_ids: Any) -> None:
    import numpy as np

    cfg = _model_config(model)
    if isinstance(token_ids, (str, bytes)):
        raise fail("token_ids", token_ids, "expected token ids (a list or array of integers), not text")
    try:
        ids = np.asarray(token_ids)
    except (ValueError, TypeError, OverflowError):
        raise fail(
            "token_ids",
            token_ids,
            "expected a [T] or [B, T] list or array of integers (rows of a batch must have the same length)",
        ) from None
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise fail("token_ids", token_ids, f"expected a non-empty [T] or [B, T] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise fail("token_ids", token_ids, f"token ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise fail(
            "token_ids", token_ids, f"token id out of range [0, {cfg.vocab_size}): min {ids.min()}, max {ids.max()}"
        )


def check_convert(hf_dir: Any, out_dir: Any, dtype_: Any, overwrite: Any, progress: Any) -> None:
    path_like("hf_dir", hf_dir)
    path_like("out_dir", out_dir)
    dtype("dtype", dtype_, aliases=True, none=True)
    check_bool("overwrite", overwrite)
    check_bool("progress", progress)


def check_export(
    src: Any, out_dir: Any, dtype_: Any, max_shard_bytes: Any, overwrite: Any, tokenizer_dir: Any, progress: Any
) -> None:
    if not isinstance(src, tuple):
        path_like("src", src)
    path_like("out_dir", out_dir)
    dtype("dtype", dtype_, aliases=True, none=True)
    Int(1, None)("max_shard_bytes", max_shard_bytes)
    check_bool("overwrite", overwrite)
    path_like("tokenizer_dir", tokenizer_dir, none=True)
    check_bool("progress", progress)


# ------------------------------------------------------------------------------------------------- CLI

CLI: dict[str, tuple[str, Callable[[str, Any], None]]] = {  # argparse dest -> (flag, check)
    "max_new_tokens": ("--max-new-tokens", GENERATE["max_new_tokens"]),
    "temperature": ("--temperature", GENERATE["temperature"]),
    "top_p": ("--top-p", GENERATE["top_p"]),
    "top_k": ("--top-k", GENERATE["top_k"]),
    "seed": ("--seed", GENERATE["seed"]),
    "max_batch": ("--max-batch", GENERATE["max_batch"]),
    "page_size": ("--page-size", GENERATE["page_size"]),
    "pruning_buffer": ("--pruning-buffer", Int(-1)),
    "max_depth": ("--max-depth", Int(1, none=True)),
    "max_subtasks": ("--max-subtasks", Int(1, none=True)),
    "max_shard_gb": ("--max-shard-gb", Float(0.0, lo_open=True, none=True)),
    "stop": ("--stop", lambda name, v: v is None or stop_strings(name, v)),
    "steps": ("--steps", Int(1)),
    "until_step": ("--until-step", Int(1)),
    "n_problems": ("--n-problems", Int(1)),
    # tool limits: checked here so the error names the flag, not the ToolLimits field it fills
    "tool_timeout": ("--tool-timeout", Float(0.0, lo_open=True)),
    "max_tool_calls": ("--max-tool-calls", Int(1)),
    "max_tool_result_tokens": ("--max-tool-result-tokens", Int(1)),
}


def check_cli(args: Any) -> None:
    """Validate parsed CLI arguments before any model is loaded; names are the flags."""
    values = vars(args)
    for dest, (flag, check) in CLI.items():
        if values.get(dest) is not None:  # None: not given (a default of None means "the library decides")
            check(flag, values[dest])
    prompts = values.get("prompt") or []
    seed = values.get("seed")
    if seed is not None and len(prompts) > 1 and seed + len(prompts) - 1 > U32_MAX:
        raise fail(
            "--seed",
            seed,
            f"must be in [0, {U32_MAX - len(prompts) + 1}] for {len(prompts)} prompts "
            f"(prompt i uses seed + i, a uint32)",
        )
    gb = values.get("max_shard_gb")
    if gb is not None and int(gb * 2**30) < 1:
        raise fail("--max-shard-gb", gb, "must be at least one byte (2**-30 GiB)")

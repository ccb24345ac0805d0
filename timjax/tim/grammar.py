"""Token-level grammar constraint (host side, numpy only).

``TokenGrammar`` is what the engine talks to, once per sequence:

* ``fill_mask(out)``: ``out`` is ``int32[ceil(V / 32)]`` for the MODEL's (padded) vocabulary ``V``;
  bit ``j`` of word ``i`` allows token ``32 * i + j``. Bits of ids the tokenizer does not have are 0.
* ``consume(tokens)``: advance over sampled or forced tokens; raises ``GrammarError`` naming the
  first token the grammar rejects (the grammar is then unusable: llguidance errors are sticky).
* ``rollback(n)``: undo the last ``n`` consumed tokens (used to replace a token by a different
  tokenization of the same bytes, see ``tree.Split``; llguidance matches bytes, so any tokenization of
  an allowed byte string is accepted).
* ``forced_tokens()``: tokens the grammar forces next (llguidance fast-forward); the engine may append
  them without sampling (they still go through ``consume``).
* ``is_stopped()``: nothing but EOS can follow (the JSON is complete); ``is_accepting()``: EOS is allowed.

``LLGuidanceGrammar`` implements it over ``llguidance.LLMatcher``; ``make_grammar(hf_tokenizer,
json_schema, model_vocab_size)`` builds one (the llguidance tokenizer is built once per HF tokenizer
and vocab size and cached: building it takes ~1-2 s for Qwen3).

Special tokens: llguidance treats every added token (all 26 of Qwen3's, ``<think>`` included) as
special and never allows one inside the JSON; EOS (``<|im_end|>`` for Qwen3, or what the caller
passes) is allowed only once the document is complete.
"""

from __future__ import annotations

import abc
import json
import threading
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = [
    "GrammarError",
    "LLGuidanceGrammar",
    "TokenGrammar",
    "llg_tokenizer",
    "make_grammar",
    "mask_words",
    "tokenizer_size",
]


class GrammarError(RuntimeError):
    """A token was rejected by the grammar (or the grammar could not be built)."""

    def __init__(self, message: str, token: Optional[int] = None):
        super().__init__(message)
        self.token = token


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class TokenGrammar(abc.ABC):
    """Per-sequence grammar state (see the module docstring)."""

    vocab_size: int  # the model's padded vocabulary size V

    @abc.abstractmethod
    def fill_mask(self, out: np.ndarray) -> None: ...

    @abc.abstractmethod
    def consume(self, tokens: Sequence[int]) -> None: ...

    @abc.abstractmethod
    def rollback(self, n: int) -> None: ...

    @abc.abstractmethod
    def forced_tokens(self) -> list[int]: ...

    @abc.abstractmethod
    def is_stopped(self) -> bool: ...

    @abc.abstractmethod
    def is_accepting(self) -> bool: ...

    def allowed(self) -> np.ndarray:
        """Convenience: the allowed token ids (tests / debugging; the engine uses ``fill_mask``)."""
        out = np.zeros(mask_words(self.vocab_size), np.int32)
        self.fill_mask(out)
        bits = np.unpackbits(out.view(np.uint8), bitorder="little")
        return np.nonzero(bits)[0]


_LLT_CACHE: dict[tuple[int, int, Any], tuple[Any, Any]] = {}
_LLT_LOCK = threading.Lock()


def llg_tokenizer(hf_tokenizer, vocab_size: int, eos_token: Union[int, Sequence[int], None] = None):
    """The ``llguidance.LLTokenizer`` for a HF fast tokenizer (``transformers`` or ``tokenizers``),
    cached per (tokenizer object, vocab size, eos)."""
    import llguidance
    import llguidance.hf

    eos_key = tuple(eos_token) if isinstance(eos_token, (list, tuple)) else eos_token
    key = (id(hf_tokenizer), int(vocab_size), eos_key)
    with _LLT_LOCK:
        hit = _LLT_CACHE.get(key)
        if hit is not None and hit[0] is hf_tokenizer:
            return hit[1]
    eos = list(eos_token) if isinstance(eos_token, (list, tuple)) else eos_token
    if hasattr(hf_tokenizer, "backend_tokenizer"):  # transformers fast tokenizer
        llt = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)
    elif hasattr(hf_tokenizer, "to_str"):  # tokenizers.Tokenizer
        if eos is None:
            raise ValueError("eos_token is required with a bare tokenizers.Tokenizer")
        llt = llguidance.LLTokenizer(hf_tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
    else:
        raise TypeError(f"unsupported tokenizer type {type(hf_tokenizer).__name__}")
    if llt.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {llt.vocab_size} tokens, more than the model's {vocab_size}")
    with _LLT_LOCK:
        _LLT_CACHE[key] = (hf_tokenizer, llt)
    return llt


class LLGuidanceGrammar(TokenGrammar):
    """``TokenGrammar`` over an ``llguidance.LLMatcher``."""

    def __init__(self, llg_tok, grammar: str, vocab_size: int, *, n_tokens: Optional[int] = None, log_level: int = 0):
        """``n_tokens``: the tokenizer's real size (ids from it up to ``vocab_size`` are model padding)."""
        import llguidance

        self.vocab_size = int(vocab_size)
        self._tok = llg_tok
        self._grammar = grammar
        self._m = llguidance.LLMatcher(llg_tok, grammar, log_level=log_level)
        if self._m.is_error():
            raise GrammarError(f"invalid grammar: {self._m.get_error()}")
        self._n_tok = min(int(n_tokens) if n_tokens is not None else llg_tok.vocab_size, self.vocab_size)
        self.n_consumed = 0

    @classmethod
    def from_json_schema(cls, llg_tok, schema: Union[dict, str], vocab_size: int, **kw) -> "LLGuidanceGrammar":
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema if isinstance(schema, str) else json.dumps(schema)
        )
        return cls(llg_tok, grammar, vocab_size, **kw)

    def fork(self) -> "LLGuidanceGrammar":
        """An independent copy in the same state (e.g. for beam / n>1 sampling)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._m = self._m.deep_copy()
        return new

    def _check(self) -> None:
        if self._m.is_error():
            raise GrammarError(f"grammar is in an error state: {self._m.get_error()}")

    def fill_mask(self, out: np.ndarray) -> None:
        if out.dtype != np.int32 or out.ndim != 1 or out.shape[0] != mask_words(self.vocab_size):
            raise ValueError(f"mask must be int32[{mask_words(self.vocab_size)}], got {out.dtype}{list(out.shape)}")
        if not out.flags["C_CONTIGUOUS"]:
            raise ValueError("mask must be C-contiguous")
        self._check()
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        self._check()
        self._clear_padding(out)

    def _clear_padding(self, out: np.ndarray) -> None:
        # ids past the tokenizer (model padding) are never allowed, whatever the matcher wrote
        n = self._n_tok
        w = n // 32
        if w < out.shape[-1]:
            if n % 32:
                out[..., w] &= np.int32(np.uint32((1 << (n % 32)) - 1).view(np.int32))
                w += 1
            out[..., w:] = 0

    def consume(self, tokens: Sequence[int]) -> None:
        self._check()
        for t in tokens:
            t = int(t)
            if not 0 <= t < self._n_tok:
                raise GrammarError(f"token {t} is outside the tokenizer's vocabulary ({self._n_tok})", t)
            if not self._m.consume_token(t):
                raise GrammarError(
                    f"token {t} ({self._tok.dbg_tokens([t])}) rejected by the grammar after "
                    f"{self.n_consumed} tokens: {self._m.get_error().splitlines()[0] if self._m.get_error() else ''}",
                    t,
                )
            self.n_consumed += 1

    def rollback(self, n: int) -> None:
        if n < 0 or n > self.n_consumed:
            raise ValueError(f"cannot roll back {n} of {self.n_consumed} tokens")
        if n and not self._m.rollback(n):
            raise GrammarError(f"rollback({n}) failed: {self._m.get_error()}")
        self.n_consumed -= n

    def forced_tokens(self) -> list[int]:
        self._check()
        return list(self._m.compute_ff_tokens())

    def is_stopped(self) -> bool:
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    def is_error(self) -> bool:
        return self._m.is_error()


_EXECUTOR: list = []  # llguidance's thread pool, made on the first batched fill


def fill_masks(grammars: Sequence[LLGuidanceGrammar], out: np.ndarray, rows: Sequence[int]) -> dict[int, str]:
    """Fill ``out[rows[i]]`` with ``grammars[i]``'s mask, all rows at once on llguidance's threads (the
    Rust side computes them in parallel without the GIL). Returns {i: error} for grammars that failed: their
    rows allow every token (the caller ends those sequences), the others are filled."""
    import llguidance

    if out.dtype != np.int32 or out.ndim != 2 or not out.flags["C_CONTIGUOUS"]:
        raise ValueError(f"masks must be a C-contiguous int32 [rows, words] array, got {out.dtype}{list(out.shape)}")
    errors, jobs = {}, []
    for i, (g, r) in enumerate(zip(grammars, rows, strict=True)):
        if out.shape[1] != mask_words(g.vocab_size):
            raise ValueError(f"mask rows must be int32[{mask_words(g.vocab_size)}], got [{out.shape[1]}]")
        if g._m.is_error():
            errors[i] = f"grammar is in an error state: {g._m.get_error()}"
            out[r] = -1
        else:
            jobs.append((i, g, int(r)))
    if not _EXECUTOR:
        _EXECUTOR.append(llguidance.LLExecutor())
    _EXECUTOR[0].unsafe_compute_mask_ptr(
        [(g._m, r) for _, g, r in jobs], out.ctypes.data, out.shape[1] * 4, out.shape[0]
    )
    for i, g, r in jobs:
        if g._m.is_error():
            errors[i] = f"grammar is in an error state: {g._m.get_error()}"
            out[r] = -1
        else:
            g._clear_padding(out[r])
    return errors


def make_grammar(
    hf_tokenizer,
    json_schema: Union[dict, str],
    vocab_size: int,
    *,
    eos_token: Union[int, Sequence[int], None] = None,
) -> LLGuidanceGrammar:
    """A fresh grammar for one sequence (the compiled tokenizer is cached)."""
    return LLGuidanceGrammar.from_json_schema(
        llg_tokenizer(hf_tokenizer, vocab_size, eos_token),
        json_schema,
        vocab_size,
        n_tokens=tokenizer_size(hf_tokenizer),
    )


def tokenizer_size(hf_tokenizer) -> int:
    """Number of ids the tokenizer can produce (added tokens included), before model padding."""
    if hasattr(hf_tokenizer, "backend_tokenizer"):
        return max(len(hf_tokenizer), hf_tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    return hf_tokenizer.get_vocab_size(with_added_tokens=True)


def token_at(llg_tok, data: bytes, pos: int, *, context: int = 16, ahead: int = 64) -> int:
    """The token that starts at byte ``pos`` when ``data`` is tokenized as a whole, found from a window
    with ``context`` bytes on the left. The left context matters: a pre-tokenizer with a lookbehind (a
    spelled name's letters, ``timjax.train.tokenizer``) splits ``in`` inside ``Bopin`` differently from
    ``in`` at the start of a string. Where no window token starts at ``pos`` (the text so far ends inside
    a token), the first token of the remaining bytes."""
    lo = max(0, pos - context)
    while lo < pos and data[lo] & 0xC0 == 0x80:  # start the window on a character, not inside one
        lo += 1
    at = lo
    for t in llg_tok.tokenize_bytes(data[lo : pos + ahead]):
        if at == pos:
            return t
        at += len(llg_tok.decode_bytes([t]))
        if at > pos:
            break
    return llg_tok.tokenize_bytes(data[pos : pos + ahead])[0]

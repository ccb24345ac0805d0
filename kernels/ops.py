"""One interface over the kernel implementations.

``impl`` is one of "auto", "xla", "pallas", "pallas_interpret" (or any name added with
``register``): "auto" -> "pallas" when ``jax.default_backend() == "gpu"``, else "xla"
(the pure-jnp reference path, production on CPU). A new backend (e.g. Mosaic GPU) is one
more ``register(op, name, fn)`` entry; callers do not change.

All functions work inside ``jax.jit`` / ``lax.scan``; only ``scale``, ``rope_theta``,
``impl`` and tuning kwargs are static.
"""

from __future__ import annotations

from typing import Callable

import jax

from . import compaction as _c
from . import paged_attention as _pa
from .ragged_paged_attention import reference as _rpa_ref
from .ragged_paged_attention import v1 as _rpa_v1

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")

_REGISTRY: dict[str, dict[str, Callable]] = {
    "decode_attention": {
        "xla": _pa.paged_decode_attention_reference,
        "pallas": lambda *a, **kw: _pa.paged_decode_attention(*a, interpret=False, **kw),
        "pallas_interpret": lambda *a, **kw: _pa.paged_decode_attention(*a, interpret=True, **kw),
    },
    "extend_attention": {
        "xla": _pa.paged_extend_attention_reference,
        "pallas": lambda *a, **kw: _pa.paged_extend_attention(*a, interpret=False, **kw),
        "pallas_interpret": lambda *a, **kw: _pa.paged_extend_attention(*a, interpret=True, **kw),
    },
    "ragged_attention": {
        "xla": _rpa_ref.ragged_paged_attention_reference,
        # Unset tuning args come from ragged_paged_attention/v1/tuned_block_sizes.py.
        "pallas": lambda *a, **kw: _rpa_v1.ragged_paged_attention(*a, interpret=False, **kw),
        "pallas_interpret": lambda *a, **kw: _rpa_v1.ragged_paged_attention(*a, interpret=True, **kw),
    },
    "compact": {
        "xla": _c.compact_pages_reference,
        "pallas": lambda *a, **kw: _c.compact_pages(*a, interpret=False, **kw),
        "pallas_interpret": lambda *a, **kw: _c.compact_pages(*a, interpret=True, **kw),
    },
    "rotate_slots": {
        "xla": _c.rotate_slots_reference,
        "pallas": lambda *a, **kw: _c.rotate_slots(*a, interpret=False, **kw),
        "pallas_interpret": lambda *a, **kw: _c.rotate_slots(*a, interpret=True, **kw),
    },
}


def register(op: str, impl: str, fn: Callable) -> None:
    """Add (or replace) implementation ``impl`` of ``op`` (same signature as the others)."""
    _REGISTRY.setdefault(op, {})[impl] = fn


def resolve_impl(impl: str = "auto") -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def _get(op: str, impl: str) -> Callable:
    name = resolve_impl(impl)
    try:
        return _REGISTRY[op][name]
    except KeyError:
        raise ValueError(f"unknown impl {impl!r} for {op}; have {sorted(_REGISTRY[op])}") from None


def _tuning(name: str, tuning: dict) -> dict:
    # Tuning kwargs (block sizes, k_splits, ...) only mean something to kernel paths.
    return {} if name == "xla" else tuning


def decode_attention(q, k_pages, v_pages, lengths, page_table, *, scale=None, impl: str = "auto", **tuning):
    """q [B, Hq, hd]; k/v_pages [Hkv, P, ps, hd]; lengths, page_table int32 -> [B, Hq, hd]."""
    name = resolve_impl(impl)
    return _get("decode_attention", name)(
        q, k_pages, v_pages, lengths, page_table, scale=scale, **_tuning(name, tuning)
    )


def extend_attention(q, k_pages, v_pages, q_start, q_len, page_table, *, scale=None, impl: str = "auto", **tuning):
    """q [B, T, Hq, hd]; query i < q_len attends to slots <= q_start + i -> [B, T, Hq, hd]."""
    name = resolve_impl(impl)
    return _get("extend_attention", name)(
        q, k_pages, v_pages, q_start, q_len, page_table, scale=scale, **_tuning(name, tuning)
    )


def compact(k_pages, v_pages, page_table, start, end, length, *, rope_theta: float, impl: str = "auto", **tuning):
    """Remove slots [start, end) per sequence, shift the tail down, re-rotate moved keys.

    k/v_pages [L, Hkv, P, ps, hd] (or one layer [Hkv, P, ps, hd]) -> new (k_pages, v_pages).
    Donate the pools under jit to get an in-place update.
    """
    name = resolve_impl(impl)
    return _get("compact", name)(
        k_pages, v_pages, page_table, start, end, length, rope_theta=rope_theta, **_tuning(name, tuning)
    )


def rotate_slots(k_pages, page_table, start, count, delta, *, rope_theta: float, impl: str = "auto", **tuning):
    """Rotate keys at slots [start, start + count) of each sequence by delta positions."""
    name = resolve_impl(impl)
    return _get("rotate_slots", name)(
        k_pages, page_table, start, count, delta, rope_theta=rope_theta, **_tuning(name, tuning)
    )


def ragged_attention(
    q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens, *, scale=None, impl: str = "auto", **tuning
):
    """Decode and extend rows in one call (PLAN.md contract 2).

    q [N, Hq, hd] packed tokens; k/v_pages [Hkv, P, ps, hd]; page_table int32 [R, W];
    q_start, q_len int32 [R]; cu_q_lens int32 [R + 1]. Row r's query i is token
    cu_q_lens[r] + i and attends to slots 0 .. q_start[r] + i. Tokens >= cu_q_lens[R] -> 0.
    """
    name = resolve_impl(impl)
    return _get("ragged_attention", name)(
        q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens, scale=scale, **_tuning(name, tuning)
    )

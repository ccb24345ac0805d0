"""Pallas / pure-jnp kernels for timjax: arrays in, arrays out (no model knowledge).

Dimension letters (B, T, N, R, S, L, P, ps, W, hd, Hq, Hkv, G, ...) are defined in kernels/README.md.

This folder installs as `timjax.kernels` (setuptools `package-dir`). It sits at the top of the repository,
so whenever the repository root is on `sys.path` (`python -m pytest`, a script run from the root) the
bare name `kernels` would find it before Hugging Face's `kernels` package, which transformers >= 5.25
imports. Imported under that bare name, this file hands the name over (`_shadow.yield_name`) and loads
none of its own modules. Chosen over renaming the folder (the layout is the design's) and over removing
`__init__.py` (a namespace portion loses to an installed package, but the editable install's finder needs
the file to map `timjax.kernels` here)."""

if __name__ == "kernels":  # pragma: no branch - only when the repository root shadows an installed package
    from ._shadow import yield_name

    yield_name(__name__)
else:

    from .compaction import compact_pages, compact_pages_reference, rope_inv_freq, rotate_keys, rotate_slots_reference
    from .compaction import rotate_slots as rotate_slots_pallas
    from .ops import (
        IMPLS,
        compact,
        decode_attention,
        extend_attention,
        ragged_attention,
        register,
        resolve_impl,
        rotate_slots,
    )
    from .paged_attention import (
        paged_decode_attention,
        paged_decode_attention_reference,
        paged_extend_attention,
        paged_extend_attention_reference,
    )
    from .ragged_paged_attention import ragged_paged_attention_reference
    from .ragged_paged_attention.v1 import ragged_paged_attention

    __all__ = [
        "IMPLS",
        "compact",
        "decode_attention",
        "extend_attention",
        "register",
        "resolve_impl",
        "rotate_slots",
        "compact_pages",
        "compact_pages_reference",
        "rotate_slots_pallas",
        "rotate_slots_reference",
        "rope_inv_freq",
        "rotate_keys",
        "paged_decode_attention",
        "paged_decode_attention_reference",
        "paged_extend_attention",
        "paged_extend_attention_reference",
        "ragged_attention",
        "ragged_paged_attention",
        "ragged_paged_attention_reference",
    ]

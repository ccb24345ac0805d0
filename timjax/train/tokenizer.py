"""A small byte-level BPE for a tiny TIM, trained on the corpus and the TIM system prompt.

Qwen3's 151,936-row embedding would make a 1M-parameter body a 20M model; a vocabulary of a couple of
thousand tokens trained on what the model reads and writes keeps the parameters in the body.

Pre-tokenization (a regex split before the byte-level BPE) decides what a token may span:

* every digit and every ``-`` is its own token, so a number is copied digit by digit and a sign is never
  glued to its neighbours (copying values between tasks is most of what the model does);
* ``[`` and ``]`` are their own tokens, so no token ever straddles a subtask list's bracket (the runtime's
  token boundary rule, ``timjax.tim.tree``, then never has to split a token: what the model writes is
  what it was trained on);
* the ``"tool_result"`` key ends a token (``_result"``): the runtime writes everything after the key
  (``": "`` and the encoded result), so no token the model would sample may reach past it;
* ``(`` and ``)`` are their own tokens, so a sub-expression is the same tokens in the question
  (``-((8 + 14)``) and in the thought that copies it (``Compute (8 + 14)``);
* a word never carries the space before it: a name is the same tokens in the question (``of Bonel``),
  in a tool's arguments and result (``"Bonel``) and in a thought (``of Bonel.``). With the leading space
  attached (the first tiny TIM's tokenizer), those were different tokens, and the model had to learn the
  pair for every name instead of copying it (a likely cause of its failed lookups);
* each run of other punctuation and spaces is one piece, so the schema's separators and key quotes
  (``", "``, ``": {"``) become single tokens;
* with ``spell`` (the tiny TIM spells the knowledge base's names), those words are written letter by
  letter and every other word of the training texts is a whole piece. Copying a name is then copying a
  few of 52 letters, each seen everywhere, the way digits are copied, instead of learning a copy for each
  of a few hundred name tokens: a 0.9M model trained with names as whole tokens copied digits but wrote a
  frequent name in place of the question's (0 of 40 held-out lookups right after 10M tokens).

Saved as a Hugging Face tokenizer directory (``tokenizer.json``, ``tokenizer_config.json`` with a ChatML
chat template, ``special_tokens_map.json``) that ``transformers.AutoTokenizer`` loads offline.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PRETOKENIZE_PATTERN = r'_result"|\d|-|[\[\]()]|\p{L}+|[^\p{L}\p{N}\[\]()\-]+'

CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def pretokenize_pattern(whole_words: Iterable[str] = ()) -> str:
    """The split regex. With ``whole_words``, only those words are pieces; any other letter is its own
    piece (a word outside the list is spelled)."""
    words = sorted(set(whole_words), key=lambda w: (-len(w), w))
    if not words:
        return PRETOKENIZE_PATTERN
    if not all(w.isalpha() for w in words):
        raise ValueError("whole words must be letters only")
    alt = "|".join(words)
    return r'_result"|\d|-|[\[\]()]|(?<!\p{L})(?:' + alt + r")(?!\p{L})|\p{L}|[^\p{L}\p{N}\[\]()\-]+"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2, spell: Iterable[str] = ()):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, the pre-tokenizer above) trained on ``texts``.
    ``spell``: words written letter by letter (every other word of ``texts`` stays whole)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts)
    spell = set(spell)
    whole: set[str] = set()
    if spell:
        for t in texts:
            whole.update(re.findall(r"[^\W\d_]+", t))
        whole -= spell
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pretokenize_pattern(whole)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike, *, model_max_length: int = 4096) -> Path:
    """Write the Hugging Face tokenizer files into ``out_dir`` (created; files replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
    }
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    files = {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special_map, indent=2),
    }
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary package files
        os.replace(tmp, out / name)
    return out


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

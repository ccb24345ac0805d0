"""Shared helpers for the training tests: a small corpus, a tokenizer trained on it, the training schema."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from timjax.train.corpus import CorpusSpec, document_text, problems
from timjax.train.tools_adapter import default_backend

SPEC = CorpusSpec(seed=0)


@lru_cache(maxsize=1)
def small_problems(n: int = 150):
    return tuple(problems(SPEC, "train", n))


@lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    from timjax.tim.prompt import tim_system_prompt
    from timjax.train.tokenizer import save_tokenizer, train_tokenizer
    from timjax.train.tools_adapter import training_schema

    probs = small_problems()
    tools = default_backend()
    texts = [p.question for p in probs] + [document_text(p, tools) for p in probs]
    texts.append(tim_system_prompt(training_schema(tools)))
    out = Path(tempfile.mkdtemp(prefix="timjax-test-tok-"))
    return save_tokenizer(train_tokenizer(texts, 700), out)


@lru_cache(maxsize=1)
def tokenizer():
    from timjax.train.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir())


@lru_cache(maxsize=1)
def replayer():
    from timjax.train.runtime_view import Replayer
    from timjax.train.tools_adapter import training_schema

    return Replayer(tokenizer(), training_schema(default_backend()))


@lru_cache(maxsize=1)
def tiny_random_tim() -> Path:
    """A random Qwen3 with the test tokenizer, written as a Hugging Face checkpoint directory."""
    import jax
    from timjax.convert import export_timjax_to_hf

    from timjax.base.config import Qwen3Config
    from timjax.qwen3.model import init_params

    tok = tokenizer()
    cfg = Qwen3Config(
        vocab_size=704,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    out = Path(tempfile.mkdtemp(prefix="timjax-test-tim-")) / "hf"
    params = jax.tree.map(lambda x: jax.device_get(x), init_params(cfg, "float32", jax.random.key(0)))
    return export_timjax_to_hf((cfg, params), out, tokenizer_dir=tokenizer_dir(), progress=False)

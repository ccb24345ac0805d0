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
    from timjax.train.sft import training_schema
    from timjax.train.tokenizer import save_tokenizer, train_tokenizer

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
    from timjax.train.sft import training_schema

    return Replayer(tokenizer(), training_schema(default_backend()))

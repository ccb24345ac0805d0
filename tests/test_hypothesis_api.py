"""Property tests (issue 10): random parameter values over ``timjax.generate`` and the CLI, and random broken
configs. Each call ends in a clean one-line error naming a parameter that really was bad, or in a valid
result (greedy runs equal a reference run; sampled runs are reproducible), never a traceback or a hang.

Bounded for CI: the engine runs only with one set of cache shapes (one compile per session), bad values
fail before any device work, the CLI runs in-process against a missing model directory."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal

import pytest
from conftest import PLUGIN_NOISE as NOISE  # noqa: E402
from conftest import TINY_CFG
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import timjax
from timjax.base.config import ConfigError, Qwen3Config
from timjax.base.errors import ParameterError
from timjax.cli import main

I32, U32 = 2**31 - 1, 2**32 - 1
CFG = TINY_CFG
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]
NAN, INF = math.nan, math.inf

BAD = {  # values each parameter must refuse
    "max_new_tokens": [0, -1, 1.5, "8", True, 2**31, None, NAN],
    "temperature": [-0.1, NAN, INF, -INF, "0.5", None, True],
    "top_p": [0.0, -0.5, 1.0001, NAN, INF, "1"],
    "top_k": [-1, 2**31, 1.0, "3", True],
    "seed": [-1, 2**32, 2**64, 1.5, "0", None],
    "max_batch": [0, -1, 2**31, 1.0, "2", None],
    "page_size": [0, -1, 65, 3.0, None],
    "max_seq_len": [0, -3, 1.5, "64"],
    "kv_tokens": [0, -1, 2.0],
    "kv_memory_fraction": [0.0, 1.5, NAN, -0.1],
    "impl": ["palas", "XLAA", "", None, 3],
    "reposition": ["shfit", "", None],
    "stop": ["END", [""], [3], None],
    "stop_ids": [[64], [-1], "1", [1.5]],
    "chat": ["yes", 1, None],
    "progress": ["no", 0],
    "on_token": [5, "f"],
    "pruning_buffer": [-1, 1.5, "2"],
    "engine_options": [{"check_cach": True}, [], {"check_cache": 0}, {"max_batch": 2}],
}
VALID = {  # values that keep the engine's shapes fixed (one compile): 2 prompts, <= 16 tokens each
    "max_new_tokens": st.integers(1, 6),
    "temperature": st.just(0.0) | st.floats(0.05, 4.0),
    "top_p": st.floats(0.05, 1.0),
    "top_k": st.integers(0, I32),
    "seed": st.integers(0, U32 - 1),
    "max_batch": st.integers(2, I32),
    "stop_ids": st.none() | st.lists(st.integers(0, 63), max_size=3),
    "impl": st.just("auto"),  # another impl is another compile (~10 s here); test_generate covers impls
    "progress": st.booleans(),
}


@contextlib.contextmanager
def time_limit(seconds: int):
    """A hang (the old max_batch=0 spin) fails the test instead of blocking CI."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def model():
    m = timjax.random_model(CFG, dtype="float32", seed=2)
    with time_limit(300):  # the one compile; every later valid call reuses it
        ref = timjax.generate(m, PROMPTS, max_new_tokens=6)
    m._reference = [r.tokens for r in ref]
    return m


def named(msg: str) -> str:
    """The parameter a ParameterError names: ``invalid stop_ids[0]=64: ...`` -> ``stop_ids``."""
    m = re.match(r"invalid ([A-Za-z_\-]+)", msg)
    assert m, msg
    return m.group(1)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_generate_random_parameters(model, data):
    bad = data.draw(st.sets(st.sampled_from(sorted(BAD)), max_size=2), label="bad")
    good = data.draw(st.sets(st.sampled_from(sorted(VALID)), max_size=len(VALID)), label="good")
    good.add("max_new_tokens")  # the default (256) would size another cache: keep one compile
    kw = {name: data.draw(VALID[name], label=name) for name in sorted(good - bad)}
    kw.update({name: data.draw(st.sampled_from(BAD[name]), label=name) for name in sorted(bad)})
    event("bad" if bad else "valid")
    with time_limit(120):
        if bad:
            with pytest.raises(ParameterError) as ei:
                timjax.generate(model, PROMPTS, **kw)
            msg = str(ei.value)
            assert "\n" not in msg and named(msg) in bad, (kw, msg)
            return
        results = timjax.generate(model, PROMPTS, **kw)
        again = timjax.generate(model, PROMPTS, **kw)
    n = kw["max_new_tokens"]
    stops = set(kw.get("stop_ids") or ())
    for r, r2, ref in zip(results, again, model._reference):
        assert r.tokens == r2.tokens  # reproducible: same seed, same tokens, whatever the batching
        assert r.finish_reason in ("length", "stop") and r.error is None
        assert 1 <= len(r.tokens) <= n and all(0 <= t < CFG.vocab_size for t in r.tokens)
        if r.finish_reason == "stop":
            assert r.tokens[-1] in stops
        if kw.get("temperature", 0.0) == 0.0:  # greedy: the reference run, cut by the budget or a stop id
            cut = next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))
            assert r.tokens == ref[: min(n, cut)], (kw, r.tokens, ref)


# ---------------------------------------------------------------------------------------------- the CLI

FLAGS = {  # flag -> predicate over the parsed value that says it is valid
    "--max-new-tokens": (int, lambda v: 1 <= v <= I32),
    "--temperature": (float, lambda v: math.isfinite(v) and v >= 0),
    "--top-p": (float, lambda v: math.isfinite(v) and 0 < v <= 1),
    "--top-k": (int, lambda v: 0 <= v <= I32),
    "--seed": (int, lambda v: 0 <= v <= U32 - 1),  # two prompts: seed + 1 must fit too
    "--max-batch": (int, lambda v: 1 <= v <= I32),
    "--page-size": (int, lambda v: 1 <= v <= 64),
    "--pruning-buffer": (int, lambda v: -1 <= v <= I32),
    "--max-depth": (int, lambda v: 1 <= v <= I32),
    "--max-subtasks": (int, lambda v: 1 <= v <= I32),
}
NUMBER_TEXT = st.one_of(
    st.integers(-5, 70).map(str),
    st.sampled_from(["4294967295", "4294967296", "2147483648", "1e400", "-0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "x", "", "0x10"]),
)


def parsed(kind, text):
    try:
        return kind(text)
    except ValueError:
        return None


@settings(max_examples=60, deadline=None)
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAGS)), NUMBER_TEXT, max_size=3))
def test_cli_random_flag_values(flags):
    missing = "/nonexistent/timjax-model"
    argv = ["generate", missing, "--prompt", "a", "--prompt", "b"]
    for flag, text in flags.items():
        argv += [f"{flag}={text}"]
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err), time_limit(30):
        rc = main(argv)
    lines = [l for l in err.getvalue().splitlines() if not NOISE.match(l)]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in lines[0], (argv, err.getvalue())
    verdicts = {f: parsed(FLAGS[f][0], t) for f, t in flags.items()}
    unparsable = [f for f, v in verdicts.items() if v is None]
    invalid = [f for f, v in verdicts.items() if v is not None and not FLAGS[f][1](v)]
    line = lines[0]
    if unparsable:
        assert line.startswith("timjax generate: error: argument ") and line.split()[4].rstrip(":") in unparsable
    elif invalid:
        m = re.match(r"timjax: error: invalid (--[a-z-]+)=", line)
        assert m and m.group(1) in invalid, (argv, line)
    else:
        assert line == f"timjax: error: {missing}: no such directory", (argv, line)


# ------------------------------------------------------------------------------------ random bad configs

BASE = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}
INT_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
]
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.integers(-2, 9), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


def certainly_bad(field: str, value) -> bool:
    if field == "num_key_value_heads" and value is None:
        return False  # null means one kv head per query head, as in transformers
    if field in INT_FIELDS:
        return not isinstance(value, int) or isinstance(value, bool) or value <= 0
    if field in ("rms_norm_eps", "rope_theta"):
        return not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0
    if field == "tie_word_embeddings":
        return not isinstance(value, bool)
    return False


def assert_runnable(cfg: Qwen3Config) -> None:
    for f in INT_FIELDS:
        v = getattr(cfg, f)
        assert type(v) is int and v > 0, (f, v)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim % 2 == 0
    assert math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0 and 0 < cfg.rms_norm_eps < 1
    assert all(type(t) is int and t >= 0 for t in cfg.eos_token_ids)
    assert cfg.num_params() > 0


@settings(max_examples=150, deadline=None)
@given(
    edits=st.dictionaries(
        st.sampled_from(sorted(BASE) + ["rope_parameters", "rope_scaling"]),
        st.one_of(st.just("<delete>"), JSON_VALUES),
        min_size=1,
        max_size=3,
    )
)
def test_random_broken_configs(edits):
    raw = dict(BASE)
    for k, v in edits.items():
        if v == "<delete>":
            raw.pop(k, None)
        else:
            raw[k] = v
    try:
        cfg = Qwen3Config.from_hf_dict(json.loads(json.dumps(raw)), source="cfg.json")
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("cfg.json: ") and "https://" not in msg
        return
    assert not any(certainly_bad(k, v) for k, v in edits.items() if v != "<delete>"), (edits, cfg)
    assert_runnable(cfg)


@settings(max_examples=20, deadline=None)
@given(doc=JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_config_json_that_is_not_an_object(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as ei:
        Qwen3Config.from_file(path)
    assert str(ei.value) == f"{path}: expected a JSON object of config fields, got {type(doc).__name__}"

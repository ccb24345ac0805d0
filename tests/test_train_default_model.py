"""The shipped tiny TIM: it is the default model and the README's main command (`timjax demo`) works on it."""

from __future__ import annotations

from timjax.api import default_model_path


def test_default_model_ships_with_its_tokenizer_and_config():
    import timjax

    path = default_model_path()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_curve.png"):
        assert (path / f).is_file(), f
    model = timjax.load(path, dtype="float32")
    assert model.tokenizer is not None and model.config.num_params() < 2_000_000


def test_demo_solves_its_problem_with_calculator_calls_and_prunes():
    from timjax.demo import run_demo

    out = run_demo()
    assert out["ok"], out
    assert out["tool_calls"] == 3 and out["pruned_paths"] == [(0, 0)] and out["pruned_share"] > 0.3

"""`timjax convert` / `timjax export`: success paths, one-line errors, exit codes, cheap import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401
import pytest
from safetensors import safe_open

from timjax.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("cli") / "hf"
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    (path / "tokenizer.json").write_text("{}")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "timjax.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def tensors(d: Path) -> dict[str, bytes]:
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                x = h.get_tensor(k)
                out[k] = (x.dtype.name, x.shape, x.tobytes())
    return out


def test_convert_and_export_subprocess(hf_dir, tmp_path):
    tj, back = tmp_path / "tj", tmp_path / "back"
    r = run_cli("convert", hf_dir, tj, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tj / "timjax.json").is_file() and (tj / "tokenizer.json").is_file()
    r = run_cli("export", tj, back, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert tensors(back) == tensors(hf_dir)
    assert transformers.Qwen3ForCausalLM.from_pretrained(back).dtype == torch.bfloat16

    # errors through a real process: one line on stderr, non-zero exit, no traceback
    r = run_cli("convert", hf_dir, tj, "--no-progress")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("timjax: error: ") and str(tj) in r.stderr and "--overwrite" in r.stderr

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    r = run_cli("convert", bad, tmp_path / "o2", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(shard) in r.stderr
    assert not (tmp_path / "o2").exists()


def test_convert_dtype_and_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "tj"
    assert main(["convert", str(hf_dir), str(out), "--dtype", "float32", "--no-progress"]) == 0
    assert json.loads((out / "timjax.json").read_text())["dtype"] == "float32"
    assert main(["convert", str(hf_dir), str(out), "--dtype", "float16", "--no-progress"]) == 2
    assert main(["convert", str(hf_dir), str(out), "--dtype", "float16", "--overwrite", "--no-progress"]) == 0
    assert json.loads((out / "timjax.json").read_text())["dtype"] == "float16"
    exp = tmp_path / "hf16"
    assert (
        main(["export", str(out), str(exp), "--dtype", "bfloat16", "--max-shard-gb", "0.00002", "--no-progress"]) == 0
    )
    assert (exp / "model.safetensors.index.json").is_file()
    assert {v[0] for v in tensors(exp).values()} == {"bfloat16"}
    capsys.readouterr()


def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert err.startswith("timjax: error: ") and err.count("\n") == 1, err
    return err


def test_cli_error_messages(hf_dir, tmp_path, capsys):
    missing = tmp_path / "nothing"
    missing.mkdir()
    assert "config.json" in _err(capsys, ["convert", str(missing), str(tmp_path / "o"), "--no-progress"])

    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy2(hf_dir / "config.json", d / "config.json")
    assert "model.safetensors" in _err(capsys, ["convert", str(d), str(tmp_path / "o"), "--no-progress"])

    d = tmp_path / "noshard"
    shutil.copytree(hf_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = _err(capsys, ["convert", str(d), str(tmp_path / "o"), "--no-progress"])
    assert shard.name in err and "model.safetensors.index.json" in err

    d = tmp_path / "badcfg"
    shutil.copytree(hf_dir, d)
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(raw))
    err = _err(capsys, ["convert", str(d), str(tmp_path / "o"), "--no-progress"])
    assert str(d / "config.json") in err and "unsupported" in err

    assert "timjax.json" in _err(capsys, ["export", str(hf_dir), str(tmp_path / "o"), "--no-progress"])
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_import_is_cheap():
    """timjax.cli itself adds no heavy imports (jax may come from the timjax package __init__)."""
    code = (
        "import sys, timjax; before = set(sys.modules); import timjax.cli; "
        "new = set(sys.modules) - before; "
        "print(sorted(m for m in new if m.split('.')[0] in ('jax', 'orbax', 'torch', 'transformers', 'safetensors') "
        "or m.startswith('timjax.convert')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "timjax.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "convert" in r.stdout and "export" in r.stdout
    r = subprocess.run([sys.executable, "-m", "timjax.cli"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr

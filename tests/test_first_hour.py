"""A new user's first hour (issue 19): the README's commands on a fresh machine, and what they meet next.

Each test here failed on the main of 2026-12-04 (see the issue): the repository's `kernels/` shadowed
Hugging Face's `kernels` package, the default install lacked jinja2, the CLI computed a float32 checkpoint
in bfloat16, a TIM run stopped at 128 tokens with exit 0, `--json` exited 0 on a failed sequence,
`bench/decode.py` crashed without torch, `--help` hid defaults, the corpus size could not be changed from
the command line, and tool flags were reported by their API field names.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest

from timjax.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new shell: no virtual environment of the test run on PATH or in PYTHONPATH."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "JAX_COMPILATION_CACHE_DIR")  # (conftest's compile cache)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    venv = Path(sys.prefix)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(venv)))
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ the repository root on sys.path

REPO_ROOT_IMPORTS = r"""
import importlib.util, os, sys
root = os.getcwd()
import timjax.kernels as K  # the project's kernels, under their package name
assert os.path.dirname(K.__file__) == os.path.join(root, "kernels"), K.__file__
try:
    import kernels
except ModuleNotFoundError:
    print("bare kernels: none installed")
else:
    assert not kernels.__file__.startswith(os.path.join(root, "kernels")), kernels.__file__
    print("bare kernels:", kernels.__file__)
import torch, transformers
cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
model = transformers.Qwen3ForCausalLM(cfg).eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
assert tuple(logits.shape) == (1, 3, 64) and bool(torch.isfinite(logits).all())
print("forward ok")
"""


def test_repository_root_does_not_shadow_installed_kernels():
    """`python -c`/`python -m pytest` put the repository root first on sys.path: `import kernels` must still
    find Hugging Face's package (transformers >= 5.25 imports it), and a transformers Qwen3 must run."""
    installed = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    r = subprocess.run(
        [sys.executable, "-c", REPO_ROOT_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "forward ok" in r.stdout
    if installed:  # the same package the root-less interpreter finds
        assert f"bare kernels: {installed}" in r.stdout
    else:
        assert "bare kernels: none installed" in r.stdout


# ------------------------------------------------------------------------------ dependencies

OPTIONAL_IMPORTS = {"torch", "jax_plugins", "nvidia"}  # guarded imports: tests, CUDA plugin, ptxas wheel


def _top_level_imports(folder: Path) -> set[str]:
    names = set()
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_import_of_the_package_is_a_declared_dependency():
    """What the package imports comes from a distribution named in `dependencies` (a transitive one can
    vanish when its parent changes; jinja2 was missing this way)."""
    ours = {"timjax", "kernels", "convert"}
    names = set()
    for folder in ("timjax", "kernels", "convert"):
        names |= _top_level_imports(ROOT / folder)
    third_party = names - set(sys.stdlib_module_names) - ours - OPTIONAL_IMPORTS - {"__future__"}
    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for name in sorted(third_party):
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [])}
        if not owners & declared:
            missing[name] = sorted(owners) or ["not installed"]
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"
    assert "jinja2" in declared  # transformers' apply_chat_template imports it lazily


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split(f"<!-- {marker}", 1)[1]
    return next(line for line in after.splitlines() if line.startswith("python3 -m venv"))


def _copy_checkout(dst: Path) -> None:
    """The files a fresh clone has (tracked, plus untracked ones git does not ignore)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def test_readme_main_command_in_a_fresh_environment(tmp_path):
    """The README's first command, verbatim, in a copy of the checkout with no test extra installed:
    the demo solves its problem, with no traceback and no notice about torch."""
    cmd = _readme_command("main-command")
    assert cmd.endswith("pip install -e . && timjax demo"), cmd
    checkout = tmp_path / "timjax"
    _copy_checkout(checkout)
    cache = tmp_path / "xla"  # where the command keeps its compiled steps (not this machine's ~/.cache)
    r = subprocess.run(
        ["bash", "-c", cmd],
        cwd=checkout,
        env=clean_env(TIMJAX_COMPILE_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "demo OK" in r.stdout and "correct" in r.stdout
    assert any(cache.iterdir()), "the demo kept none of its compiled steps"
    assert "Traceback" not in out
    assert "PyTorch was not found" not in out
    freeze = subprocess.run(
        [str(checkout / ".venv/bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    installed = {p["name"].lower() for p in json.loads(freeze.stdout)}
    assert "torch" not in installed and "pytest" not in installed  # really the default install


# ------------------------------------------------------------------------------ the CLI


def test_help_shows_every_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    unexplained = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.default is False or a.help == "==SUPPRESS==":
                continue  # flags (off unless given)
            if "default" not in (a.help or "").lower():
                unexplained.append(f"timjax {name} {a.option_strings[0]}")
        p.format_help()  # every %(default)s expands
    assert not unexplained, unexplained


def test_tool_flag_errors_name_the_flag(capsys):
    for argv, flag in (
        (["--tool-timeout", "0"], "--tool-timeout"),
        (["--max-tool-calls", "0"], "--max-tool-calls"),
        (["--max-tool-result-tokens", "-3"], "--max-tool-result-tokens"),
    ):
        assert main(["generate", "--tim", "Calculate 1 + 2.", *argv]) == 2
        err = capsys.readouterr().err
        assert f"invalid {flag}=" in err and "ToolLimits" not in err, err


def test_tim_default_budget_finishes_and_a_cut_tree_exits_1(capsys):
    """The README's `timjax generate --tim` example reaches its answer with the default budget; a budget
    that cuts the tree says so and exits 1, with or without --json."""
    assert main(["generate", "--tim", "Calculate 3 * (4 - 9).", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["finish_reason"] == "stop" and r["stats"]["generated_tokens"] > 128
    assert main(["generate", "--tim", "Calculate 3 * (4 - 9).", "--max-new-tokens", "40", "--json"]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)[0]["finish_reason"] == "length"
    assert "--max-new-tokens 40" in cap.err and "before its answer" in cap.err
    assert main(["generate", "--tim", "Calculate 3 * (4 - 9).", "--max-new-tokens", "40"]) == 1
    assert "before its answer" in capsys.readouterr().err


def test_json_exits_1_when_a_sequence_failed(capsys):
    """One prompt longer than the model's window fails alone; the other completes; --json exits 1."""
    long_prompt = "Calculate " + " + ".join(["1"] * 3000) + "."
    assert main(["generate", "--prompt", "Calculate 1 + 2.", "--prompt", long_prompt, "--json"]) == 1
    short, long = json.loads(capsys.readouterr().out)
    assert short["finish_reason"] == "length" and long["finish_reason"] == "error"
    assert "does not fit" in long["error"]


def _save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def test_float32_checkpoint_computes_and_converts_in_float32(tmp_path):
    """No dtype given: a float32 checkpoint is loaded and converted in float32 and greedy tokens equal
    transformers' own; a bfloat16 checkpoint stays bfloat16."""
    torch = pytest.importorskip("torch")
    from timjax.convert import checkpoint_dtype, convert_hf_to_timjax

    import timjax
    from tests.conftest import make_hf_model

    hf = make_hf_model(seed=3)
    src = _save_hf(hf, tmp_path / "f32")
    model = timjax.load(src, tokenizer=False)
    assert np.dtype(model.dtype) == np.float32
    prompt = [5, 17, 42, 9, 100, 3]
    r = timjax.generate(model, prompt, max_new_tokens=12)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, attention_mask=torch.ones(1, len(prompt))
        )
    assert r.tokens == ref[0, len(prompt) :].tolist()
    out = convert_hf_to_timjax(src, tmp_path / "tj32", progress=False)
    assert json.loads((out / "timjax.json").read_text())["dtype"] == "float32" == checkpoint_dtype(src)
    assert np.dtype(timjax.load(out, tokenizer=False).dtype) == np.float32
    bf = _save_hf(make_hf_model(seed=3, dtype="bfloat16"), tmp_path / "bf16")
    assert checkpoint_dtype(bf) == "bfloat16"
    assert main(["convert", str(bf), str(tmp_path / "tjbf"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "tjbf" / "timjax.json").read_text())["dtype"] == "bfloat16"
    assert build_parser().parse_args(["generate", "m"]).dtype is None


# ------------------------------------------------------------------------------ train and bench


def test_train_n_problems_shrinks_the_corpus_with_progress(tmp_path, capsys):
    cfg = ROOT / "timjax/train/configs/tiny_tim_stage1.json"
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out-dir", str(out), "--n-problems", "40", "--data-only"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^40 problems \(", err, re.M), err[-2000:]
    assert "problems: 100%" in err and "corpus: 100%" in err  # both stages show a bar
    assert (out / "data.npz").is_file()
    assert main(["train", str(cfg), "--n-problems", "0", "--data-only"]) == 2
    assert "invalid --n-problems=0" in capsys.readouterr().err


def test_bench_decode_without_torch_skips_that_row_and_writes_json(tmp_path):
    """The default methods include the transformers peer; without torch its row says why and the run
    still ends with its JSON, with no CUDA-plugin traceback (prepare_process) on the way."""
    out = tmp_path / "decode.json"
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['bench/decode.py', '--methods', 'xla', 'torch', '--batch', '1', '--steps', '2', "
        f"'--repeats', '1', '--prompt-len', '8', '--json', {str(out)!r}]; "
        "runpy.run_path('bench/decode.py', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the script must choose by itself
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    torch_rows = [x for x in rows if x["method"].startswith("transformers")]
    assert torch_rows and all("torch is not installed" in x["note"] for x in torch_rows)
    assert any(x["method"].startswith("timjax") and x["ms_per_step"] for x in rows)


def test_every_bench_script_prepares_the_process_before_jax():
    """The CLI and every benchmark choose the platform before JAX starts (the shared fix)."""
    heavy = re.compile(r"^(jax|transformers|torch|bench|timjax(?!\.base\.platform_env))\b")
    for f in sorted((ROOT / "bench").glob("*.py")):
        if f.name in ("__init__.py", "common.py", "gpu_report.py"):
            continue
        body = ast.parse(f.read_text()).body
        prepared = False
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                if getattr(node.value.func, "id", None) == "prepare_process":
                    prepared = True
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            if any(heavy.match(m) for m in mods):
                assert prepared, f"{f.name}: imports {mods} before prepare_process()"

"""Bad input gets one line naming the parameter, field or file (issue 10); the README's "Bad input: what you
see" table is checked row by row against what these examples really print."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PLUGIN_NOISE as NOISE  # noqa: E402
from conftest import TINY_CFG

import timjax
from timjax.base.config import ConfigError, Qwen3Config
from timjax.base.errors import (
    OutputWriteError,
    ParameterError,
    TimjaxError,
    UnreadableFileError,
)
from timjax.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
HF_CFG = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def tiny():
    return timjax.random_model(TINY_CFG, dtype="float32")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from conftest import make_hf_model

    path = tmp_path_factory.mktemp("val") / "hf"
    make_hf_model(seed=3, **HF_CFG).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory) -> Path:
    from timjax.convert import convert_hf_to_timjax

    return convert_hf_to_timjax(hf_dir, tmp_path_factory.mktemp("val") / "tj", dtype="float32", progress=False)


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr without this machine's CUDA-plugin noise)."""
    rc = main([str(a) for a in argv])
    err = "\n".join(l for l in capsys.readouterr().err.splitlines() if not NOISE.match(l))
    return rc, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def api_error(fn, *args, exc=ParameterError, **kw) -> str:
    with pytest.raises(exc) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------- the API


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(max_batch=0), "invalid max_batch=0: must be an integer in [1, "),
        (dict(max_batch=-1), "invalid max_batch=-1:"),
        (dict(page_size=0), "invalid page_size=0: must be an integer in [1, 64]"),
        (dict(page_size=65), "invalid page_size=65:"),
        (dict(seed=2**32), "invalid seed=4294967296: must be an integer in [0, 4294967295]"),
        (dict(seed=-1), "invalid seed=-1:"),
        (dict(temperature=math.inf), "invalid temperature=inf: expected a finite number"),
        (dict(temperature=-0.5), "invalid temperature=-0.5:"),
        (dict(top_p=0.0), "invalid top_p=0.0: must be a finite number in (0.0, 1.0]"),
        (dict(top_p=math.nan), "invalid top_p=nan:"),
        (dict(top_k=-1), "invalid top_k=-1:"),
        (dict(top_k=2**31), "invalid top_k=2147483648:"),
        (dict(max_new_tokens=0), "invalid max_new_tokens=0:"),
        (dict(max_new_tokens="8"), "invalid max_new_tokens='8': expected an integer"),
        (dict(max_new_tokens=True), "invalid max_new_tokens=True:"),
        (dict(max_seq_len=0), "invalid max_seq_len=0:"),
        (dict(kv_tokens=-5), "invalid kv_tokens=-5:"),
        (dict(kv_memory_fraction=1.5), "invalid kv_memory_fraction=1.5:"),
        (
            dict(impl="XLA"),
            "invalid impl='XLA': choose one of auto, xla, pallas, pallas_interpret (did you mean 'xla'?)",
        ),
        (dict(reposition="shfit"), "invalid reposition='shfit': choose one of reencode, shift (did you mean 'shift'?)"),
        (dict(pruning_buffer=-1), "invalid pruning_buffer=-1:"),
        (dict(stop=["ok", ""]), "invalid stop[1]='': expected a non-empty string"),
        (dict(stop_ids=[1, 64]), "invalid stop_ids[1]=64: must be an integer in [0, 63]"),
        (dict(chat="yes"), "invalid chat='yes': expected True or False"),
        (dict(on_token=5), "invalid on_token=5: expected a function or None"),
        (dict(schema={"type": "object"}), "invalid schema={'type': 'object'}: expected a timjax.tim.schema.TimSchema"),
        (dict(engine_options={"check_cache": 1}), "invalid engine_options['check_cache']=1: expected True or False"),
        (
            dict(engine_options={"max_batch": 2}),
            "invalid engine_options={'max_batch': 2}: 'max_batch' is an argument of "
            "generate itself: pass max_batch=...",
        ),
    ],
)
def test_generate_rejects_bad_parameters(tiny, kw, needle):
    assert needle in api_error(timjax.generate, tiny, [1, 2, 3], **kw)


@pytest.mark.parametrize(
    "prompt,needle",
    [
        ([], "invalid prompt=[]: empty"),
        (None, "invalid prompt=None: expected a string, a list of token ids, or a list of those"),
        ([[1, 2], None], "invalid prompt[1]=None"),
        ([1, 2.0], "invalid prompt[1]=2.0: token ids must be integers"),
        (np.zeros((2, 3), np.int32), "an array prompt must be 1-D integer token ids, got shape (2, 3)"),
        ("hi", "invalid prompt='hi': a text prompt needs a tokenizer"),
    ],
)
def test_generate_rejects_bad_prompts(tiny, prompt, needle):
    assert needle in api_error(timjax.generate, tiny, prompt)


def test_generate_rejects_a_non_model():
    assert "invalid model='x': expected a timjax model" in api_error(timjax.generate, "x", [1])


def test_validation_comes_before_device_work(tiny, monkeypatch):
    import timjax.engine

    def boom(*a, **k):
        raise AssertionError("the engine was built")

    monkeypatch.setattr(timjax.engine, "Engine", boom)
    api_error(timjax.generate, tiny, [1, 2], max_batch=0)


def test_max_batch_zero_no_longer_hangs_and_valid_calls_run(tiny):
    """The reproduced hang (max_batch=0 spun forever) is an error now; the same call with max_batch=1 runs,
    and a bad prompt in a batch fails alone."""
    api_error(timjax.generate, tiny, [[1, 2], [3, 4]], max_batch=0, max_new_tokens=2)
    ok, bad = timjax.generate(tiny, [[1, 2, 3], [1, 99]], max_new_tokens=3, max_batch=1)
    assert ok.finish_reason == "length" and len(ok.tokens) == 3
    assert bad.finish_reason == "error" and bad.error == "prompt token id out of range [0, 64)"


def test_load_logits_convert_export_parameters(tiny, hf_dir, converted, tmp_path):
    from timjax.convert import convert_hf_to_timjax, export_timjax_to_hf, read_params

    assert "invalid dtype='bf16'" in api_error(timjax.load, converted, dtype="bf16")
    assert "invalid dtype='float64'" in api_error(timjax.load, converted, dtype="float64")
    assert "invalid path=None" in api_error(timjax.load, None)
    assert "invalid tokenizer='no'" in api_error(timjax.load, converted, tokenizer="no")
    assert "invalid token_ids='abc'" in api_error(timjax.logits, tiny, "abc")
    assert "invalid seed=18446744073709551616" in api_error(timjax.random_model, TINY_CFG, seed=2**64)
    assert "invalid cfg={'vocab_size': 8}" in api_error(timjax.random_model, {"vocab_size": 8})
    assert "invalid dtype='half'" in api_error(timjax.random_model, TINY_CFG, dtype="half")
    assert "token id out of range [0, 64)" in api_error(timjax.logits, tiny, [1, 64])
    assert "invalid dtype='f64'" in api_error(convert_hf_to_timjax, hf_dir, tmp_path / "o", dtype="f64")
    assert "invalid overwrite=1" in api_error(convert_hf_to_timjax, hf_dir, tmp_path / "o", overwrite=1)
    assert "invalid max_shard_bytes=0" in api_error(export_timjax_to_hf, converted, tmp_path / "o", max_shard_bytes=0)
    assert "invalid max_shard_bytes=1.5" in api_error(
        export_timjax_to_hf, converted, tmp_path / "o", max_shard_bytes=1.5
    )
    assert "invalid dtype='float8'" in api_error(read_params, converted, dtype="float8")
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    assert "not a directory" in api_error(timjax.load, tmp_path / "file", exc=TimjaxError)
    assert "not a directory" in api_error(convert_hf_to_timjax, tmp_path / "file", tmp_path / "o", exc=TimjaxError)
    # aliases stay accepted where they always were (convert / export / read_params)
    cfg, params = read_params(converted, dtype="bf16")
    assert params["embed"].dtype.name == "bfloat16"


# ------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--max-batch", "0"], "timjax: error: invalid --max-batch=0: must be an integer in [1, 2147483647]"),
        (["--max-batch", "-1"], "timjax: error: invalid --max-batch=-1:"),
        (["--page-size", "0"], "timjax: error: invalid --page-size=0:"),
        (["--seed", "-3"], "timjax: error: invalid --seed=-3:"),
        (["--temperature", "nan"], "timjax: error: invalid --temperature=nan: expected a finite number >= 0.0"),
        (["--top-p", "inf"], "timjax: error: invalid --top-p=inf:"),
        (["--max-new-tokens", "0"], "timjax: error: invalid --max-new-tokens=0:"),
        (["--pruning-buffer", "-2"], "timjax: error: invalid --pruning-buffer=-2: must be an integer in [-1, "),
        (["--max-depth", "0"], "timjax: error: invalid --max-depth=0:"),
        (["--stop", ""], "timjax: error: invalid --stop[0]='': expected a non-empty string"),
        (["--max-batch", "x"], "timjax generate: error: argument --max-batch: invalid int value: 'x'"),
        (["--dtype", "bf16"], "timjax generate: error: argument --dtype: invalid choice: 'bf16'"),
    ],
)
def test_cli_generate_rejects_bad_flags_before_loading(capsys, tmp_path, argv, needle):
    rc, err = cli(capsys, "generate", tmp_path / "no-model", "--prompt", "hi", *argv)
    assert rc == 2 and one_line(err).startswith(needle), err


def test_cli_valid_flags_reach_the_model_loader(capsys, tmp_path):
    rc, err = cli(
        capsys,
        "generate",
        tmp_path / "no-model",
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--seed",
        "4294967294",
        "--max-batch",
        "1",
        "--temperature",
        "0.5",
        "--top-p",
        "1",
        "--pruning-buffer",
        "-1",
    )
    assert rc == 2 and one_line(err) == f"timjax: error: {tmp_path / 'no-model'}: no such directory"
    rc, err = cli(capsys, "generate", tmp_path / "no-model", "--prompt", "a", "--prompt", "b", "--seed", "4294967295")
    assert rc == 2 and "for 2 prompts (prompt i uses seed + i, a uint32)" in one_line(err)


def test_cli_export_and_help(capsys, converted, tmp_path):
    for gb in ("inf", "nan", "0", "-1", "1e-12"):
        rc, err = cli(capsys, "export", converted, tmp_path / "o", "--max-shard-gb", gb)
        assert rc == 2 and one_line(err).startswith(f"timjax: error: invalid --max-shard-gb={float(gb)!r}"), err
    assert not (tmp_path / "o").exists()
    assert cli(capsys, "--help")[0] == 0
    rc, err = cli(capsys, "frobnicate")
    assert rc == 2 and one_line(err).startswith("timjax: error: argument COMMAND: invalid choice: 'frobnicate'")


# ------------------------------------------------------------------------------------ config.json


def write_config(d: Path, hf_dir: Path, **edit) -> Path:
    d.mkdir()
    for f in hf_dir.iterdir():
        shutil.copy2(f, d / f.name)
    raw = json.loads((hf_dir / "config.json").read_text())
    if "rope_theta" in edit:  # a hub-style config (rope_theta at the top) rather than transformers 5's rope_parameters
        raw.pop("rope_parameters", None)
    raw.update(edit)
    (d / "config.json").write_text(json.dumps(raw))
    return d


@pytest.mark.parametrize(
    "edit,needle",
    [
        (dict(rope_theta=-1), "field rope_theta=-1: Input should be greater than 0"),
        (dict(rope_theta=0.0), "field rope_theta=0.0: Input should be greater than 0"),
        (dict(rms_norm_eps=-1e-6), "field rms_norm_eps=-1e-06: Input should be greater than 0"),
        (dict(max_position_embeddings=0), "field max_position_embeddings=0: Input should be greater than 0"),
        (dict(num_attention_heads=0), "field num_attention_heads=0: Input should be greater than 0"),
        (dict(num_key_value_heads=0), "field num_key_value_heads=0: Input should be greater than 0"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=4"),
        (dict(head_dim=7), "head_dim=7 must be even"),
        (dict(hidden_size="32"), "field hidden_size='32': Input should be a valid integer"),
        (dict(vocab_size=96.0), "field vocab_size=96.0: Input should be a valid integer"),
        (dict(tie_word_embeddings="false"), "field tie_word_embeddings='false': Input should be a valid boolean"),
        (dict(eos_token_id=[1, "2"]), "field eos_token_id="),
        (dict(rope_parameters=[10000.0]), "field rope_parameters=[10000.0]: expected an object"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
            "field rope_parameters.rope_theta='1e4': Input should be a valid number",
        ),
    ],
)
def test_config_fields_the_runtime_relies_on(hf_dir, tmp_path, capsys, edit, needle):
    d = write_config(tmp_path / "c", hf_dir, **edit)
    rc, err = cli(capsys, "convert", d, tmp_path / "o", "--no-progress")
    line = one_line(err)
    assert rc == 2 and line.startswith(f"timjax: error: {d / 'config.json'}: ")
    assert needle in line and "https://" not in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("raw", ["[1]", "null", '"qwen3"', "3"])
def test_config_that_is_not_an_object(tmp_path, raw):
    (tmp_path / "config.json").write_text(raw)
    msg = api_error(Qwen3Config.from_file, tmp_path, exc=ConfigError)
    assert msg.startswith(f"{tmp_path / 'config.json'}: expected a JSON object of config fields, got ")


# -------------------------------------------------------------------- files, disks and interrupts


def drop_file_permissions_argv() -> list[str] | None:
    """A command prefix under which root obeys file modes (root reads a mode-000 file otherwise)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def run_cli_subprocess(*argv, prefix=(), max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from timjax.cli import main; sys.exit(main(sys.argv[1:]))"
    if max_file_bytes is not None:  # set in the child itself: no preexec_fn (fork) from a process running JAX
        code = (
            f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, "
            f"resource.getrlimit(resource.RLIMIT_FSIZE)[1])); " + code
        )
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def clean(stderr: str) -> str:
    return "\n".join(l for l in stderr.splitlines() if not NOISE.match(l))


def unreadable_message(hf_dir: Path, tmp_path: Path) -> str:
    d = tmp_path / "noread"
    shutil.copytree(hf_dir, d)
    target = d / "model.safetensors"
    target.chmod(0)
    prefix = drop_file_permissions_argv()
    try:
        if prefix:
            r = run_cli_subprocess("convert", d, tmp_path / "o", "--no-progress", prefix=prefix)
            if r.stderr.startswith("setpriv:"):  # a container that may not drop capabilities
                prefix = None
        if prefix is None:  # root without setpriv: the OS would let us read; make the open fail the same way
            from timjax.convert import safetensors_io

            def deny(path, *a, **k):
                raise PermissionError(13, "Permission denied", str(path))

            with pytest.MonkeyPatch.context() as mp, pytest.raises(UnreadableFileError) as ei:
                mp.setattr(safetensors_io, "open", deny, raising=False)
                safetensors_io.check_readable(target)
            return str(ei.value)
        if not prefix:
            r = run_cli_subprocess("convert", d, tmp_path / "o", "--no-progress")
        assert r.returncode == 2 and not (tmp_path / "o").exists()
        return one_line(clean(r.stderr)).removeprefix("timjax: error: ")
    finally:
        target.chmod(0o644)


@pytest.fixture(scope="module")
def file_messages(hf_dir, converted, tmp_path_factory) -> dict[str, str]:
    """The subprocess cases, run once per module: an unreadable file, a full disk in convert and export."""
    a, b = tmp_path_factory.mktemp("noread"), tmp_path_factory.mktemp("full")
    conv, exp = full_disk_messages(hf_dir, converted, b)
    return {
        "unreadable": unreadable_message(hf_dir, a),
        "unreadable_path": str(a / "noread" / "model.safetensors"),
        "full_convert": conv,
        "full_export": exp,
        "full_dir": str(b),
    }


def test_unreadable_file_is_not_reported_missing(file_messages):
    assert file_messages["unreadable"] == f"{file_messages['unreadable_path']}: cannot read file (Permission denied)"


def full_disk_messages(hf_dir: Path, converted: Path, tmp_path: Path) -> tuple[str, str]:
    """A file-size limit makes every write past 4 KiB fail as a full disk would (EFBIG instead of ENOSPC;
    Python ignores SIGXFSZ), through orbax's writer threads and through our safetensors writer."""
    out = []
    for cmd, src in (("convert", hf_dir), ("export", converted)):
        dst = tmp_path / f"full-{cmd}"
        r = run_cli_subprocess(cmd, src, dst, "--no-progress", max_file_bytes=4096)
        assert r.returncode == 2, r.stderr
        assert not dst.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        out.append(one_line(clean(r.stderr)).removeprefix("timjax: error: "))  # no orbax thread tracebacks
    return out[0], out[1]


def test_full_disk_is_one_line_naming_the_output(file_messages):
    conv, exp, tmp_path = file_messages["full_convert"], file_messages["full_export"], Path(file_messages["full_dir"])
    assert re.fullmatch(
        re.escape(str(tmp_path / "full-convert" / "params")) + r"/\w+: cannot write \(File too large "
        r"\[errno 27\]\); the output directory is left as it was",
        conv,
    ), conv
    assert exp == (
        f"{tmp_path / 'full-export' / 'model.safetensors'}: cannot write (File too large [errno 27]); "
        f"the output directory is left as it was"
    )


@pytest.mark.parametrize("kind", ["task", "future"])
def test_a_failed_orbax_write_collected_later_logs_nothing(kind, caplog):
    """The late report behind a full disk's stray traceback: asyncio logs "Task (or Future) exception was
    never retrieved" when the collector reaches the failed write, after our one-line error went out."""
    import asyncio
    import gc

    from convert.timjax_format import quiet_orbax

    err = ValueError('Failed writing: "/x/params/layer_00000.orbax-checkpoint-tmp/d/0": File too large')

    async def write():
        raise err

    async def main_():
        if kind == "task":
            t = asyncio.get_running_loop().create_task(write())
            await asyncio.sleep(0)
            del t
        else:
            asyncio.get_running_loop().create_future().set_exception(err)

    with quiet_orbax():
        pass  # installs the filters, which stay: the report may come after the call returned
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main_())
        gc.collect()
        other = asyncio.new_event_loop()  # an unrelated failure is still reported
        other.create_future().set_exception(ValueError("something else"))
        other.close()
        gc.collect()
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(msgs) == 1 and "something else" in msgs[0], msgs


class _InterruptingCheckpointer:
    """The real orbax checkpointer, with a Ctrl-C delivered at the start of the ``at``-th save/restore."""

    def __init__(self, real, at: int):
        self.real, self.at, self.calls, self.completed = real, at, 0, 0

    def _call(self, fn, *a, **k):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        out = fn(*a, **k)
        self.completed += 1
        return out

    def save(self, *a, **k):
        return self._call(self.real.save, *a, **k)

    def restore(self, *a, **k):
        return self._call(self.real.restore, *a, **k)


def interrupt_messages(hf_dir: Path, converted: Path, tmp_path: Path, capsys, monkeypatch) -> list[str]:
    from timjax.convert import hf_to_timjax, timjax_format

    real = timjax_format.orbax_checkpointer
    lines = []
    for cmd, src, module in (("convert", hf_dir, hf_to_timjax), ("export", converted, timjax_format)):
        ck = _InterruptingCheckpointer(real(), at=2)
        monkeypatch.setattr(module, "orbax_checkpointer", lambda ck=ck: ck)
        dst = tmp_path / f"int-{cmd}"
        rc, err = cli(capsys, cmd, src, dst, "--no-progress")
        assert rc == 130 and ck.completed == 2 and ck.calls == 2  # the item in flight finished, then it stopped
        assert not dst.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        lines.append(one_line(err))
    return lines


def test_ctrl_c_during_convert_and_export(hf_dir, converted, tmp_path, capsys, monkeypatch):
    assert interrupt_messages(hf_dir, converted, tmp_path, capsys, monkeypatch) == ["timjax: interrupted"] * 2


def test_late_loop_callbacks_are_silenced_and_nothing_else():
    """The source of the "Event loop is closed" tracebacks: a tensorstore completion calling
    call_soon_threadsafe on orbax's loop after it closed. Only that report is dropped."""
    import asyncio
    import types

    from timjax.convert.timjax_format import _install_unraisable_filter

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    seen = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    try:
        _install_unraisable_filter()
        sys.unraisablehook(types.SimpleNamespace(exc_value=late, exc_traceback=late.__traceback__))
        other = RuntimeError("Event loop is closed")  # same text, raised elsewhere: still reported
        sys.unraisablehook(types.SimpleNamespace(exc_value=other, exc_traceback=None))
    finally:
        sys.unraisablehook = old
    assert seen == [other]


# --------------------------------------------------------------------- the README's table, row by row


def readme_rows() -> dict[str, str]:
    """First column -> the message shape: the first `code` span of the last column when the column starts
    with one, else the whole column."""
    text = README.read_text()
    table = text[text.index("<!-- bad-input-table") :]
    rows = {}
    for line in table.splitlines()[3:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = re.findall(r"`([^`]*)`", cells[2])[0] if cells[2].startswith("`") else cells[2].strip()
    return rows


def shape_regex(shape: str) -> re.Pattern:
    parts = re.split(r"<[^>]+>", shape)
    return re.compile(".+?".join(map(re.escape, parts)))


def test_readme_bad_input_table(tiny, hf_dir, converted, file_messages, tmp_path, capsys, monkeypatch):
    def cli_line(*argv):
        rc, err = cli(capsys, *argv)
        assert rc == 2
        return one_line(err).removeprefix("timjax: error: ")

    def gen_error(*a, **k):
        return api_error(timjax.generate, tiny, *a, **k)

    def config_error(name, **edit):
        d = write_config(tmp_path / name, hf_dir, **edit)
        return cli_line("convert", d, tmp_path / "o", "--no-progress")

    def not_an_object():
        (tmp_path / "nobj").mkdir()
        (tmp_path / "nobj" / "config.json").write_text("[1]")
        return api_error(Qwen3Config.from_file, tmp_path / "nobj", exc=ConfigError)

    def batch_row():
        ok, bad = timjax.generate(tiny, [[1, 2, 3], [5, 64]], max_new_tokens=2, max_batch=1)
        assert ok.finish_reason == "length"
        return f'that result alone has `finish_reason="{bad.finish_reason}"` and `error="{bad.error}"`; the others complete'

    missing = tmp_path / "no-model"
    examples = {
        "number out of range": lambda: cli_line("generate", missing, "--prompt", "x", "--max-batch", "0"),
        "seed beyond uint32": lambda: cli_line("generate", missing, "--prompt", "x", "--seed", "4294967296"),
        "seed + i beyond uint32 in a batch": lambda: gen_error([[1], [2]], seed=2**32 - 1),
        "NaN or infinity": lambda: gen_error([1], temperature=float("nan")),
        "wrong type": lambda: gen_error([1], max_new_tokens=1.5),
        "misspelled name": lambda: gen_error([1], impl="palas"),
        "misspelled dtype": lambda: api_error(timjax.load, converted, dtype="bf16"),
        "unknown engine option": lambda: gen_error([1], engine_options={"check_cach": True}),
        "a bare string as a list": lambda: gen_error([1], stop="END"),
        "bad prompt": lambda: gen_error([[1, 2], [1.5]]),
        "text without a tokenizer": lambda: gen_error("hi"),
        "bad `logits` input": lambda: api_error(timjax.logits, tiny, [[1, 2], [3]]),
        "unknown flag value": lambda: cli_line("generate", missing, "--prompt", "x", "--impl", "palas"),
        "config field out of range": lambda: config_error("c1", rope_theta=-1),
        "config field of the wrong type": lambda: config_error("c2", hidden_size="32"),
        "config heads that do not divide": lambda: config_error("c3", num_key_value_heads=3),
        "config.json not an object": not_an_object,
        "NaN or inf weights": lambda: cli_line(
            "convert",
            nan_checkpoint(hf_dir, tmp_path / "nan", "lm_head.weight", float("inf")),
            tmp_path / "o",
            "--no-progress",
        ),
        "a cast that overflows": lambda: cli_line(
            "convert",
            nan_checkpoint(hf_dir, tmp_path / "big", "lm_head.weight", 1e6),
            tmp_path / "o",
            "--dtype",
            "float16",
            "--no-progress",
        ),
        "unreadable file": lambda: file_messages["unreadable"],
        "full disk while converting": lambda: file_messages["full_convert"],
        "full disk while exporting": lambda: file_messages["full_export"],
        "Ctrl-C during convert or export": lambda: interrupt_messages(
            hf_dir, converted, tmp_path / "y", capsys, monkeypatch
        )[0],
        "bad prompt inside a batch": batch_row,
    }
    (tmp_path / "y").mkdir()
    rows = readme_rows()
    assert sorted(rows) == sorted(examples), "every README row has an example here and vice versa"
    for name, shape in rows.items():
        got = examples[name]()
        assert shape_regex(shape).fullmatch(got), (name, shape, got)


# ------------------------------------------------------------------------------------ non-finite weights


def nan_checkpoint(hf_dir: Path, d: Path, name: str, value: float) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf_dir, d)
    t = load_file(str(d / "model.safetensors"))
    t[name] = t[name].copy()
    t[name].reshape(-1)[5] = value
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_nan_weights_are_refused_at_conversion(hf_dir, tmp_path, capsys):
    """A NaN model used to generate token 0 forever and report "length"; conversion reads every tensor, so
    it refuses one (chunked check) naming the file and tensor, and writes nothing."""
    from timjax.convert import read_params

    from timjax.base.errors import NonFiniteTensorError

    d = nan_checkpoint(hf_dir, tmp_path / "nan", "model.layers.1.mlp.down_proj.weight", float("nan"))
    rc, err = cli(capsys, "convert", d, tmp_path / "o", "--no-progress")
    assert rc == 2 and one_line(err) == (
        f"timjax: error: {d / 'model.safetensors'}: tensor "
        f"model.layers.1.mlp.down_proj.weight has 1 non-finite values (NaN or inf) "
        f"of {48 * 32}"
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(NonFiniteTensorError, match="model.layers.1.mlp.down_proj.weight"):
        read_params(d)  # loading an HF dir directly takes the same path


def test_float16_overflow_is_named(hf_dir, tmp_path, converted, capsys):
    d = nan_checkpoint(hf_dir, tmp_path / "big", "model.embed_tokens.weight", 1e6)
    rc, err = cli(capsys, "convert", d, tmp_path / "o", "--dtype", "float16", "--no-progress")
    assert rc == 2 and one_line(err).endswith(
        "tensor model.embed_tokens.weight overflows float16 (values beyond its "
        "range become inf); use bfloat16 or float32"
    )
    assert cli(capsys, "convert", d, tmp_path / "o", "--dtype", "bfloat16", "--no-progress")[0] == 0
    rc, err = cli(capsys, "export", tmp_path / "o", tmp_path / "e", "--dtype", "float16", "--no-progress")
    assert rc == 2 and "tensor embed overflows float16" in one_line(err) and not (tmp_path / "e").exists()


def test_finite_scan_agrees_with_isfinite():
    """The bit-level scan (exponent all ones) against np.isfinite, over random bit patterns of each dtype."""
    import ml_dtypes
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from timjax.convert.safetensors_io import _all_finite

    kinds = {
        "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.uint16),
        "float16": (np.dtype(np.float16), np.uint16),
        "float32": (np.dtype(np.float32), np.uint32),
    }

    @settings(max_examples=200, deadline=None)
    @given(
        kind=st.sampled_from(sorted(kinds)),
        words=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=40),
        big=st.booleans(),
    )
    def check(kind, words, big):
        dt, ut = kinds[kind]
        bits = np.array(words, np.uint64).astype(ut)
        if big:  # cross the 1 Mi-element chunk boundary
            bits = np.concatenate([np.zeros((1 << 20) - 3, ut), bits])
        y = bits.view(dt)
        assert _all_finite(y) == bool(np.isfinite(y.astype(np.float32)).all())

    check()


def test_other_write_failures_name_the_output(hf_dir, tmp_path, monkeypatch):
    """A full disk while writing the side files or the description (plain Python writes): one line naming the
    output path, nothing left behind; a read error is not reworded."""
    import errno

    from timjax.convert import convert_hf_to_timjax, hf_to_timjax

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst / "tokenizer.json"))

    monkeypatch.setattr(hf_to_timjax, "copy_side_files", full)
    out = tmp_path / "o"
    msg = api_error(convert_hf_to_timjax, hf_dir, out, progress=False, exc=OutputWriteError)
    assert msg == (
        f"{out.absolute() / 'tokenizer.json'}: cannot write (No space left on device [errno 28]); "
        f"the output directory is left as it was"
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    def unreadable(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(hf_dir / "tokenizer.json"))

    monkeypatch.setattr(hf_to_timjax, "copy_side_files", unreadable)
    with pytest.raises(PermissionError):
        convert_hf_to_timjax(hf_dir, out, progress=False)

"""HF <-> timjax checkpoint conversion: round trips, in-memory loading, transformers interop, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes  # noqa: F401
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from timjax.convert import convert_hf_to_timjax, export_timjax_to_hf, read_params

from timjax.base import errors
from timjax.base.config import ConfigError
from timjax.base.errors import TimjaxError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)


def make_hf(path: Path, *, tied: bool, dtype: str, shard: str | None, seed: int = 0) -> Path:
    """A random tiny Qwen3ForCausalLM saved with save_pretrained (norm weights randomised too)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def hf_tensors(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def hf_files(d: Path) -> dict[str, str]:
    """tensor name -> file name."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                out[k] = f.name
    return out


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def flat(params: dict) -> dict[str, np.ndarray]:
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers.{k}": v for k, v in params["layers"].items()})
    return out


def litter(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# name -> (tied, dtype, shard size)
VARIANTS = {
    "untied-f32-single": (False, "float32", None),
    "tied-bf16-sharded": (True, "bfloat16", "20KB"),
    "untied-bf16-sharded": (False, "bfloat16", "30KB"),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {k: make_hf(root / k, tied=t, dtype=d, shard=s, seed=i) for i, (k, (t, d, s)) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tj")
    return {k: convert_hf_to_timjax(d, root / k, dtype=VARIANTS[k][1], progress=False) for k, d in hf_dirs.items()}


def test_fixture_has_a_layer_split_across_shards(hf_dirs):
    files = hf_files(hf_dirs["tied-bf16-sharded"])
    assert len(set(files.values())) >= 3
    split = [
        i
        for i in range(TINY["num_hidden_layers"])
        if len({f for n, f in files.items() if n.startswith(f"model.layers.{i}.")}) > 1
    ]
    assert split, "expected some layer's tensors to span two shards"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_layout(converted, variant):
    out = converted[variant]
    meta = json.loads((out / "timjax.json").read_text())
    assert meta["format_version"] == 1 and meta["dtype"] == VARIANTS[variant][1]
    assert ("lm_head" in meta["params"]) == (not VARIANTS[variant][0])
    assert (out / "tokenizer_config.json").is_file() and (out / "chat_template.jinja").is_file()
    assert (out / "generation_config.json").is_file()
    assert "layer_00002" in {p.name for p in (out / "params").iterdir()}
    assert not litter(out.parent)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_bit_identical(hf_dirs, converted, tmp_path, variant):
    shard_bytes = 20_000 if "sharded" in variant else 10**9
    out = export_timjax_to_hf(converted[variant], tmp_path / "hf", max_shard_bytes=shard_bytes, progress=False)
    assert_bit_identical(hf_tensors(hf_dirs[variant]), hf_tensors(out))
    assert ((out / "model.safetensors.index.json").is_file()) == ("sharded" in variant)
    assert (out / "tokenizer_config.json").read_text() == (hf_dirs[variant] / "tokenizer_config.json").read_text()
    if "sharded" in variant:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == hf_files(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_params_hf_equals_converted(hf_dirs, converted, variant):
    cfg_a, a = read_params(hf_dirs[variant])
    cfg_b, b = read_params(converted[variant])
    assert cfg_a == cfg_b
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].tobytes() == fb[k].tobytes(), k
        want = np.float32 if "norm" in k else np.dtype(VARIANTS[variant][1])
        assert fa[k].dtype == want, k
    assert fa["layers.q_proj"].shape == (3, 32, 4, 16) and fa["layers.o_proj"].shape == (3, 4, 16, 32)


def test_read_params_dtype_cast_matches_torch(hf_dirs, converted):
    _, p = read_params(converted["untied-f32-single"], dtype="bfloat16")
    sd = transformers.Qwen3ForCausalLM.from_pretrained(hf_dirs["untied-f32-single"]).state_dict()
    ref = sd["model.embed_tokens.weight"].to(torch.bfloat16).view(torch.int16).numpy()
    assert p["embed"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(p["embed"].view(np.int16), ref)
    assert p["final_norm"].dtype == np.float32
    np.testing.assert_array_equal(p["final_norm"], sd["model.norm.weight"].numpy())  # norms stay exact float32


def test_layout_matches_torch_math(hf_dirs):
    """The converted orientation computes what torch's nn.Linear does (checks the HF_TABLE transforms)."""
    _, p = read_params(hf_dirs["untied-f32-single"])
    sd = transformers.Qwen3ForCausalLM.from_pretrained(hf_dirs["untied-f32-single"]).state_dict()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    L = p["layers"]
    q_ref = x @ sd["model.layers.1.self_attn.q_proj.weight"].numpy().T
    np.testing.assert_allclose(np.einsum("td,dhk->thk", x, L["q_proj"][1]).reshape(5, -1), q_ref, rtol=1e-5, atol=1e-5)
    k_ref = x @ sd["model.layers.2.self_attn.k_proj.weight"].numpy().T
    np.testing.assert_allclose(np.einsum("td,dhk->thk", x, L["k_proj"][2]).reshape(5, -1), k_ref, rtol=1e-5, atol=1e-5)
    a = rng.standard_normal((5, 4, 16)).astype(np.float32)
    o_ref = a.reshape(5, -1) @ sd["model.layers.0.self_attn.o_proj.weight"].numpy().T
    np.testing.assert_allclose(np.einsum("thk,hkd->td", a, L["o_proj"][0]), o_ref, rtol=1e-5, atol=1e-5)
    g_ref = x @ sd["model.layers.0.mlp.gate_proj.weight"].numpy().T
    np.testing.assert_allclose(x @ L["gate_proj"][0], g_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ p["lm_head"], x @ sd["lm_head.weight"].numpy().T, rtol=1e-5, atol=1e-5)


def test_transformers_loads_export_and_logits_match(hf_dirs, converted, tmp_path):
    for variant in ("tied-bf16-sharded", "untied-f32-single"):
        out = export_timjax_to_hf(converted[variant], tmp_path / variant, max_shard_bytes=25_000, progress=False)
        ids = torch.tensor([[3, 17, 99, 5, 64, 2]])
        ref = transformers.Qwen3ForCausalLM.from_pretrained(hf_dirs[variant]).eval()
        got = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
        assert got.dtype == ref.dtype
        assert got.config.tie_word_embeddings == ref.config.tie_word_embeddings
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, got(ids).logits)


def test_export_in_memory_params(hf_dirs, tmp_path):
    import jax.numpy as jnp

    src = hf_dirs["untied-bf16-sharded"]
    cfg, params = read_params(src)
    params = {k: (jnp.asarray(v) if k == "embed" else v) for k, v in params.items()}  # mixed jax / numpy
    out = export_timjax_to_hf((cfg, params), tmp_path / "mem", tokenizer_dir=src, progress=False)
    assert_bit_identical(hf_tensors(src), hf_tensors(out))
    assert (out / "chat_template.jinja").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_dtype_change(converted, tmp_path):
    out = export_timjax_to_hf(converted["untied-f32-single"], tmp_path / "h", dtype="float16", progress=False)
    t = hf_tensors(out)
    assert {v.dtype for v in t.values()} == {np.dtype(np.float16)}
    assert transformers.Qwen3ForCausalLM.from_pretrained(out).dtype == torch.float16


def test_default_dtype_is_the_sources_and_overwrite(hf_dirs, tmp_path):
    out = tmp_path / "o"
    convert_hf_to_timjax(hf_dirs["untied-f32-single"], out, progress=False)
    assert json.loads((out / "timjax.json").read_text())["dtype"] == "float32"  # as stored (issue 19)
    with pytest.raises(errors.OutputExistsError, match=str(out)):
        convert_hf_to_timjax(hf_dirs["untied-f32-single"], out, progress=False)
    convert_hf_to_timjax(hf_dirs["untied-f32-single"], out, dtype="bfloat16", overwrite=True, progress=False)
    assert json.loads((out / "timjax.json").read_text())["dtype"] == "bfloat16"
    convert_hf_to_timjax(hf_dirs["untied-bf16-sharded"], out, overwrite=True, progress=False)
    assert json.loads((out / "timjax.json").read_text())["dtype"] == "bfloat16"
    assert not litter(tmp_path)


# ---------------------------------------------------------------------------------------------- errors


def single_copy(src: Path, dst: Path, mutate=None) -> Path:
    """Copy an HF dir as a single model.safetensors, optionally editing the tensor dict first."""
    dst.mkdir()
    shutil.copy2(src / "config.json", dst / "config.json")
    t = hf_tensors(src)
    if mutate:
        mutate(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def expect_error(exc, hf_dir: Path, out: Path, *needles: str):
    with pytest.raises(exc) as ei:
        convert_hf_to_timjax(hf_dir, out, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not out.exists()
    assert not litter(out.parent)
    return msg


def test_missing_config(hf_dirs, tmp_path):
    d = tmp_path / "nocfg"
    shutil.copytree(hf_dirs["untied-f32-single"], d)
    (d / "config.json").unlink()
    expect_error(errors.MissingFileError, d, tmp_path / "out", str(d), "config.json")


def test_missing_weights(hf_dirs, tmp_path):
    d = tmp_path / "now"
    d.mkdir()
    shutil.copy2(hf_dirs["untied-f32-single"] / "config.json", d / "config.json")
    expect_error(errors.MissingFileError, d, tmp_path / "out", str(d), "model.safetensors", "index")


def test_missing_tensor(hf_dirs, tmp_path):
    d = single_copy(
        hf_dirs["untied-f32-single"], tmp_path / "d", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")
    )
    expect_error(
        errors.TensorMissingError,
        d,
        tmp_path / "out",
        "model.layers.1.self_attn.k_norm.weight",
        str(d / "model.safetensors"),
    )


def test_missing_lm_head_untied(hf_dirs, tmp_path):
    d = single_copy(hf_dirs["untied-f32-single"], tmp_path / "d", lambda t: t.pop("lm_head.weight"))
    expect_error(errors.TensorMissingError, d, tmp_path / "out", "lm_head.weight", "tie_word_embeddings")


def test_wrong_shape(hf_dirs, tmp_path):
    def mutate(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:-1]

    d = single_copy(hf_dirs["untied-f32-single"], tmp_path / "d", mutate)
    expect_error(
        errors.TensorShapeError,
        d,
        tmp_path / "out",
        "model.layers.2.mlp.up_proj.weight",
        "(63, 32)",
        "(64, 32)",
        "model.safetensors",
    )


def test_extra_tensor(hf_dirs, tmp_path):
    def mutate(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    d = single_copy(hf_dirs["untied-f32-single"], tmp_path / "d", mutate)
    expect_error(
        errors.UnexpectedTensorError, d, tmp_path / "out", "model.layers.0.self_attn.q_proj.bias", "model.safetensors"
    )


def test_extra_layer(hf_dirs, tmp_path):
    def mutate(t):
        t["model.layers.3.input_layernorm.weight"] = np.ones(32, np.float32)

    d = single_copy(hf_dirs["untied-f32-single"], tmp_path / "d", mutate)
    expect_error(
        errors.UnexpectedTensorError,
        d,
        tmp_path / "out",
        "model.layers.3.input_layernorm.weight",
        "num_hidden_layers=3",
    )


def test_inv_freq_buffers_are_skipped(hf_dirs, tmp_path):
    d = single_copy(
        hf_dirs["untied-f32-single"],
        tmp_path / "d",
        lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32)),
    )
    convert_hf_to_timjax(d, tmp_path / "out", dtype="float32", progress=False)


def test_tied_checkpoint_with_lm_head(hf_dirs, converted, tmp_path):
    src = hf_dirs["tied-bf16-sharded"]
    same = single_copy(
        src, tmp_path / "same", lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy())
    )
    out = convert_hf_to_timjax(same, tmp_path / "out_same", dtype="bfloat16", progress=False)
    _, a = read_params(out)
    _, b = read_params(converted["tied-bf16-sharded"])
    assert "lm_head" not in a and a["embed"].tobytes() == b["embed"].tobytes()

    def differ(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        t["lm_head.weight"][0, 0] += 1

    diff = single_copy(src, tmp_path / "diff", differ)
    expect_error(
        errors.UnexpectedTensorError,
        diff,
        tmp_path / "out_diff",
        "lm_head.weight",
        "tie_word_embeddings=true",
        "differs",
    )


def test_unsupported_tensor_dtype(hf_dirs, tmp_path):
    d = single_copy(
        hf_dirs["untied-f32-single"],
        tmp_path / "d",
        lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.float64)),
    )
    expect_error(errors.TensorDtypeError, d, tmp_path / "out", "model.norm.weight", "F64")


def test_corrupt_header(hf_dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(hf_dirs["tied-bf16-sharded"], d)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"#garbage!!#!"
    shard.write_bytes(bytes(raw))
    expect_error(errors.CorruptFileError, d, tmp_path / "out", str(shard))


def test_truncated_shard(hf_dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(hf_dirs["tied-bf16-sharded"], d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_error(errors.CorruptFileError, d, tmp_path / "out", str(shard))


def test_index_names_missing_shard(hf_dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(hf_dirs["tied-bf16-sharded"], d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(errors.MissingFileError, d, tmp_path / "out", shard.name, str(d / "model.safetensors.index.json"))


def test_unsupported_config(hf_dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(hf_dirs["untied-f32-single"], d)
    raw = json.loads((d / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(raw))
    msg = expect_error(ConfigError, d, tmp_path / "out", "rope_scaling", "yarn", str(d / "config.json"))
    assert isinstance(ConfigError(msg), TimjaxError)


def test_shape_error_in_last_shard_leaves_nothing(hf_dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(hf_dirs["tied-bf16-sharded"], d)
    last = sorted(d.glob("model-*.safetensors"))[-1]
    with safe_open(str(last), framework="numpy") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
    t["model.norm.weight"] = t["model.norm.weight"][:16]
    save_file(t, str(last), metadata={"format": "pt"})
    expect_error(errors.TensorShapeError, d, tmp_path / "out", "model.norm.weight", last.name, "(16,)", "(32,)")


def test_failure_mid_write_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    """A failure after some layers were written: OUT_DIR absent, no temp dir, an existing OUT_DIR untouched."""
    from timjax.convert import hf_to_timjax

    real = hf_to_timjax.save_item
    calls = []

    def flaky(ckptr, directory, tree, **kw):
        calls.append(directory.name)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(ckptr, directory, tree, **kw)

    monkeypatch.setattr(hf_to_timjax, "save_item", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_timjax(hf_dirs["tied-bf16-sharded"], out, progress=False)
    assert not out.exists() and not litter(tmp_path)
    out.mkdir()
    (out / "keep").write_text("x")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_timjax(hf_dirs["tied-bf16-sharded"], out, overwrite=True, progress=False)
    assert (out / "keep").read_text() == "x" and not litter(tmp_path)


def test_refuses_to_overwrite_source(hf_dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(hf_dirs["untied-f32-single"], d)
    with pytest.raises(errors.OutputExistsError, match="source"):
        convert_hf_to_timjax(d, d, overwrite=True, progress=False)
    assert (d / "model.safetensors").is_file()


def test_read_params_errors(tmp_path, converted):
    with pytest.raises(errors.MissingFileError, match="no such directory"):
        read_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.MissingFileError, match="timjax.json"):
        read_params(tmp_path / "empty")
    d = tmp_path / "tj"
    shutil.copytree(converted["untied-f32-single"], d)
    shutil.rmtree(d / "params" / "layer_00001")
    with pytest.raises(errors.MissingFileError, match="layer_00001"):
        read_params(d)


def test_export_errors(converted, tmp_path, hf_dirs):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(errors.OutputExistsError, match="exists"):
        export_timjax_to_hf(converted["untied-f32-single"], out, progress=False)
    with pytest.raises(errors.MissingFileError, match="timjax.json"):
        export_timjax_to_hf(hf_dirs["untied-f32-single"], tmp_path / "x", progress=False)
    cfg, params = read_params(converted["untied-f32-single"])
    q = params["layers"]["q_proj"]
    params["layers"]["q_proj"] = q[:, :, :2]
    with pytest.raises(
        errors.TensorShapeError, match=r"layers.q_proj has shape \(3, 32, 2, 16\), expected \(3, 32, 4, 16\)"
    ):
        export_timjax_to_hf((cfg, params), tmp_path / "y", progress=False)
    params["layers"]["q_proj"] = q
    del params["lm_head"]
    with pytest.raises(errors.TensorMissingError, match="lm_head"):
        export_timjax_to_hf((cfg, params), tmp_path / "z", progress=False)
    assert not litter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["exists"]

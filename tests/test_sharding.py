"""Sharding over a device mesh (issue 11), on forced CPU devices.

The device count must be set before JAX starts, and the rest of the suite runs on one device, so the
measurements run in a subprocess (tests/sharding_worker.py, 8 forced CPU devices) and these tests assert
on what it reports. Meshes are written TPxDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MESHES = ("1x4", "2x2", "4x2")
WORKER = Path(__file__).with_name("sharding_worker.py")
LAYERS = 2  # the worker's tiny model


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Both halves of the worker, side by side (each is mostly single-threaded compilation)."""
    tmp = tmp_path_factory.mktemp("sharding")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    jobs = {
        part: (
            tmp / f"{part}.json",
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp / f"{part}.json"), part, *(MESHES if part == "meshes" else ())],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for part in ("meshes", "runtime")
    }
    out = {}
    for part, (path, proc) in jobs.items():
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"worker {part} failed:\n{err[-4000:]}"
        out.update(json.loads(path.read_text()))
    return out


def _tp(mesh: str) -> int:
    return int(mesh.split("x")[0])


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_equal_single_device(report, mesh):
    assert report[mesh]["logits_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("mesh", ["2x2", "kv_replicated"])
def test_paged_steps_and_pruning_equal_single_device(report, mesh):
    """The ragged step with extend rows, decode rows, then edits (a shift-mode compaction and a re-encode
    cut), and a key rotation, through the shard_map'd kernels (kv_replicated: tp=4, Hkv=2)."""
    paged = report[mesh]["paged"]
    for key in ("extend_logits_diff", "decode_logits_diff", "after_compact_logits_diff"):
        assert paged[key] < 1e-5, (key, paged[key])
    assert paged["compacted_k_diff"] < 1e-5 and paged["rotated_k_diff"] < 1e-5
    assert paged["pool_spec_after"] == ["tp", None, None, None], "the pool must stay split after the edits"


@pytest.mark.parametrize("mesh", MESHES)
def test_generate_equals_single_device(report, mesh):
    """Greedy (every mesh) and seeded sampling (2x2) through the engine (dp > 1: one engine per replica) give
    the same tokens."""
    gen = report[mesh]["generate"]
    assert set(gen) == ({"greedy", "sampled"} if mesh == "2x2" else {"greedy"})
    for kind, equal in gen.items():
        assert len(equal) == 5 and all(equal), (kind, equal)


@pytest.mark.parametrize("mode", ["reencode", "shift"])
def test_tim_with_pruning_gives_the_same_tree(report, mode):
    """A TIM tree replayed with pruning (buffer 1) on tp=4 (kv heads replicated): the model's own masked
    greedy token at every step, the tree, the pruned paths and the final working memory equal one device's."""
    ref, got = report["tim"][mode]["ref"], report["tim"][mode]["sharded"]
    assert ref["finish"] == "stop" and ref["prune_events"] >= 2 and ref["pruned"]
    for key in ("raw", "tokens", "tree", "pruned", "working", "finish", "prune_events"):
        assert got[key] == ref[key], key


def test_prefix_cache_under_sharding_keeps_the_greedy_tokens(report):
    """Shared prompt pages are hit on a tensor-parallel pool (each device holds its kv heads of every page)
    and per replica under data parallel; the tokens are one device's with the cache off."""
    pc = report["prefix_cache"]
    assert pc["tp2"] == pc["ref"] and pc["dp2"] == pc["ref"]
    # the first two prompts run together (two slots) and miss; the last two map 9 full 4-token pages each
    assert pc["tp2_hit_tokens"] == 2 * 36


def test_cli_generate_tp4_equals_one_device(report):
    cli = report["tim"]["cli"]
    assert cli["rc"] == [0, 0] and all(cli["equal"]) and cli["n_tokens"] == [4, 4]


@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_its_share(report, mesh):
    """Weights and KV split over tp (replicated over dp): every device within 5% of total / tp."""
    tp = _tp(mesh)
    for what in ("weights", "kv"):
        total, per_device = report[mesh][what]["total"], report[mesh][what]["per_device"]
        for b in per_device:
            assert abs(b - total / tp) <= 0.05 * total / tp, (what, b, total / tp)


def test_parameter_specs_follow_the_rules(report):
    specs = report["2x2"]["param_specs"]
    assert specs["layers.q_proj"] == specs["layers.k_proj"] == [None, None, "tp", None]  # column parallel
    assert specs["layers.gate_proj"] == specs["layers.up_proj"] == [None, None, "tp"]
    assert specs["layers.o_proj"] == [None, "tp", None, None]  # row parallel
    assert specs["layers.down_proj"] == [None, "tp", None]
    assert specs["embed"] == ["tp", None] and specs["lm_head"] == [None, "tp"]  # split over the vocabulary
    assert specs["layers.attn_norm"] == [None, None] and specs["final_norm"] == [None]
    assert report["2x2"]["kv_spec"] == ["tp", None, None, None]
    assert all(s == [None] * len(s) for s in report["1x4"]["param_specs"].values())  # tp = 1: replicated


@pytest.mark.parametrize("mesh", MESHES)
def test_step_has_one_all_reduce_per_block_and_no_weight_or_pool_gather(report, mesh):
    """The compiled ragged step (edits + forward + sample) communicates exactly: two all-reduces over tp per
    layer (after o_proj and down_proj) of the [1, N, D] activations, one all-reduce of the embeddings (the
    table is split over the vocabulary) and one all-gather of the [R, V] logits for sampling. Nothing gathers
    a weight or the pool; tp = 1 communicates nothing."""
    r, tp = report[mesh], _tp(mesh)
    cs = r["collectives"]
    if tp == 1:
        assert cs == []
        return
    in_layers = [c for c in cs if c["times"] == LAYERS]
    assert [c["op"] for c in in_layers] == ["all-reduce", "all-reduce"], in_layers
    assert all(c["group"] == tp and c["shapes"][0][1][-1] == 64 for c in in_layers)  # D = 64
    once = sorted((c["op"], tuple(c["shapes"][0][1]), c["group"]) for c in cs if c["times"] == 1)
    assert len(once) == 2 and once[0][0] == "all-gather" and once[1][0] == "all-reduce", once
    assert once[0][1] == (4, 512) and once[1][1][-1] == 64 and once[0][2] == once[1][2] == tp  # [R, V]; [.., D]
    forbidden = {tuple(s) for s in r["param_shapes"]} | {tuple(r["pool_shape"])}
    gathered = {tuple(shape[1]) for c in cs if c["op"] == "all-gather" for shape in c["shapes"]}
    assert not gathered & forbidden, gathered & forbidden


def test_kv_heads_replicated_when_fewer_than_tp(report):
    r = report["kv_replicated"]
    assert r["logits_max_abs_diff"] < 1e-5
    assert r["checkpoint_kv_heads"] == 2 and r["k_proj_shape"][2] == 4  # 2 heads x 2 copies
    assert r["k_proj_local"][2] == 1 and r["pool_local"][0] == 1  # one kv head per shard


def test_hf_directory_loads_sharded(report):
    r = report["hf_dir"]
    assert r["logits_max_abs_diff"] < 1e-5
    total = r["weights"]["total"]
    assert max(r["weights"]["per_device"]) <= 1.05 * total / 2


def test_sharded_step_lowers_for_cuda(report):
    """The step on a 4x2 mesh with impl="pallas" exports for CUDA: Triton kernels inside shard_map, the
    pool split over tp."""
    r = report["export_cuda"]
    assert r["platforms"] == ["cuda"] and r["nr_devices"] == 8
    assert r["triton_calls"] >= 1 and r["manual"] >= 1 and r["pool_split"]


def test_mesh_errors_are_clear():
    from timjax.base.config import Qwen3Config
    from timjax.runtime.sharding import kv_repeat, make_mesh

    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh(tp=8, dp=8)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
    )
    with pytest.raises(ValueError, match="num_attention_heads=6 does not split over tp=4"):
        kv_repeat(cfg, 4)
    assert kv_repeat(cfg, 3) == 1 and kv_repeat(cfg, 6) == 2

"""Tensor and data parallelism over a device mesh, with XLA's SPMD partitioner doing the work.

The mesh has two axes, ``dp`` (data parallel: batch / engine rows) and ``tp`` (tensor parallel: heads,
MLP columns, vocabulary). Every parameter declares its logical axes once, in ``timjax.qwen3.params.param_specs``,
and the KV pool next to its layout (``timjax.runtime.cache.POOL_AXES``). One rules table (``ShardingRules``, after
jax-llm-examples' ``ShardingRules`` / ``logical_to_physical`` and bonsai's ``ShardConfig``) maps logical
axes to mesh axes, and the jitted functions are left to XLA's SPMD partitioner, except the kernels: a Pallas
call cannot be partitioned automatically, so ``sharded_impl(mesh, impl)`` registers a ``shard_map`` wrapper
around each kernel op (``kernels.ops.register``) that runs it per shard on the shard's own kv heads. Callers
pass the returned name as ``impl=``; the step's one other hook is ``whole_logits`` before sampling.

The plan (Megatron-style, one all-reduce per attention block and one per MLP block per layer):

* q/k/v and gate/up are column parallel (split over heads / MLP columns); o and down are row parallel
  (their contraction runs over the split axis, so XLA ends each block with one all-reduce over ``tp``).
* embed and lm_head are split over the vocabulary, not replicated. At Qwen3's 151,936-row vocabulary they
  are 1.2-1.6 GB each in bf16 (and most of a small model's bytes): replicating them would cost every GPU
  that much and break "per-device weights = total / tp". The price is one all-reduce of the [tokens, D]
  embeddings (each shard looks up the rows it holds) and an all-gather of the float32 logits of the rows
  that sample ([R, V], a few MB): activations, never weights.
* The KV pool ``[Hkv, L*P, ps, hd]`` is split over its kv-head axis. When ``Hkv < tp`` the kv heads are
  replicated: k_proj/v_proj (and so the pool) get ``tp / Hkv`` copies of each head, so every shard holds
  one kv head and its ``Hq / tp`` query heads (GQA maps query head h to kv head h // G; repeating each kv
  head r times and using G / r keeps that map, so the numbers do not change). The model's config then
  reads ``num_key_value_heads = tp``; ``checkpoint_kv_heads`` keeps the original.
* Norm weights, the page table, lengths and the allocator state are replicated (tiny), and so is sampling:
  the host reads one replicated array of tokens per step, as on one device.
* ``dp``: the engine runs one replica per row of the mesh (a tp group), each with its own pool, page table
  and requests (``generate_data_parallel``); a single jitted call such as ``timjax.logits`` splits its batch
  rows over ``dp`` instead. Weights are replicated over ``dp`` either way.

Nothing is ever materialised whole on one device: ``load_params`` restores orbax items straight into
their shardings (tensorstore reads each device's slice) and ``create_cache`` runs under ``jit`` with
sharded outputs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from timjax.base.config import Qwen3Config
from timjax.qwen3.params import param_specs

DP, TP = "dp", "tp"
BATCH = "batch"  # logical axis of per-row activations


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None = replicated). One table for parameters, the pool and activations."""

    batch: str | None = DP
    vocab: str | None = TP
    embed: str | None = None
    q_heads: str | None = TP
    kv_heads: str | None = TP
    head_dim: str | None = None
    mlp: str | None = TP
    layers: str | None = None
    pages: str | None = None
    page_slot: str | None = None


RULES = ShardingRules()
# Axes that may fall back to replication when their size does not divide the mesh axis (a vocabulary
# that is not a multiple of tp); the others are refused with an error.
_OPTIONAL = frozenset({"vocab", "batch"})


def make_mesh(tp: int = 1, dp: int = 1, *, devices: Iterable[Any] | None = None) -> Mesh:
    """A ``(dp, tp)`` mesh over the first ``dp * tp`` devices; ``tp`` is the inner axis so a tensor-parallel
    group is made of neighbouring devices (one NVLink island on a GPU host)."""
    if tp < 1 or dp < 1:
        raise ValueError(f"mesh sizes must be >= 1, got tp={tp}, dp={dp}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp * dp:
        raise ValueError(
            f"a tp={tp} x dp={dp} mesh needs {tp * dp} devices, found {len(devices)} "
            f"({devices[0].platform if devices else 'none'}); on the CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={tp * dp} before jax starts"
        )
    return jax.make_mesh((dp, tp), (DP, TP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: tp * dp])


def logical_to_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: ShardingRules = RULES,
    *,
    name: str = "array",
) -> P:
    """The PartitionSpec of an array with logical ``axes``; each mesh axis is used at most once."""
    spec, used = [], set()
    for axis, size in zip(axes, shape):
        mesh_axis = getattr(rules, axis) if axis is not None else None
        if mesh_axis is None or mesh.shape[mesh_axis] == 1:
            spec.append(None)
            continue
        if mesh_axis in used:
            raise ValueError(f"{name}: mesh axis {mesh_axis!r} mapped to two axes of {axes}")
        n = mesh.shape[mesh_axis]
        if size % n:
            if axis in _OPTIONAL:
                spec.append(None)  # replicated: correct, only less memory-efficient
                continue
            raise ValueError(f"{name}: axis {axis} of size {size} does not split over {mesh_axis}={n}")
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return P(*spec)


# ---- parameters --------------------------------------------------------------------------------------


def kv_repeat(cfg: Qwen3Config, tp: int) -> int:
    """How many copies of each kv head tensor parallelism over ``tp`` needs (1 when Hkv divides by tp)."""
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if hq % tp:
        raise ValueError(f"num_attention_heads={hq} does not split over tp={tp}")
    if hkv % tp == 0:
        return 1
    if tp % hkv:
        raise ValueError(f"num_key_value_heads={hkv} neither splits over nor divides tp={tp}")
    return tp // hkv


def runtime_config(cfg: Qwen3Config, mesh: Mesh) -> Qwen3Config:
    """The config the sharded model runs with: kv heads replicated up to tp when Hkv < tp."""
    rep = kv_repeat(cfg, mesh.shape[TP])
    return cfg if rep == 1 else cfg.model_copy(update={"num_key_value_heads": cfg.num_key_value_heads * rep})


def param_shardings(cfg: Qwen3Config, mesh: Mesh, rules: ShardingRules = RULES) -> dict[str, NamedSharding]:
    """NamedSharding of every parameter (flat dotted paths) of a model running with ``cfg``."""
    return {
        path: NamedSharding(mesh, logical_to_spec(s.axes, s.shape, mesh, rules, name=f"parameter {path}"))
        for path, s in param_specs(cfg).items()
    }


def layer_shardings(cfg: Qwen3Config, mesh: Mesh, rules: ShardingRules = RULES) -> dict[str, NamedSharding]:
    """The shardings of one layer's slice of each stacked parameter (keyed without ``layers.``)."""
    out = {}
    for path, sh in param_shardings(cfg, mesh, rules).items():
        if path.startswith("layers."):
            out[path[len("layers.") :]] = NamedSharding(mesh, P(*tuple(sh.spec)[1:]))
    return out


def repeat_kv_layer(layer: Mapping[str, Any], rep: int) -> dict[str, Any]:
    """One layer's (or a stack's) k_proj / v_proj with each kv head repeated ``rep`` times (axis -2)."""
    if rep == 1:
        return dict(layer)
    return {k: (np.repeat(np.asarray(x), rep, axis=-2) if k in ("k_proj", "v_proj") else x) for k, x in layer.items()}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": {}}
    for path, x in flat.items():
        if path.startswith("layers."):
            out["layers"][path[len("layers.") :]] = x
        else:
            out[path] = x
    return out


def _flat(params: Mapping[str, Any]) -> dict[str, Any]:
    flat = {f"layers.{k}": v for k, v in params.get("layers", {}).items()}
    flat.update({k: v for k, v in params.items() if k != "layers"})
    return flat


def shard_params(params: Mapping[str, Any], cfg: Qwen3Config, mesh: Mesh) -> tuple[Qwen3Config, dict]:
    """Place an in-memory params pytree (numpy or jax) on the mesh, one tensor at a time.
    Returns the runtime config (see ``runtime_config``) and the sharded params."""
    rep = kv_repeat(cfg, mesh.shape[TP])
    run_cfg = runtime_config(cfg, mesh)
    shardings = param_shardings(run_cfg, mesh)
    flat = _flat(params)
    if rep > 1:
        flat.update({f"layers.{k}": v for k, v in repeat_kv_layer(params["layers"], rep).items()})
    return run_cfg, _nest({p: jax.device_put(flat[p], shardings[p]) for p in shardings})


def shard_model(model, mesh: Mesh):
    """The same model with its parameters placed on ``mesh`` (a new ``Qwen3``)."""
    from timjax.qwen3.model import Qwen3

    run_cfg, params = shard_params(model.params(), model.config, mesh)
    out = Qwen3(
        run_cfg, dtype=model.dtype, params=params, tokenizer=model.tokenizer, mesh=mesh, place_batch=batch_placer(mesh)
    )
    out.checkpoint_kv_heads = model.config.num_key_value_heads
    return out


@partial(jax.jit, donate_argnums=0)
def _put_layer(stacked: dict, layer: dict, i: jax.Array) -> dict:
    # Donated: the stacked buffers are updated in place, layer by layer; shardings follow the inputs.
    return {
        k: jax.lax.dynamic_update_index_in_dim(stacked[k], layer[k].astype(stacked[k].dtype), i, 0) for k in stacked
    }


def _zeros(shape, dtype, sharding: NamedSharding) -> jax.Array:
    return jax.jit(partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


def _assemble(cfg: Qwen3Config, mesh: Mesh, dtype, items: Iterable[tuple[int | None, dict[str, Any]]]) -> dict:
    """Stacked sharded params from a stream of ``(None, {path: global})`` and ``(i, {name: layer i})``,
    each already on the mesh or on the host; device memory stays at the shards plus one layer."""
    from timjax.convert.timjax_format import param_dtype

    shardings = param_shardings(cfg, mesh)
    layer_sh = layer_shardings(cfg, mesh)
    specs = param_specs(cfg)
    stacked = {
        p[len("layers.") :]: _zeros(s.shape, param_dtype(p, dtype), shardings[p])
        for p, s in specs.items()
        if p.startswith("layers.")
    }
    flat: dict[str, Any] = {}
    for layer, tree in items:
        if layer is None:
            flat.update({p: jax.device_put(x, shardings[p]) for p, x in tree.items()})
        else:
            tree = {k: jax.device_put(x, layer_sh[k]) for k, x in tree.items()}
            stacked = _put_layer(stacked, tree, jnp.int32(layer))
    flat.update({f"layers.{k}": v for k, v in stacked.items()})
    return _nest(flat)


def _timjax_items(ckpt, mesh: Mesh, dtype, run_cfg: Qwen3Config, rep: int):
    """A timjax checkpoint's items, each restored by orbax straight into its sharding."""
    from timjax.convert.timjax_format import global_paths

    shardings, layer_sh = param_shardings(run_cfg, mesh), layer_shardings(run_cfg, mesh)
    if rep > 1:  # k/v come back to the host to be repeated; they are small (D x Hkv x hd per layer)
        layer_sh = {k: (None if k in ("k_proj", "v_proj") else s) for k, s in layer_sh.items()}
    for p in global_paths(ckpt.cfg):
        yield None, {p: ckpt.read_global(p, sharding=shardings[p], dtype=dtype)}
    for i in range(ckpt.cfg.num_hidden_layers):
        yield i, repeat_kv_layer(ckpt.read_layer(i, shardings=layer_sh, dtype=dtype), rep)


def load_params(path, dtype, mesh: Mesh) -> tuple[Qwen3Config, Qwen3Config, dict]:
    """Read a timjax or Hugging Face checkpoint directory straight into sharded params.

    A timjax directory is restored item by item with orbax into the target shardings, so each device reads
    only its slice; a Hugging Face directory is streamed layer by layer and each tensor is put on the mesh
    with its sharding. Returns (checkpoint config, runtime config, params)."""
    from pathlib import Path

    from timjax.base.errors import MissingFileError
    from timjax.convert.hf_to_timjax import scan_hf_checkpoint
    from timjax.convert.safetensors_io import resolve_dtype
    from timjax.convert.timjax_format import CONFIG_FILE, META_FILE, TimjaxCheckpoint

    path = Path(path)
    if (path / META_FILE).is_file():
        ckpt = TimjaxCheckpoint(path)
        cfg, target = ckpt.cfg, resolve_dtype(ckpt.dtype if dtype is None else dtype)
        run_cfg, rep = runtime_config(cfg, mesh), kv_repeat(cfg, mesh.shape[TP])
        return cfg, run_cfg, _assemble(run_cfg, mesh, target, _timjax_items(ckpt, mesh, target, run_cfg, rep))
    if not (path / CONFIG_FILE).is_file():
        raise MissingFileError(
            f"{path}: neither {META_FILE} nor {CONFIG_FILE} found (not a timjax or Hugging Face checkpoint)"
        )
    plan = scan_hf_checkpoint(path)
    cfg, target = plan.cfg, plan.own_dtype() if dtype is None else resolve_dtype(dtype)
    run_cfg, rep = runtime_config(cfg, mesh), kv_repeat(cfg, mesh.shape[TP])
    stream = ((i, tree if i is None else repeat_kv_layer(tree, rep)) for i, tree in plan.stream(target))
    return cfg, run_cfg, _assemble(run_cfg, mesh, target, stream)


def load(path, dtype=None, *, mesh: Mesh, tokenizer: Any = None):
    """A sharded ``Qwen3`` read from ``path`` (see ``load_params``; ``dtype`` None: as stored)."""
    from timjax.qwen3.model import Qwen3

    cfg, run_cfg, params = load_params(path, dtype, mesh)
    model = Qwen3(
        run_cfg,
        dtype=params["embed"].dtype,
        params=params,
        tokenizer=tokenizer,
        mesh=mesh,
        place_batch=batch_placer(mesh),
    )
    model.checkpoint_kv_heads = cfg.num_key_value_heads
    return model


# ---- activations and the KV cache --------------------------------------------------------------------


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    """Where per-step host inputs (packed tokens, edits, sampling) go: whole on every device of ``mesh``
    (None without a mesh: the default device). On several hosts each process puts the same values."""
    return None if mesh is None else NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows (axis 0) over ``dp`` when they divide evenly, everything else replicated."""
    axes = (BATCH,) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def shard_batch(x, mesh: Mesh) -> jax.Array:
    return jax.device_put(x, batch_sharding(mesh, np.shape(x)))


def batch_placer(mesh: Mesh) -> Callable[[Any], jax.Array]:
    """``shard_batch`` bound to ``mesh``: what a sharded ``Qwen3`` places its token rows with."""
    return partial(shard_batch, mesh=mesh)


def cache_shardings(cache, mesh: Mesh, rules: ShardingRules = RULES):
    """A pytree like ``cache`` (a ``KVCache`` or its ``eval_shape``) of NamedShardings: the pool split over
    its kv-head axis, page table / lengths / allocator state replicated."""
    from timjax.runtime.cache import POOL_AXES

    pool = NamedSharding(mesh, logical_to_spec(POOL_AXES, cache.k.shape, mesh, rules, name="KV pool"))
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, cache)
    return shardings.replace(k=pool, v=pool)


def create_cache(cfg: Qwen3Config, mesh: Mesh, **kwargs):
    """``timjax.runtime.cache.create_cache`` built directly in its sharded layout (never whole on one device)."""
    from timjax.runtime import cache as cache_mod

    make = partial(cache_mod.create_cache, cfg, **kwargs)
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh))()


# ---- kernels under shard_map -------------------------------------------------------------------------


def _rows(mesh: Mesh, n: int):
    """Row axis spec for kernel inputs: split over dp when the pool is replicated over dp and rows divide."""
    return DP if mesh.shape[DP] > 1 and n % mesh.shape[DP] == 0 else None


def _sharded_ops(mesh: Mesh, inner: str) -> dict[str, Callable]:
    from timjax import kernels

    pool = P(TP)
    smap = partial(jax.shard_map, mesh=mesh, check_vma=False)

    def decode_attention(q, k_pages, v_pages, lengths, page_table, *, scale=None, **tuning):
        r = _rows(mesh, q.shape[0])
        f = partial(kernels.decode_attention, scale=scale, impl=inner, **tuning)
        return smap(f, in_specs=(P(r, TP), pool, pool, P(r), P(r)), out_specs=P(r, TP))(
            q, k_pages, v_pages, lengths, page_table
        )

    def extend_attention(q, k_pages, v_pages, q_start, q_len, page_table, *, scale=None, **tuning):
        r = _rows(mesh, q.shape[0])
        f = partial(kernels.extend_attention, scale=scale, impl=inner, **tuning)
        return smap(f, in_specs=(P(r, None, TP), pool, pool, P(r), P(r), P(r)), out_specs=P(r, None, TP))(
            q, k_pages, v_pages, q_start, q_len, page_table
        )

    def ragged_attention(q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens, *, scale=None, **tuning):
        # Packed tokens of all rows: every shard sees every token and its own heads.
        f = partial(kernels.ragged_attention, scale=scale, impl=inner, **tuning)
        return smap(f, in_specs=(P(None, TP), pool, pool, P(), P(), P(), P()), out_specs=P(None, TP))(
            q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens
        )

    # Cache edits touch the pool, which dp replicates: every replica applies every row's edit.
    def compact(k_pages, v_pages, page_table, start, end, length, *, rope_theta, **tuning):
        f = partial(kernels.compact, rope_theta=rope_theta, impl=inner, **tuning)
        return smap(f, in_specs=(pool, pool, P(), P(), P(), P()), out_specs=(pool, pool))(
            k_pages, v_pages, page_table, start, end, length
        )

    def rotate_slots(k_pages, page_table, start, count, delta, *, rope_theta, **tuning):
        f = partial(kernels.rotate_slots, rope_theta=rope_theta, impl=inner, **tuning)
        return smap(f, in_specs=(pool, P(), P(), P(), P()), out_specs=pool)(k_pages, page_table, start, count, delta)

    ops = {
        "decode_attention": decode_attention,
        "extend_attention": extend_attention,
        "compact": compact,
        "rotate_slots": rotate_slots,
    }
    if hasattr(kernels, "ragged_attention"):
        ops["ragged_attention"] = ragged_attention
    return ops


def mesh_key(mesh: Mesh) -> str:
    ids = ",".join(str(d.id) for d in mesh.devices.flat)
    return f"dp{mesh.shape[DP]}xtp{mesh.shape[TP]}[{ids}]"


def sharded_impl(mesh: Mesh, impl: str = "auto") -> str:
    """Register shard_map'd kernel ops for ``mesh`` around ``impl`` and return their ``impl`` name.

    Each shard runs the kernel on its local kv heads (and its rows, for attention with dp > 1): no
    gather of the pool. The name is stable per (mesh, impl), so jitted steps keyed on it are reused."""
    from timjax import kernels

    inner = kernels.resolve_impl(impl)
    name = f"{inner}@{mesh_key(mesh)}"
    for op, fn in _sharded_ops(mesh, inner).items():
        kernels.register(op, name, fn)
    _MESH_OF_IMPL[name] = mesh
    return name


_MESH_OF_IMPL: dict[str, Mesh] = {}


def whole_logits(logits: jax.Array, impl: str) -> jax.Array:
    """Inside a jitted step whose ``impl`` came from ``sharded_impl``: the logits (split over the vocabulary
    by the lm_head) made whole on every device, so sampling runs replicated after one all-gather of [R, V]
    (XLA would otherwise partition the top-p sort across the vocabulary shards). Identity on one device."""
    mesh = _MESH_OF_IMPL.get(impl)
    if mesh is None:
        return logits
    # First pin the lm_head's output to its vocab split, else XLA may meet "replicated" by gathering the
    # lm_head weight instead of the (much smaller) logits.
    split = logical_to_spec((None,) * (logits.ndim - 1) + ("vocab",), logits.shape, mesh)
    logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, split))
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P()))


# ---- inspection: bytes per device and collectives in compiled HLO -------------------------------------


def device_bytes(tree) -> dict[Any, int]:
    """Bytes each device holds for the arrays in ``tree`` (its own shards only)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(_COLLECTIVES) + r")(?:-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_GROUPS = re.compile(
    r"replica_groups=(\{\{[\d,{}]*\}\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?"
    r"|mesh\[(?P<mesh>[^\]]*)\][^{]*\{(?P<axes>[^}]*)\})"
)
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")  # computations start at column 0
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # all-reduce, all-gather, ...
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # result (dtype, dims) per operand
    group_size: int
    computation: str
    times: int  # executions per call (trip counts of enclosing while loops)

    @property
    def bytes(self) -> int:
        return sum(int(np.prod(d, dtype=np.int64)) * np.dtype(_HLO_DTYPES.get(t, t)).itemsize for t, d in self.shapes)

    @property
    def sent_per_device(self) -> float:
        """Bytes each device sends per execution in a ring algorithm."""
        g = self.group_size
        if g <= 1:
            return 0.0
        share = (g - 1) / g
        return {"all-reduce": 2 * share, "collective-permute": 1.0}.get(self.op, share) * self.bytes


_HLO_DTYPES = {
    "f32": "float32",
    "bf16": "bfloat16",
    "f16": "float16",
    "s32": "int32",
    "u32": "uint32",
    "pred": "bool",
    "s8": "int8",
    "u8": "uint8",
    "s64": "int64",
    "f64": "float64",
}


def _group_size(line: str, default: int) -> int:
    m = _GROUPS.search(line)
    if not m:
        return default
    g = m.group(1)
    if m.group("mesh") is not None:  # mesh['axis_0'=2,'axis_1'=2] {'axis_1'}: the product of the named axes
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group("mesh")))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group("axes"))]))
    if g.startswith("{{"):
        return len(g[2:].split("}")[0].split(","))
    return int(g.split("<=")[0].strip("[]").split(",")[-1])  # iota form [groups,size]<=[n]


def hlo_collectives(hlo: str, num_devices: int) -> list[Collective]:
    """Every collective in an optimized HLO module's text, with how often it runs per call
    (collectives in a ``while`` body, e.g. the ``lax.scan`` over layers, run trip-count times)."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group("name")
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    # Multiplicity of each computation: product of the trip counts of the while loops around it.
    times: dict[str, int] = {}
    entry = next(
        (m.group("name") for line in hlo.splitlines() if line.startswith("ENTRY") for m in [_COMP.match(line)] if m),
        None,
    )

    def visit(name: str, mult: int) -> None:
        if name not in comps or times.get(name, 0) >= mult:
            return
        times[name] = mult
        for line in comps[name]:
            w = re.search(r"\swhile\(", line)
            if w:
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                n = re.search(r"\"known_trip_count\":\{\"n\":\"(\d+)\"", line)
                visit(body, mult * (int(n.group(1)) if n else 1))
            for callee in _CALLS.findall(line):
                if not w or callee != re.search(r"body=%?([\w.\-]+)", line).group(1):
                    visit(callee, mult)

    if entry:
        visit(entry, 1)
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            shapes = tuple((t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(m["type"]))
            out.append(Collective(m["op"], shapes, _group_size(line, num_devices), name, times.get(name, 1)))
    return out


def communication_per_step(hlo: str, num_devices: int) -> dict[str, float]:
    """Collective count and bytes per call of a compiled function: executions and bytes sent per device."""
    cs = hlo_collectives(hlo, num_devices)
    out: dict[str, float] = {}
    for c in cs:
        out[f"{c.op} count"] = out.get(f"{c.op} count", 0) + c.times
        out[f"{c.op} bytes/device"] = out.get(f"{c.op} bytes/device", 0.0) + c.times * c.sent_per_device
    return out


# ---- data parallel: one engine per dp replica -----------------------------------------------------------
#
# Rows are split over dp by running one engine per dp replica (a row of the mesh, itself a tp group), each
# with its own KV pool, page table and requests. The engine's host loop packs every running row's chunk into
# one flat token array per step (the ragged step), and splitting that array over dp inside one program would
# tie every replica's scheduling to the others'; independent replicas need no communication at all, keep the
# one host sync per step per replica, and give each replica its own pool (so KV capacity grows with dp).
# The params on a (dp, tp) mesh are replicated over dp; each replica's params are views of its devices'
# shards (no copy).


def submeshes(mesh: Mesh) -> list[Mesh]:
    """One (1, tp) mesh per dp replica (a row of ``mesh``)."""
    return [
        Mesh(mesh.devices[d : d + 1], (DP, TP), axis_types=(AxisType.Auto, AxisType.Auto))
        for d in range(mesh.shape[DP])
    ]


def _restrict(x: jax.Array, sub: Mesh) -> jax.Array:
    spec = x.sharding.spec
    if DP in jax.tree.leaves(tuple(spec)):
        raise ValueError(f"cannot view an array split over {DP} as one replica's (spec {spec})")
    devices = set(sub.devices.flat)
    shards = [s.data for s in x.addressable_shards if s.device in devices]
    return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(sub, spec), shards)


def replicas(model) -> list:
    """The model as one ``Qwen3`` per dp replica, each on its (1, tp) sub-mesh, sharing the weights' buffers."""
    from timjax.qwen3.model import Qwen3

    mesh = model.mesh
    if mesh is None or mesh.shape[DP] == 1:
        return [model]
    out = []
    for sub in submeshes(mesh):
        params = jax.tree.map(lambda x, s=sub: _restrict(x, s), model.params())
        m = Qwen3(
            model.config,
            dtype=model.dtype,
            params=params,
            tokenizer=model.tokenizer,
            mesh=sub,
            place_batch=batch_placer(sub),
        )
        m.checkpoint_kv_heads = getattr(model, "checkpoint_kv_heads", model.config.num_key_value_heads)
        out.append(m)
    return out


def on_mesh(model, mesh: Mesh | None):
    """``model`` sharded over ``mesh`` (as it is when it already lives there)."""
    if mesh is None or getattr(model, "mesh", None) == mesh:
        return model
    return shard_model(model, mesh)


def generate_data_parallel(
    generate: Callable,
    model,
    prompts: list,
    *,
    seed: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    **kwargs,
) -> list:
    """``generate`` over dp replicas: contiguous blocks of prompts, one engine per replica, each in its own
    host thread (JAX releases the GIL while a step runs). Request i keeps seed ``seed + i`` and its
    ``on_token`` index, so results equal a one-replica run's."""
    from concurrent.futures import ThreadPoolExecutor

    reps = replicas(model)
    bounds = np.linspace(0, len(prompts), len(reps) + 1).astype(int)
    jobs = [(rep, lo, hi) for rep, lo, hi in zip(reps, bounds[:-1], bounds[1:]) if hi > lo]

    def run(rep, lo, hi):
        tok = None if on_token is None else (lambda i, t, lo=lo: on_token(lo + i, t))
        return generate(rep, list(prompts[lo:hi]), seed=seed + int(lo), on_token=tok, **kwargs)

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        return [r for f in futures for r in f.result()]


# ---- multi-host ---------------------------------------------------------------------------------------
#
# Across hosts the host loop runs on every process in lockstep (JAX's multi-controller model): each process
# executes the same loop and issues the same jitted steps in the same order, and the step's outputs that the
# host reads (sampled tokens, out-of-pages flags) are replicated, so every process sees the same tokens and
# its controllers make the same decisions. The alternative, process 0 deciding and the others following,
# would add a host-to-host broadcast of every decision to every step (a second sync per step) and a second
# code path. Lockstep needs the host-side inputs to be identical on every process: prompts, seeds, and (for
# tools) results, which must be fetched on process 0 and broadcast
# (jax.experimental.multihost_utils.broadcast_one_to_all) before being fed. Where the model fits one host,
# prefer dp across hosts with tp inside each: every host is then an independent replica with its own loop
# and requests, and nothing crosses hosts at all (jax.distributed is not even needed).


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``jax.distributed.initialize`` from arguments, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, else from the cluster's own environment (SLURM, Open MPI, ... as jax detects)."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def mesh_from_args(args) -> Mesh | None:
    """The mesh that ``--tp`` / ``--dp`` / ``--distributed`` (``timjax.base.mesh_args``) ask for, or None."""
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        if args.dp > 1 and jax.process_count() > 1:
            raise ValueError(
                "--dp with --distributed: run one timjax process per host instead (each is its own "
                "data-parallel replica, with --tp over its local devices)"
            )
    if args.tp == 1 and args.dp == 1 and not args.distributed:
        return None
    return make_mesh(tp=args.tp, dp=args.dp)
